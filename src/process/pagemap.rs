//! Reading /proc/PID/pagemap: which pages are populated.

use std::fs::File;
use std::os::unix::fs::FileExt;

use super::ProcessError;

/// Page present in RAM.
pub const PM_PRESENT: u64 = 1 << 63;
/// Page swapped out.
pub const PM_SWAPPED: u64 = 1 << 62;

/// An open /proc/PID/pagemap.
pub struct Pagemap {
    pid: i32,
    file: File,
    page_size: u64,
}

impl Pagemap {
    pub fn open(pid: i32, page_size: u64) -> Result<Pagemap, ProcessError> {
        let file = File::open(format!("/proc/{pid}/pagemap"))
            .map_err(|source| ProcessError::Pagemap { pid, source })?;
        Ok(Pagemap {
            pid,
            file,
            page_size,
        })
    }

    /// Read the entries of `out.len()` pages starting at address `start`.
    pub fn read(&self, start: u64, out: &mut [u64]) -> Result<(), ProcessError> {
        let bytes: &mut [u8] = bytemuck_u64(out);
        let offset = start / self.page_size * 8;
        self.file
            .read_exact_at(bytes, offset)
            .map_err(|source| ProcessError::Pagemap {
                pid: self.pid,
                source,
            })?;
        for e in out.iter_mut() {
            *e = u64::from_le(*e);
        }
        Ok(())
    }
}

fn bytemuck_u64(v: &mut [u64]) -> &mut [u8] {
    // SAFETY: u64 has no invalid bit patterns and a stricter alignment than
    // u8; the byte view covers exactly the same memory.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}
