//! auto-converge's throttle: a SIGSTOP/SIGCONT duty cycle over a 100 ms
//! period (QEMU throttles vCPUs the same way, by sleeping them a share of
//! each period). It needs no privilege and no cgroup; its side effect is
//! that a parent waiting with WUNTRACED sees the stops.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// A running SIGSTOP/SIGCONT duty cycle on a process.
pub struct Throttle {
    pct: Arc<AtomicU32>,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

const PERIOD: Duration = Duration::from_millis(100);

impl Throttle {
    pub fn start(pid: i32) -> Throttle {
        let pct = Arc::new(AtomicU32::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (pct.clone(), stop.clone());
        let handle = std::thread::Builder::new()
            .name("throttle".into())
            .spawn(move || {
                let pid = Pid::from_raw(pid);
                while !s.load(Ordering::Relaxed) {
                    let pct = p.load(Ordering::Relaxed).min(99);
                    if pct == 0 {
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                    let off = PERIOD * pct / 100;
                    if kill(pid, Signal::SIGSTOP).is_err() {
                        return;
                    }
                    std::thread::sleep(off);
                    let _ = kill(pid, Signal::SIGCONT);
                    std::thread::sleep(PERIOD - off);
                }
            })
            .ok();
        Throttle { pct, stop, handle }
    }

    pub fn set(&self, percent: u32) {
        self.pct.store(percent, Ordering::Relaxed);
    }

    /// End the duty cycle, leaving the process running.
    pub fn finish(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        self.finish();
    }
}
