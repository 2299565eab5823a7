//! What memory alone does not hold: the process state captured during the
//! final stop, carried in the stream (frame `State`) and kept in the image
//! as `state.json`.
//!
//! Byte strings (register sets, page contents) are hex in the JSON, so the
//! file stays readable with any JSON tool.

use serde::{Deserialize, Serialize};

/// Version of [`ProcessState`]; readers accept this one only.
pub const STATE_VERSION: u32 = 1;
/// Name of the state inside an image directory.
pub const STATE_NAME: &str = "state.json";
/// Largest encoded state accepted (thread registers, fds, mappings and the
/// few modified pages of read-only mappings; far below this).
pub const MAX_STATE: usize = 64 << 20;

/// Everything about the process but its migrated memory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessState {
    pub version: u32,
    pub pid: i32,
    pub comm: String,
    /// /proc/sys/kernel/random/boot_id of the source machine: a
    /// destination with the same id is the same boot of the same machine.
    pub boot_id: String,
    /// The executable (/proc/PID/exe) and its identity.
    pub exe: FileRef,
    pub cwd: String,
    pub umask: u32,
    /// getrlimit for every resource 0..RLIM_NLIMITS: [soft, hard].
    pub rlimits: Vec<[u64; 2]>,
    pub creds: Creds,
    /// prctl(PR_SET_NO_NEW_PRIVS) was set.
    #[serde(default)]
    pub no_new_privs: bool,
    pub mm: MmFields,
    /// The main thread first.
    pub threads: Vec<ThreadState>,
    /// Signal dispositions, signals 1..=64 (SIGKILL and SIGSTOP omitted).
    pub sigactions: Vec<SigAction>,
    /// Every mapping, in address order.
    pub mappings: Vec<Mapping>,
    pub fds: Vec<FdState>,
    /// Contents of the pages of non-migrated private mappings that differ
    /// from their file or from zero (relocated read-only data, RELRO, ...).
    pub extra_pages: Vec<PageData>,
}

/// A file the process uses, and enough to tell it is the same file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRef {
    pub path: String,
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Creds {
    /// Real, effective, saved.
    pub uid: [u32; 3],
    pub gid: [u32; 3],
    pub groups: Vec<u32>,
}

/// The mm fields PR_SET_MM_MAP sets, and the vDSO's place.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmFields {
    pub start_code: u64,
    pub end_code: u64,
    pub start_data: u64,
    pub end_data: u64,
    pub start_brk: u64,
    pub brk: u64,
    pub start_stack: u64,
    pub arg_start: u64,
    pub arg_end: u64,
    pub env_start: u64,
    pub env_end: u64,
    /// The auxiliary vector, as /proc/PID/auxv gives it.
    pub auxv: Vec<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThreadState {
    pub tid: i32,
    pub comm: String,
    /// struct user_regs_struct, 27 words (x86-64), system call restart
    /// already resolved (see `capture`).
    pub regs: Vec<u64>,
    /// PTRACE_GETREGSET NT_X86_XSTATE.
    #[serde(with = "hex")]
    pub xstate: Vec<u8>,
    pub sigmask: u64,
    pub rseq: Option<Rseq>,
    pub robust_list: [u64; 2],
    pub clear_child_tid: u64,
    /// sigaltstack: [sp, flags, size]; flags SS_DISABLE (2) when none.
    pub altstack: [u64; 3],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rseq {
    pub addr: u64,
    pub len: u32,
    pub sig: u32,
}

/// struct kernel_sigaction of one signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SigAction {
    pub signo: u32,
    pub handler: u64,
    pub flags: u64,
    pub restorer: u64,
    pub mask: u64,
}

/// What backs a mapping, for recreating it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backing {
    /// Private anonymous memory ([heap], [stack], thread stacks, ...).
    Anon,
    /// A file, mapped privately or shared.
    File(FileRef),
    /// Shared memory that exists only in memory: shared anonymous
    /// memory, /dev/zero, memfd. Recreated as shared anonymous memory.
    SharedMemory,
    /// [vdso], [vvar], [vvar_vclock]: moved into place from the
    /// destination's own.
    Kernel,
    /// [vsyscall]: fixed, nothing to do.
    Vsyscall,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    /// As in /proc/PID/maps, e.g. `r-xp`.
    pub perms: String,
    pub offset: u64,
    /// As in /proc/PID/maps.
    pub name: String,
    pub backing: Backing,
    /// Its contents are a region of the image (migrated memory).
    pub migrated: bool,
}

impl Mapping {
    pub fn prot(&self) -> i32 {
        let b = self.perms.as_bytes();
        let mut p = 0;
        if b.first() == Some(&b'r') {
            p |= libc::PROT_READ;
        }
        if b.get(1) == Some(&b'w') {
            p |= libc::PROT_WRITE;
        }
        if b.get(2) == Some(&b'x') {
            p |= libc::PROT_EXEC;
        }
        p
    }

    pub fn shared(&self) -> bool {
        self.perms.as_bytes().get(3) == Some(&b's')
    }

    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }
}

/// Pages at `addr` and the bytes they hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageData {
    pub addr: u64,
    #[serde(with = "hex")]
    pub data: Vec<u8>,
}

/// One open file descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FdState {
    pub fd: i32,
    /// File status flags and O_CLOEXEC, from fdinfo `flags:`.
    pub flags: u32,
    pub kind: FdKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FdKind {
    /// A regular file, directory or device opened by path.
    Path {
        path: String,
        pos: u64,
        /// A terminal: reopened only where `--stdio` allows.
        tty: bool,
    },
    /// One end of a pipe whose other end the process also holds. `id` is
    /// the pipe's inode; `data` what was buffered in it (read end only).
    Pipe {
        id: u64,
        write_end: bool,
        #[serde(with = "hex")]
        data: Vec<u8>,
    },
    /// A pipe, socket or terminal leading out of the process on fd 0, 1
    /// or 2: replaced by the destination's `--stdio`.
    Stdio {
        what: String,
    },
    Eventfd {
        count: u64,
        semaphore: bool,
    },
    /// An epoll instance: (fd, events, data) registrations.
    Epoll {
        targets: Vec<[u64; 3]>,
    },
    Timerfd {
        clockid: i32,
        /// [interval s, interval ns, value s, value ns]; value is relative.
        times: [i64; 4],
    },
    Signalfd {
        mask: u64,
    },
    /// A listening socket: bound again to the same address.
    Listen {
        domain: i32,
        #[serde(with = "hex")]
        addr: Vec<u8>,
        backlog: i32,
    },
    /// A connected socket: restored as one whose peer has closed.
    Connected {
        what: String,
    },
}

/// serde helper: bytes as a hex string.
pub mod hex {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        let mut out = String::with_capacity(b.len() * 2);
        for x in b {
            out.push_str(&format!("{x:02x}"));
        }
        s.serialize_str(&out)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = <&str>::deserialize(d)?;
        if s.len() % 2 != 0 {
            return Err(D::Error::custom("odd-length hex string"));
        }
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).map_err(D::Error::custom))
            .collect()
    }
}

impl ProcessState {
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("state serializes")
    }

    pub fn from_bytes(b: &[u8]) -> Result<ProcessState, String> {
        if b.len() > MAX_STATE {
            return Err(format!("process state of {} bytes is too large", b.len()));
        }
        let s: ProcessState =
            serde_json::from_slice(b).map_err(|e| format!("bad process state: {e}"))?;
        if s.version != STATE_VERSION {
            return Err(format!(
                "process state version {} (this build reads {STATE_VERSION})",
                s.version
            ));
        }
        if s.threads.is_empty() {
            return Err("process state has no threads".into());
        }
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let p = PageData {
            addr: 0x1000,
            data: vec![0, 1, 0xab, 0xff],
        };
        let j = serde_json::to_string(&p).unwrap();
        assert!(j.contains("\"0001abff\""), "{j}");
        assert_eq!(serde_json::from_str::<PageData>(&j).unwrap(), p);
        assert!(serde_json::from_str::<PageData>(r#"{"addr":0,"data":"abc"}"#).is_err());
    }
}
