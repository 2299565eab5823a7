//! Convergence: when to stop iterating, and auto-converge, which throttles
//! a process that dirties memory faster than the link drains it.
//!
//! The throttle is a SIGSTOP/SIGCONT duty cycle over a 100 ms period
//! (QEMU throttles vCPUs the same way, by sleeping them a share of each
//! period). It needs no privilege and no cgroup; its side effect is that a
//! parent waiting with WUNTRACED sees the stops.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// QEMU's names and defaults.
#[derive(Debug, Clone, Copy)]
pub struct ThrottleParams {
    /// throttle-trigger-threshold: % of transferred bytes that dirty bytes
    /// in a round must exceed (twice in a row) to throttle.
    pub trigger_threshold: u32,
    /// cpu-throttle-initial.
    pub initial: u32,
    /// cpu-throttle-increment.
    pub increment: u32,
    /// max-cpu-throttle.
    pub max: u32,
}

impl Default for ThrottleParams {
    fn default() -> Self {
        ThrottleParams {
            trigger_threshold: 50,
            initial: 20,
            increment: 10,
            max: 99,
        }
    }
}

/// Auto-converge bookkeeping, as QEMU's mig_throttle_guest_down logic.
#[derive(Debug, Default)]
pub struct AutoConverge {
    high_rounds: u32,
    pub percent: u32,
}

impl AutoConverge {
    /// After a round that transferred `sent` bytes while `dirtied` bytes
    /// were dirtied: returns the new throttle percentage if it changed.
    pub fn update(&mut self, p: &ThrottleParams, dirtied: u64, sent: u64) -> Option<u32> {
        if dirtied as f64 > sent as f64 * p.trigger_threshold as f64 / 100.0 {
            self.high_rounds += 1;
            if self.high_rounds >= 2 {
                self.high_rounds = 0;
                let next = if self.percent == 0 {
                    p.initial
                } else {
                    (self.percent + p.increment).min(p.max)
                };
                if next != self.percent {
                    self.percent = next;
                    return Some(next);
                }
            }
        } else {
            self.high_rounds = 0;
        }
        None
    }
}

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

/// An expected downtime this short is not worth another round.
pub const NOT_WORTH_A_ROUND: Duration = Duration::from_millis(2);

/// Expected downtime for `dirty_bytes` at `wire_rate` bytes/s, given the
/// compression ratio seen so far.
pub fn expected_downtime(dirty_bytes: u64, ratio: f64, wire_rate: f64) -> Duration {
    if wire_rate <= 0.0 {
        return Duration::MAX;
    }
    let wire = dirty_bytes as f64 / ratio.max(1.0);
    Duration::from_secs_f64(wire / wire_rate)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_converge_steps_like_qemu() {
        let p = ThrottleParams::default();
        let mut a = AutoConverge::default();
        assert_eq!(a.update(&p, 100, 100), None); // first high round
        assert_eq!(a.update(&p, 100, 100), Some(20)); // second: initial
        assert_eq!(a.update(&p, 10, 100), None); // low round resets
        assert_eq!(a.update(&p, 100, 100), None);
        assert_eq!(a.update(&p, 100, 100), Some(30));
        for _ in 0..40 {
            a.update(&p, 100, 100);
        }
        assert_eq!(a.percent, 99);
    }

    #[test]
    fn downtime_estimate() {
        let d = expected_downtime(100 << 20, 4.0, (25 << 20) as f64);
        assert_eq!(d, Duration::from_secs(1));
        assert_eq!(expected_downtime(1, 1.0, 0.0), Duration::MAX);
    }
}
