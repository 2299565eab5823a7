//! A one-line progress display on stderr for runs longer than a second.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::stats::Counters;
use crate::units::human_bytes;

pub struct Progress {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<bool>>,
}

impl Progress {
    /// Show `label`, bytes read of `total` and the wire rate, refreshed
    /// four times a second, starting one second from now.
    pub fn start(label: &'static str, total: u64, counters: Arc<Counters>) -> Progress {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::Builder::new()
            .name("progress".into())
            .spawn(move || {
                let t0 = Instant::now();
                let mut shown = false;
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(250));
                    let el = t0.elapsed();
                    if el < Duration::from_secs(1) || flag.load(Ordering::Relaxed) {
                        continue;
                    }
                    let read = Counters::get(&counters.read_bytes);
                    let wire = Counters::get(&counters.wire_bytes);
                    let pct = if total > 0 {
                        read as f64 * 100.0 / total as f64
                    } else {
                        0.0
                    };
                    let rate = wire as f64 / el.as_secs_f64();
                    eprint!(
                        "\r{label}: {pct:5.1}% of {}  read {}  wire {} ({}/s)   ",
                        human_bytes(total),
                        human_bytes(read),
                        human_bytes(wire),
                        human_bytes(rate as u64)
                    );
                    let _ = std::io::stderr().flush();
                    shown = true;
                }
                shown
            })
            .ok();
        Progress { stop, handle }
    }

    /// Stop and clear the line.
    pub fn finish(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            if h.join().unwrap_or(false) {
                eprint!("\r{:78}\r", "");
            }
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
