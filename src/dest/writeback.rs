//! Writeback while the pages still arrive: a thread of its own writes the
//! dirty pages of the regions handed pages lately and flushes the disk's
//! cache (sync_file_range to start all of them at once, then fdatasync)
//! every [`KICK_EVERY`] bytes handed to the workers, so that the commit's
//! sync finds little left to write or flush. Neither the dispatcher nor
//! the workers ever wait for it (a kick that finds the thread busy is
//! dropped: the next one covers its pages), and on tmpfs there is nothing
//! to write back. Measured in docs/benchmarks.md: on ext4 in this VM the
//! commit of 1 GiB was ~1.2 s without the thread; starting writeback alone
//! left 0.35–0.8 s, nearly all of it the commit's one device flush (the
//! host writing out the image its cache had taken); flushing as we go
//! leaves 21–33 ms. Kicks in the workers themselves had made it slower,
//! since a worker then waited for the disk's queue. Only the bulk copy's
//! pages are kicked (the session decides): a page written back is
//! write-protected again, and the rounds after the bulk carry pages the
//! process rewrites, each of which would then take a fault on its next
//! copy, in the downtime too.

use std::collections::BTreeSet;
use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, Sender};

/// Bytes handed to the workers between two kicks (64 MiB helped less here:
/// the thread then wrote in long bursts and fell behind).
pub const KICK_EVERY: u64 = 16 << 20;

/// The writeback thread's handle. [`Writeback::finish`] waits for it and
/// says whether a write failed; dropping it instead (a receiver giving up)
/// tells the thread to stop and leaves it to end on its own.
pub struct Writeback {
    kicks: Option<Sender<Vec<File>>>,
    thread: Option<JoinHandle<()>>,
    /// The first error a flush returned. The thread's descriptors share
    /// their open files with the image's own (dup), and the kernel reports
    /// a writeback error once per open file: once the thread has seen it,
    /// the commit's sync would not, so it is kept here for the commit.
    failed: Arc<Mutex<Option<std::io::Error>>>,
    stop: Arc<AtomicBool>,
    pending: u64,
    /// Regions (indices in the current table) handed pages since the
    /// last kick: only their files are duplicated for the thread, so a
    /// process of many mappings does not cost as many descriptors.
    touched: BTreeSet<u32>,
}

impl Writeback {
    /// Start the thread (none if it cannot start: the commit's sync then
    /// writes everything, as without it).
    pub fn spawn() -> Writeback {
        let (tx, rx) = bounded::<Vec<File>>(1);
        let failed = Arc::new(Mutex::new(None));
        let stop = Arc::new(AtomicBool::new(false));
        let (seen, stopped) = (failed.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("writeback".into())
            .spawn(move || {
                for files in rx.iter() {
                    files.iter().for_each(super::staging::start_writeback);
                    // Then wait for it and flush the device's cache: a
                    // disk that caches writes (a VM's virtual disk: the
                    // host's page cache) otherwise keeps the whole image
                    // for the commit's one flush to write out.
                    for f in &files {
                        if stopped.load(Ordering::Relaxed) {
                            return;
                        }
                        if let Err(e) = f.sync_data() {
                            let mut first = seen.lock().unwrap_or_else(|p| p.into_inner());
                            first.get_or_insert(e);
                        }
                    }
                }
            })
            .ok();
        Writeback {
            kicks: thread.as_ref().map(|_| tx),
            thread,
            failed,
            stop,
            pending: 0,
            touched: BTreeSet::new(),
        }
    }

    /// `bytes` more of `region` were handed to the workers. At each kick
    /// `dup` gives the file of each region touched since the last one as a
    /// duplicated descriptor, so that a region removed meanwhile is freed
    /// only once the thread is done with it. A kick that finds the thread
    /// busy duplicates nothing and waits for the next.
    pub fn handed(&mut self, region: u32, bytes: u64, dup: impl Fn(u32) -> Option<File>) {
        self.pending += bytes;
        self.touched.insert(region);
        if self.pending < KICK_EVERY {
            return;
        }
        let Some(tx) = self.kicks.as_ref().filter(|tx| !tx.is_full()) else {
            return;
        };
        let files = self.touched.iter().filter_map(|&r| dup(r)).collect();
        let _ = tx.try_send(files);
        self.pending = 0;
        self.touched.clear();
    }

    /// A new region table: its indices mean other regions. What was
    /// touched before is left to the commit, which writes everything.
    pub fn new_table(&mut self) {
        self.touched.clear();
    }

    /// Before the commit: wait until the thread is done (so that no flush
    /// of its own runs during the commit's) and return the first error a
    /// flush of the image met.
    pub fn finish(&mut self) -> std::io::Result<()> {
        self.kicks = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let mut failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        failed.take().map_or(Ok(()), Err)
    }
}

impl Drop for Writeback {
    /// Not committing: the image is being thrown away, so its flushes are
    /// wasted; the thread stops at its next file and ends by itself (its
    /// descriptors are its own), the receiver does not wait for the disk.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.kicks = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    #[test]
    fn a_failed_flush_is_kept_for_the_commit() {
        // A descriptor whose fdatasync fails: a pipe (EINVAL).
        let (r, _w) = nix::unistd::pipe().unwrap();
        let pipe = File::from(r);
        let mut w = Writeback::spawn();
        w.handed(0, KICK_EVERY, |_| pipe.try_clone().ok());
        assert!(w.finish().is_err(), "the flush's error was lost");
        // Regular files flush without error.
        let dir = std::env::temp_dir().join(format!("procmig-wb-{}", std::process::id()));
        let f = File::create(&dir).unwrap();
        let mut w = Writeback::spawn();
        w.handed(0, KICK_EVERY, |_| f.try_clone().ok());
        assert!(w.finish().is_ok());
        std::fs::remove_file(&dir).unwrap();
    }

    #[test]
    fn a_kick_duplicates_only_the_regions_touched_since_the_last() {
        let mut w = Writeback::spawn();
        let asked = RefCell::new(Vec::new());
        let dup = |r: u32| {
            asked.borrow_mut().push(r);
            None
        };
        w.handed(7, 1 << 20, dup);
        w.handed(2, 1 << 20, dup);
        w.handed(7, 1 << 20, dup);
        assert!(
            asked.borrow().is_empty(),
            "no kick before {KICK_EVERY} bytes"
        );
        w.handed(4, KICK_EVERY, dup);
        assert_eq!(*asked.borrow(), vec![2, 4, 7]);
        // After a new table the old indices mean nothing.
        w.handed(5, 1 << 20, dup);
        w.new_table();
        w.handed(1, 1 << 20, dup);
        assert_eq!(w.touched.iter().copied().collect::<Vec<_>>(), vec![1]);
    }
}
