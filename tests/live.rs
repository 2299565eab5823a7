//! Live pre-copy migrations of busy, changing processes, checked byte for
//! byte and by the agent's own ledger.

mod common;

use common::*;
use procmig::dirty::{probe, Tracking};

/// Trackers this kernel supports (soft-dirty is covered by tests/vm.rs).
fn trackers() -> Vec<&'static str> {
    let k = probe::probe();
    let mut v = vec!["compare"];
    match k.uffd_wp_async {
        Ok(()) => v.push("uffd-wp"),
        Err(why) => println!("skipped: uffd-wp live test: {why}"),
    }
    if let Err(why) = k.soft_dirty {
        println!("skipped: soft-dirty live test on this kernel (tests/vm.rs covers it): {why}");
    } else {
        v.push("soft-dirty");
    }
    let _ = Tracking::Auto;
    v
}

struct Outcome {
    report: serde_json::Value,
    agent: Agent,
    image: std::path::PathBuf,
    _dir: TempDir,
}

/// Migrate live; assert success and both checks; return the report.
fn live(agent_args: &[&str], send_args: &[&str]) -> Outcome {
    let agent = Agent::start(agent_args);
    let dir = TempDir::new("live");
    let out = dir.join("img");
    let recv = Recv::start(&out, &[]);
    let mut args = vec!["--json", "--mode", "live"];
    args.extend_from_slice(send_args);
    let sent = send(agent.pid, &recv, &args);
    let (ok, _, err) = recv.wait();
    assert!(
        sent.status.success(),
        "send {send_args:?}: {}",
        text(&sent.stderr)
    );
    assert!(ok, "recv: {err}");
    let report: serde_json::Value = serde_json::from_slice(&sent.stdout).unwrap();
    assert_eq!(uffd_wp_vmas(agent.pid), 0, "write-protect left registered");
    check_image(&agent, &out, &format!("{send_args:?}: {report}"));
    Outcome {
        report,
        agent,
        image: out,
        _dir: dir,
    }
}

#[test]
fn busy_agent_every_tracker() {
    for t in trackers() {
        // 20000 rewrites/s (plus kernel-mode writes into tracked pages) on a
        // link capped so that the bulk copy takes a while.
        let o = live(
            &[
                "--size",
                "32M",
                "--profile",
                "mixed",
                "--dirty-rate",
                "20000",
                "--threads",
                "2",
                "--kernel-writes",
                "300",
            ],
            &[
                "--dirty-tracking",
                t,
                "--max-bandwidth",
                "40M",
                "--downtime-limit",
                "200ms",
                // Convergence depends on the machine's speed (it may be
                // loaded): bound the rounds and always complete.
                "--max-iterations",
                "6",
                "--force-downtime",
            ],
        );
        let r = &o.report;
        assert_eq!(r["mode"], "live");
        assert_eq!(r["dirty_tracking"], t);
        let rounds = r["rounds"].as_array().unwrap();
        assert!(rounds.len() >= 2, "{t}: {r}");
        // Pages written during the bulk copy were found and sent again.
        let resent: u64 = rounds[1..]
            .iter()
            .map(|x| x["pages_sent"].as_u64().unwrap())
            .sum();
        assert!(
            resent > 1000,
            "{t}: only {resent} pages resent after the bulk copy"
        );
        assert!(r["dirty_sync_count"].as_u64().unwrap() >= 2);
    }
}

#[test]
fn rewriting_the_same_pages_every_round() {
    // A hot set rewritten ~100 times per second per page: every round
    // carries new copies of the same pages; an older copy applied after a
    // newer one would show up as a stale page.
    let o = live(
        &[
            "--size",
            "16M",
            "--profile",
            "text",
            "--dirty-rate",
            "40000",
            "--hot-pages",
            "300",
            "--threads",
            "3",
        ],
        &[
            "--max-bandwidth",
            "30M",
            "--compress-threads",
            "3",
            "--batch-pages",
            "4",
            "--downtime-limit",
            "1ms",
            "--max-iterations",
            "8",
            "--force-downtime",
        ],
    );
    let rounds = o.report["rounds"].as_array().unwrap();
    assert!(rounds.len() >= 3, "{}", o.report);
}

#[test]
fn mappings_and_threads_change_during_migration() {
    let o = live(
        &[
            "--size",
            "16M",
            "--profile",
            "mixed",
            "--dirty-rate",
            "5000",
            "--churn",
            "300",
            "--dontneed-rate",
            "300",
            "--threads",
            "2",
        ],
        &[
            "--max-bandwidth",
            "20M",
            "--downtime-limit",
            "100ms",
            "--max-iterations",
            "5",
            "--force-downtime",
        ],
    );
    assert!(o.report["rounds"].as_array().unwrap().len() >= 2);
    // The image holds more than the agent's own region: the churn mappings.
    let img = procmig::image::Image::open(&o.image).unwrap();
    assert!(img.manifest.regions.len() > 3);
    drop(o.agent);
}

#[test]
fn process_exits_mid_migration() {
    let agent = Agent::start(&[
        "--size",
        "64M",
        "--profile",
        "random",
        "--dirty-rate",
        "1000",
        "--exit-after",
        "1",
    ]);
    let dir = TempDir::new("exit");
    let recv = Recv::start(&dir.join("img"), &[]);
    let sent = send(
        agent.pid,
        &recv,
        &["--max-bandwidth", "8M", "--compress", "none"],
    );
    assert_one_line_error(&sent, "exited");
    let (ok, _, err) = recv.wait();
    assert!(!ok);
    assert!(err.contains("exited"), "receiver said: {err}");
    assert!(dir.entries().is_empty(), "left behind: {:?}", dir.entries());
}

/// A writer far faster than the link.
const FAST_WRITER: [&str; 8] = [
    "--size",
    "48M",
    "--profile",
    "random",
    "--dirty-rate",
    "60000",
    "--threads",
    "2",
];
const SLOW_LINK: [&str; 8] = [
    "--max-bandwidth",
    "20M",
    "--max-iterations",
    "4",
    "--downtime-limit",
    "20ms",
    "--compress",
    "lz4",
];

#[test]
fn no_convergence_is_an_error_and_the_process_runs_on() {
    let agent = Agent::start(&FAST_WRITER);
    let dir = TempDir::new("noconv");
    let recv = Recv::start(&dir.join("img"), &[]);
    let sent = send(agent.pid, &recv, &SLOW_LINK);
    assert_one_line_error(&sent, "does not converge");
    assert_running(agent.pid);
    assert_eq!(uffd_wp_vmas(agent.pid), 0, "write-protect left registered");
    let (ok, _, _) = recv.wait();
    assert!(!ok);
    assert!(dir.entries().is_empty(), "left behind: {:?}", dir.entries());
}

#[test]
fn no_convergence_with_force_downtime_completes() {
    let mut args = SLOW_LINK.to_vec();
    args.push("--force-downtime");
    let o = live(&FAST_WRITER, &args);
    assert_eq!(
        o.report["rounds"].as_array().unwrap().len(),
        6,
        "bulk + 4 + final"
    );
}

#[test]
fn auto_converge_throttles() {
    let args = [
        "--max-bandwidth",
        "20M",
        "--max-iterations",
        "12",
        "--downtime-limit",
        "20ms",
        "--compress",
        "lz4",
        "--auto-converge",
    ];
    let o = live(&FAST_WRITER, &args);
    let pct = o.report["cpu_throttle_percentage"].as_u64().unwrap();
    assert!(pct >= 20, "throttle {pct}: {}", o.report);
}

#[test]
fn no_convergence_is_known_early_and_reported_as_json() {
    // No --max-iterations: procmig gives up after a few rounds in which
    // the writer outran the link, not after 30, and --json still prints
    // a report with every round so far.
    let agent = Agent::start(&FAST_WRITER);
    let dir = TempDir::new("early");
    let recv = Recv::start(&dir.join("img"), &["--json"]);
    let sent = send(
        agent.pid,
        &recv,
        &[
            "--max-bandwidth",
            "20M",
            "--downtime-limit",
            "20ms",
            "--compress",
            "lz4",
            "--json",
        ],
    );
    assert_one_line_error(&sent, "does not converge");
    let report: serde_json::Value = serde_json::from_slice(&sent.stdout).unwrap();
    assert_eq!(report["status"], "failed", "{report}");
    assert_eq!(report["failed_in"], "active", "{report}");
    assert!(report["error"]
        .as_str()
        .unwrap()
        .contains("--auto-converge"));
    let rounds = report["rounds"].as_array().unwrap();
    // The bulk round and at most 3 (+1 for a fluke) iterate rounds.
    assert!(
        (2..=5).contains(&rounds.len()),
        "{} rounds: {report}",
        rounds.len()
    );
    assert!(report["transferred"].as_u64().unwrap() > 0);
    assert_running(agent.pid);
    assert_eq!(uffd_wp_vmas(agent.pid), 0, "write-protect left registered");
    let (ok, out, _) = recv.wait();
    assert!(!ok);
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["status"], "failed", "{r}");
    assert!(dir.entries().is_empty(), "left behind: {:?}", dir.entries());
}
