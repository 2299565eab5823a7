//! Writeback started while the pages still arrive: a thread of its own asks
//! the kernel to start writing the image's dirty pages (sync_file_range
//! without waiting) every [`KICK_EVERY`] bytes handed to the workers, so
//! that the commit's sync finds little left to write. Neither the
//! dispatcher nor the workers ever wait for it (a kick that finds the
//! thread busy is dropped: the next one covers its pages), and on tmpfs
//! there is nothing to write back. Measured in docs/benchmarks.md: on ext4
//! the commit of 1 GiB fell from ~1.2 s to 0.35–0.73 s and the whole
//! migration took ~7% less; kicks in the workers themselves had made it
//! slower, since a worker then waited for the disk's queue.

use std::fs::File;
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, Sender};

/// Bytes handed to the workers between two kicks (64 MiB helped less here:
/// the thread then wrote in long bursts and fell behind).
pub const KICK_EVERY: u64 = 16 << 20;

/// The writeback thread's handle; dropping it joins the thread.
pub struct Writeback {
    kicks: Option<Sender<Vec<File>>>,
    thread: Option<JoinHandle<()>>,
    pending: u64,
}

impl Writeback {
    /// Start the thread (none if it cannot start: the commit's sync then
    /// writes everything, as without it).
    pub fn spawn() -> Writeback {
        let (tx, rx) = bounded::<Vec<File>>(1);
        let thread = std::thread::Builder::new()
            .name("writeback".into())
            .spawn(move || {
                for files in rx.iter() {
                    files.iter().for_each(super::staging::start_writeback);
                }
            })
            .ok();
        Writeback {
            kicks: thread.as_ref().map(|_| tx),
            thread,
            pending: 0,
        }
    }

    /// `bytes` more were handed to the workers. At each kick `files` gives
    /// the region files as duplicated descriptors, so that a region removed
    /// meanwhile is freed only once the thread is done with it.
    pub fn handed(&mut self, bytes: u64, files: impl FnOnce() -> Vec<File>) {
        self.pending += bytes;
        if self.pending < KICK_EVERY {
            return;
        }
        self.pending = 0;
        if let Some(tx) = &self.kicks {
            let _ = tx.try_send(files());
        }
    }
}

impl Drop for Writeback {
    fn drop(&mut self) {
        self.kicks = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
