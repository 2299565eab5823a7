//! Dirty trackers against a real writer: every page the agent rewrites
//! between two collections must be reported.

mod common;

use std::time::Duration;

use common::*;
use procmig::dirty::{self, probe, Tracking};
use procmig::process::{self, Attachment, Leave, MemReader};

/// Offset of the agent's `writes` counter in its header page.
const WRITES_OFFSET: u64 = 96;

fn writes(mem: &MemReader, base: u64) -> u64 {
    let mut b = [0u8; 8];
    mem.read(base + WRITES_OFFSET, &mut b).unwrap();
    u64::from_le_bytes(b)
}

fn methods() -> Vec<Tracking> {
    let k = probe::probe();
    let mut v = vec![Tracking::Compare];
    match &k.uffd_wp_async {
        Ok(()) => v.push(Tracking::UffdWp),
        Err(why) => println!("skipped: uffd-wp: {why}"),
    }
    match &k.soft_dirty {
        Ok(()) => v.push(Tracking::SoftDirty),
        Err(why) => println!("skipped: soft-dirty on this kernel (the VM test covers it): {why}"),
    }
    v
}

#[test]
fn trackers_see_every_rewrite() {
    for method in methods() {
        // A small working set rewritten fast: most pages get written.
        let agent = Agent::start(&[
            "--size",
            "8M",
            "--profile",
            "text",
            "--dirty-rate",
            "5000",
            "--working-set",
            "2M",
        ]);
        let ps = process::page_size();
        let mem = MemReader::open(agent.pid).unwrap();
        let regions = process::read_regions(agent.pid).unwrap();
        let mut tracker = dirty::create(method, agent.pid, ps).unwrap();
        let mut att = Attachment::seize(agent.pid).unwrap();
        att.stop().unwrap();
        tracker.arm(&mut att, &regions).unwrap();
        att.detach(Leave::AsFound).unwrap();
        // compare needs to know what was "sent": hand it the current pages.
        if method == Tracking::Compare {
            for r in &regions {
                let mut data = vec![0u8; r.len() as usize];
                if mem.read(r.start, &mut data).is_ok() {
                    let runs = procmig::pages::runs_from_pages(0..r.len() / ps);
                    tracker.sent(r, &runs, &data, ps);
                }
            }
        }
        let before = writes(&mem, agent.base);
        std::thread::sleep(Duration::from_millis(400));
        // Stop so that the ledger and the report describe the same instant.
        let mut att = Attachment::seize(agent.pid).unwrap();
        att.stop().unwrap();
        let after = writes(&mem, agent.base);
        let d = tracker.collect(Some(&mut att), &regions, &[]).unwrap();
        tracker.finish(Some(&mut att));
        att.detach(Leave::AsFound).unwrap();
        let i = regions
            .iter()
            .position(|r| r.start <= agent.base && agent.base < r.end)
            .unwrap();
        let data_pages: u64 = d.runs[i].iter().map(|r| r.count as u64).sum();
        let rewrites = after - before;
        assert!(
            rewrites > 500,
            "{method}: agent wrote only {rewrites} pages"
        );
        // 2 MiB = 512 pages rewritten ~2000 times: nearly all are dirty,
        // plus the header and ledger pages.
        assert!(
            data_pages >= 400,
            "{method}: {data_pages} dirty pages reported after {rewrites} rewrites"
        );
        assert!(
            data_pages <= 512 + 16,
            "{method}: {data_pages} dirty pages for a 512-page working set"
        );
        println!("{method}: {rewrites} rewrites, {data_pages} dirty pages");
    }
}
