//! A migration across an emulated 100 Mbit/s link: scripts/netlab puts the
//! receiver and the sender in two network namespaces joined by a veth pair
//! shaped with tbf. Needs root for `ip netns`; prints `skipped: why`
//! without it (netlab exits 77).

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

/// 100 Mbit/s carries at most 100 Mbit/s of frames, about 96 Mbit/s of TCP
/// payload; a migration that reports more than this did not cross the
/// shaped link.
const LINK_CEILING_MBPS: f64 = 110.0;

fn netlab() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/netlab")
}

/// `s` as one word for `bash -c`.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn read(dir: &TempDir, name: &str) -> String {
    std::fs::read_to_string(dir.join(name)).unwrap_or_default()
}

#[test]
fn migrate_across_a_shaped_100mbit_link() {
    let agent = Agent::start(&["--size", "32M", "--profile", "text", "--dirty-rate", "2000"]);
    let dir = TempDir::new("netlab");
    let img = dir.join("img");
    let procmig = sh_quote(procmig().to_str().unwrap());
    let recv = format!(
        "exec {procmig} recv --listen {{dst}}:4444 --out {} --json",
        sh_quote(img.to_str().unwrap())
    );
    let send = format!(
        "exec {procmig} send --pid {} --to {{dst}}:4444 --json --compress zstd --max-iterations 5 --force-downtime",
        agent.pid
    );
    let out = Command::new("bash")
        .arg(netlab())
        .args(["run", "--rate", "100mbit", "--timeout", "300", "--out"])
        .arg(dir.path())
        .args(["--recv", &recv, "--send", &send])
        .output()
        .expect("run scripts/netlab");
    let stdout = text(&out.stdout);
    if out.status.code() == Some(77) {
        let why = stdout
            .lines()
            .find_map(|l| l.strip_prefix("skipped: "))
            .unwrap_or("netlab cannot build its lab here");
        println!("skipped: {why}");
        return;
    }
    assert!(
        out.status.success(),
        "netlab run failed ({:?}): {}\nsend: {}\nrecv: {}\nqdisc: {}",
        out.status,
        text(&out.stderr),
        read(&dir, "send.stderr"),
        read(&dir, "recv.stderr"),
        read(&dir, "tc.txt")
    );

    let sent: serde_json::Value = serde_json::from_str(&read(&dir, "send.stdout")).unwrap();
    let got: serde_json::Value = serde_json::from_str(&read(&dir, "recv.stdout")).unwrap();
    assert_eq!(sent["status"], "completed");
    assert_eq!(sent["normal"], got["normal"]);

    // The wire rate, seen from both ends: the receiver's bytes over its
    // transfer time, and the sender's bytes over the whole migration.
    let recv_mbps = got["throughput_mbps"].as_f64().unwrap();
    let bytes = sent["transferred"].as_f64().unwrap();
    let secs = sent["total_time_ms"].as_f64().unwrap() / 1000.0;
    let send_mbps = bytes * 8.0 / 1e6 / secs;
    println!(
        "netlab 100mbit: {:.1} MB in {secs:.2} s: sender {send_mbps:.1} Mbit/s, receiver {recv_mbps:.1} Mbit/s",
        bytes / 1e6
    );
    assert!(
        recv_mbps > 0.0 && recv_mbps < LINK_CEILING_MBPS,
        "receiver saw {recv_mbps:.1} Mbit/s on a 100 Mbit/s link; qdisc: {}",
        read(&dir, "tc.txt")
    );
    assert!(
        send_mbps < LINK_CEILING_MBPS,
        "sender averaged {send_mbps:.1} Mbit/s on a 100 Mbit/s link"
    );
    // The qdisc on the sender's side carried the migration.
    let tc = read(&dir, "tc.txt");
    assert!(tc.contains("tbf"), "no tbf on the link: {tc}");

    check_image(&agent, &img, "a migration across netlab");
    // netlab deleted its namespaces (named in its qdisc report).
    let lab = tc
        .split_whitespace()
        .find(|w| w.starts_with("pmsrc-"))
        .expect("lab name in tc.txt");
    let ns = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(
        !text(&ns.stdout)
            .lines()
            .any(|l| l.split_whitespace().next() == Some(lab)),
        "netlab left {lab} behind"
    );
}
