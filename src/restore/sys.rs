//! Raw ptrace requests and kernel structures the restorer needs that nix
//! does not wrap (x86-64).

use nix::errno::Errno;

const PTRACE_GETREGSET: libc::c_uint = 0x4204;
const PTRACE_SETREGSET: libc::c_uint = 0x4205;
const PTRACE_GETSIGMASK: libc::c_uint = 0x420a;
const PTRACE_SETSIGMASK: libc::c_uint = 0x420b;
const PTRACE_GET_RSEQ_CONFIGURATION: libc::c_uint = 0x420f;
const NT_X86_XSTATE: usize = 0x202;

/// Words in struct user_regs_struct.
pub const REG_WORDS: usize = 27;
/// Indexes into it.
pub const RAX: usize = 10;
pub const ORIG_RAX: usize = 15;
pub const RIP: usize = 16;

const ERESTARTSYS: i64 = 512;
const ERESTARTNOINTR: i64 = 513;
const ERESTARTNOHAND: i64 = 514;
const ERESTART_RESTARTBLOCK: i64 = 516;

pub fn regs_to_words(r: &libc::user_regs_struct) -> [u64; REG_WORDS] {
    // SAFETY: user_regs_struct is 27 u64 fields, no padding.
    unsafe { std::mem::transmute_copy(r) }
}

pub fn words_to_regs(w: &[u64]) -> Result<libc::user_regs_struct, String> {
    let w: [u64; REG_WORDS] = w
        .try_into()
        .map_err(|_| format!("register set of {} words, want {REG_WORDS}", w.len()))?;
    // SAFETY: as above, the same layout.
    Ok(unsafe { std::mem::transmute::<[u64; REG_WORDS], libc::user_regs_struct>(w) })
}

/// A thread stopped inside a system call has `rax` = -ERESTART*: resolve
/// it the way the kernel would on resuming, so that the registers can be
/// set on another thread: restart the call (rip back over `syscall`), or
/// for calls the kernel restarts through its own restart block (sleeps
/// with a deadline), return EINTR as CRIU does. orig_rax is cleared so the
/// kernel does nothing more.
pub fn resolve_restart(w: &mut [u64; REG_WORDS]) {
    if (w[ORIG_RAX] as i64) < 0 {
        return;
    }
    match -(w[RAX] as i64) {
        ERESTARTSYS | ERESTARTNOINTR | ERESTARTNOHAND => {
            w[RAX] = w[ORIG_RAX];
            w[RIP] -= 2;
        }
        ERESTART_RESTARTBLOCK => w[RAX] = (-libc::EINTR as i64) as u64,
        _ => {}
    }
    w[ORIG_RAX] = u64::MAX;
}

fn ptrace_raw(req: libc::c_uint, tid: i32, addr: usize, data: usize) -> Result<i64, Errno> {
    // SAFETY: the requests used here read or write the buffer `data`
    // points to, sized by the caller.
    let r = unsafe { libc::ptrace(req, tid, addr, data) };
    if r < 0 {
        return Err(Errno::last());
    }
    Ok(r)
}

pub fn get_xstate(tid: i32) -> Result<Vec<u8>, String> {
    let mut buf = vec![0u8; 64 << 10];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    ptrace_raw(
        PTRACE_GETREGSET,
        tid,
        NT_X86_XSTATE,
        &mut iov as *mut _ as usize,
    )
    .map_err(|e| format!("PTRACE_GETREGSET(NT_X86_XSTATE) of {tid}: {e}"))?;
    buf.truncate(iov.iov_len);
    Ok(buf)
}

pub fn set_xstate(tid: i32, x: &[u8]) -> Result<(), String> {
    let mut buf = x.to_vec();
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    ptrace_raw(
        PTRACE_SETREGSET,
        tid,
        NT_X86_XSTATE,
        &mut iov as *mut _ as usize,
    )
    .map_err(|e| format!("PTRACE_SETREGSET(NT_X86_XSTATE) of {tid}: {e} (another CPU model?)"))?;
    Ok(())
}

pub fn get_sigmask(tid: i32) -> Result<u64, String> {
    let mut m = 0u64;
    ptrace_raw(PTRACE_GETSIGMASK, tid, 8, &mut m as *mut u64 as usize)
        .map_err(|e| format!("PTRACE_GETSIGMASK of {tid}: {e}"))?;
    Ok(m)
}

pub fn set_sigmask(tid: i32, m: u64) -> Result<(), String> {
    let mut m = m;
    ptrace_raw(PTRACE_SETSIGMASK, tid, 8, &mut m as *mut u64 as usize)
        .map_err(|e| format!("PTRACE_SETSIGMASK of {tid}: {e}"))?;
    Ok(())
}

#[repr(C)]
#[derive(Default)]
struct RseqConfig {
    addr: u64,
    len: u32,
    sig: u32,
    flags: u32,
    pad: u32,
}

pub fn get_rseq(tid: i32) -> Result<Option<super::state::Rseq>, String> {
    let mut c = RseqConfig::default();
    match ptrace_raw(
        PTRACE_GET_RSEQ_CONFIGURATION,
        tid,
        std::mem::size_of::<RseqConfig>(),
        &mut c as *mut _ as usize,
    ) {
        Ok(_) if c.addr != 0 => Ok(Some(super::state::Rseq {
            addr: c.addr,
            len: c.len,
            sig: c.sig,
        })),
        Ok(_) => Ok(None),
        Err(Errno::EIO) => Ok(None), // kernel without rseq
        Err(e) => Err(format!("PTRACE_GET_RSEQ_CONFIGURATION of {tid}: {e}")),
    }
}

pub fn get_robust_list(tid: i32) -> Result<[u64; 2], String> {
    let mut head = 0u64;
    let mut len = 0usize;
    // SAFETY: get_robust_list writes a pointer and a length.
    let r = unsafe {
        libc::syscall(
            libc::SYS_get_robust_list,
            tid,
            &mut head as *mut u64,
            &mut len as *mut usize,
        )
    };
    if r < 0 {
        return Err(format!(
            "get_robust_list of {tid}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok([head, len as u64])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restart_is_resolved_like_the_kernel() {
        let mut w = [0u64; REG_WORDS];
        w[ORIG_RAX] = libc::SYS_read as u64;
        w[RAX] = (-ERESTARTSYS) as u64;
        w[RIP] = 0x1002;
        resolve_restart(&mut w);
        assert_eq!(
            (w[RAX], w[RIP], w[ORIG_RAX]),
            (libc::SYS_read as u64, 0x1000, u64::MAX)
        );
        let mut w = [0u64; REG_WORDS];
        w[ORIG_RAX] = libc::SYS_clock_nanosleep as u64;
        w[RAX] = (-ERESTART_RESTARTBLOCK) as u64;
        w[RIP] = 0x1002;
        resolve_restart(&mut w);
        assert_eq!((w[RAX] as i64, w[RIP]), (-libc::EINTR as i64, 0x1002));
        // Not in a system call: untouched.
        let mut w = [7u64; REG_WORDS];
        w[ORIG_RAX] = u64::MAX;
        resolve_restart(&mut w);
        assert_eq!(w[RAX], 7);
    }
}
