//! Reading /proc/PID/pagemap: which pages are populated.

use std::fs::File;
use std::os::unix::fs::FileExt;

use super::ProcessError;

/// Page present in RAM.
pub const PM_PRESENT: u64 = 1 << 63;
/// Page swapped out.
pub const PM_SWAPPED: u64 = 1 << 62;

/// Bits 0-54: the frame, or for a swap entry its type (bits 0-4) and
/// offset.
const PM_FRAME: u64 = (1 << 55) - 1;
/// The swap type of a PTE marker (SWP_PTE_MARKER, the last of the 32):
/// userfaultfd write protection keeps never-populated pages protected
/// with such markers (UFFD_FEATURE_WP_UNPOPULATED), and pagemap shows
/// them as swapped.
const MARKER_SWAP_TYPE: u64 = 31;

/// Whether a pagemap entry is a page that holds data: present, or
/// really swapped out. A PTE marker is neither. (Its swap type shows only
/// to a reader with CAP_SYS_ADMIN; without it a marker counts as data,
/// which costs a read of zeros, never a page lost.)
pub fn holds_data(e: u64) -> bool {
    e & PM_PRESENT != 0 || swapped(e)
}

/// Whether a pagemap entry is a page swapped out (not a PTE marker).
fn swapped(e: u64) -> bool {
    e & PM_SWAPPED != 0 && e & PM_FRAME & 0x1f != MARKER_SWAP_TYPE
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_hold_no_data() {
        // As read on kernel 6.18 (root): a written page, a uffd-wp marker on
        // a never-touched page, the zero page, and swap entries.
        assert!(holds_data(0x8300000000224653));
        assert!(!holds_data(0x420000000000003f));
        assert!(holds_data(0x8200000000003b36));
        // A page swapped to device 0, offset 7 (seen as root), and any
        // swap entry seen without CAP_SYS_ADMIN (frame hidden).
        assert!(holds_data(PM_SWAPPED | (7 << 5)));
        assert!(holds_data(PM_SWAPPED));
        assert!(!holds_data(0));
    }
}
