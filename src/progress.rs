//! Progress on stderr while a migration runs: a bar on a terminal
//! (indicatif), or plain periodic lines for logs (`--progress` when stderr
//! is not a terminal). What is shown comes from a [`ProgressSource`] read
//! at each refresh, so the display never holds state of its own.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Display {
    /// A bar redrawn in place (stderr is a terminal).
    Bar,
    /// One line every few seconds (stderr is a file or a pipe).
    Lines,
}

impl Display {
    /// The bar on a terminal; lines elsewhere when asked for; else none.
    pub fn choose(is_terminal: bool, asked: bool) -> Option<Display> {
        match (is_terminal, asked) {
            (true, _) => Some(Display::Bar),
            (false, true) => Some(Display::Lines),
            (false, false) => None,
        }
    }
}

/// One reading of a migration's progress.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Reading {
    /// Phase or round, shown first ("bulk", "round 3", "downtime").
    pub stage: String,
    /// How far the stage is, 0..=1, when that is known.
    pub fraction: Option<f64>,
    /// Everything else, in words and numbers.
    pub message: String,
}

/// Where a display reads its progress. `wire_rate` is the rate measured
/// by the display between two readings (bytes/s).
pub trait ProgressSource: Send + 'static {
    fn read(&self, wire_rate: f64) -> Reading;
    /// Bytes put on or taken off the wire so far.
    fn wire_bytes(&self) -> u64;
}

pub struct Progress {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

const BAR_REFRESH: Duration = Duration::from_millis(250);
const LINE_EVERY: Duration = Duration::from_secs(2);

impl Progress {
    /// Start showing `source` as `display`, from one second on (short runs
    /// show nothing).
    pub fn start(label: &'static str, display: Display, source: impl ProgressSource) -> Progress {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::Builder::new()
            .name("progress".into())
            .spawn(move || run(label, display, &source, &flag))
            .ok();
        Progress { stop, handle }
    }

    /// Stop and clear the bar.
    pub fn finish(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn run(label: &str, display: Display, source: &impl ProgressSource, stop: &AtomicBool) {
    let t0 = Instant::now();
    let every = match display {
        Display::Bar => BAR_REFRESH,
        Display::Lines => LINE_EVERY,
    };
    let mut bar: Option<ProgressBar> = None;
    let (mut last_t, mut last_wire) = (t0, 0u64);
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(BAR_REFRESH);
        let now = Instant::now();
        if now - t0 < Duration::from_secs(1) || now - last_t < every {
            continue;
        }
        let wire = source.wire_bytes();
        let rate = (wire - last_wire.min(wire)) as f64 / (now - last_t).as_secs_f64();
        (last_t, last_wire) = (now, wire);
        let r = source.read(rate);
        match display {
            Display::Lines => eprintln!("{}", line(label, &r)),
            Display::Bar => draw(bar.get_or_insert_with(|| new_bar(label)), &r),
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
}

fn new_bar(label: &str) -> ProgressBar {
    let b = ProgressBar::with_draw_target(Some(1000), ProgressDrawTarget::stderr());
    let style = ProgressStyle::with_template(&format!(
        "{label} {{prefix:>9}} [{{bar:24}}] {{percent:>3}}% {{wide_msg}}"
    ))
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    b.set_style(style);
    b
}

fn draw(b: &ProgressBar, r: &Reading) {
    b.set_prefix(r.stage.clone());
    // Never past the end: a stage's fraction is clamped, and a stage with
    // no known end shows an empty bar.
    b.set_position((r.fraction.unwrap_or(0.0).clamp(0.0, 1.0) * 1000.0) as u64);
    b.set_message(r.message.clone());
}

/// The plain-text form of a reading.
pub fn line(label: &str, r: &Reading) -> String {
    match r.fraction {
        Some(f) => format!(
            "{label}: {} {:.0}%: {}",
            r.stage,
            f.clamp(0.0, 1.0) * 100.0,
            r.message
        ),
        None => format!("{label}: {}: {}", r.stage, r.message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_never_pass_100_percent() {
        let r = Reading {
            stage: "bulk".into(),
            fraction: Some(1.3),
            message: "x".into(),
        };
        assert_eq!(line("send", &r), "send: bulk 100%: x");
        let r = Reading {
            fraction: None,
            ..r
        };
        assert_eq!(line("send", &r), "send: bulk: x");
        assert_eq!(Display::choose(false, false), None);
        assert_eq!(Display::choose(false, true), Some(Display::Lines));
        assert_eq!(Display::choose(true, false), Some(Display::Bar));
    }
}
