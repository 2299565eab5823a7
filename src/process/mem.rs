//! Reading the target's memory: process_vm_readv, falling back to
//! /proc/PID/mem.

use std::fs::File;
use std::io::IoSliceMut;
use std::os::unix::fs::FileExt;

use nix::sys::uio::{process_vm_readv, RemoteIoVec};
use nix::unistd::Pid;

use super::ProcessError;
use crate::protocol::Run;

/// Most iovecs per process_vm_readv call (IOV_MAX).
const MAX_IOV: usize = 1024;

pub struct MemReader {
    pid: i32,
    mem: File,
}

impl MemReader {
    pub fn open(pid: i32) -> Result<MemReader, ProcessError> {
        let mem = File::open(format!("/proc/{pid}/mem")).map_err(|source| ProcessError::Read {
            pid,
            addr: 0,
            len: 0,
            source,
        })?;
        Ok(MemReader { pid, mem })
    }

    /// Read `buf.len()` bytes at `addr`.
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), ProcessError> {
        let len = buf.len();
        let remote = [RemoteIoVec {
            base: addr as usize,
            len,
        }];
        let mut local = [IoSliceMut::new(buf)];
        if let Ok(n) = process_vm_readv(Pid::from_raw(self.pid), &mut local, &remote) {
            if n == len {
                return Ok(());
            }
        }
        self.read_mem_file(addr, buf)
    }

    /// Read the pages of `runs` (page indexes relative to `base`) into
    /// `buf`, back to back, in as few system calls as possible.
    pub fn read_runs(
        &self,
        base: u64,
        page_size: u64,
        runs: &[Run],
        buf: &mut [u8],
    ) -> Result<(), ProcessError> {
        let mut off = 0usize;
        for group in runs.chunks(MAX_IOV) {
            let remote: Vec<RemoteIoVec> = group
                .iter()
                .map(|r| RemoteIoVec {
                    base: (base + r.first * page_size) as usize,
                    len: r.count as usize * page_size as usize,
                })
                .collect();
            let total: usize = remote.iter().map(|r| r.len).sum();
            let dst = &mut buf[off..off + total];
            let mut local = [IoSliceMut::new(dst)];
            let done = process_vm_readv(Pid::from_raw(self.pid), &mut local, &remote).unwrap_or(0);
            if done != total {
                // Partial read (a page vanished or is unreadable): redo the
                // group run by run through /proc/PID/mem for a precise error.
                let mut o = off;
                for r in &remote {
                    self.read_mem_file(r.base as u64, &mut buf[o..o + r.len])?;
                    o += r.len;
                }
            }
            off += total;
        }
        Ok(())
    }

    fn read_mem_file(&self, addr: u64, buf: &mut [u8]) -> Result<(), ProcessError> {
        self.mem
            .read_exact_at(buf, addr)
            .map_err(|source| ProcessError::Read {
                pid: self.pid,
                addr,
                len: buf.len(),
                source,
            })
    }
}
