//! Cost of one dirty sync per tracker, for scripts/bench:
//!
//!     cargo run --release --example sync_cost -- PID [ROUNDS]
//!
//! Arms every tracker this kernel offers on process PID, lets it run, and
//! prints JSON lines with the time of arm and of each collect.

use std::time::{Duration, Instant};

use procmig::dirty::{self, probe, Tracking};
use procmig::process::{self, Attachment, Leave};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let pid: i32 = args
        .get(1)
        .and_then(|s| s.parse().ok())
        .expect("usage: sync_cost PID [ROUNDS]");
    let rounds: u32 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(3);
    let k = probe::probe();
    let ps = process::page_size();
    for (method, ok) in [
        (Tracking::UffdWp, k.uffd_wp_async.is_ok()),
        (Tracking::SoftDirty, k.soft_dirty.is_ok()),
        (Tracking::Compare, true),
    ] {
        if !ok {
            println!("{{\"tracker\":\"{method}\",\"skipped\":true}}");
            continue;
        }
        let regions = process::read_regions(pid).expect("read maps");
        let total: u64 = regions.iter().map(|r| r.len()).sum();
        let mut tracker = dirty::create(method, pid, ps).expect("tracker");
        let mut att = Attachment::seize(pid).expect("attach");
        att.stop().expect("stop");
        let t = Instant::now();
        tracker.arm(&mut att, &regions).expect("arm");
        let arm = t.elapsed();
        att.detach(Leave::AsFound).expect("detach");
        if method == Tracking::Compare {
            // As a migration would: the bulk copy hands it every page sent.
            let mem = procmig::process::MemReader::open(pid).expect("mem");
            for r in &regions {
                let mut data = vec![0u8; r.len() as usize];
                if mem.read(r.start, &mut data).is_ok() {
                    tracker.sent(
                        r,
                        &procmig::pages::runs_from_pages(0..r.len() / ps),
                        &data,
                        ps,
                    );
                }
            }
        }
        let mut times = Vec::new();
        let mut pages = Vec::new();
        for _ in 0..rounds {
            std::thread::sleep(Duration::from_millis(100));
            let t = Instant::now();
            let d = tracker.collect(None, &regions, &[]).expect("collect");
            times.push(t.elapsed().as_secs_f64() * 1000.0);
            pages.push(d.pages());
        }
        tracker.finish(None);
        println!(
            "{{\"tracker\":\"{method}\",\"bytes\":{total},\"arm_ms\":{:.3},\"collect_ms\":{times:?},\"dirty_pages\":{pages:?}}}",
            arm.as_secs_f64() * 1000.0
        );
    }
}
