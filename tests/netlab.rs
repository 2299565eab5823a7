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

/// A lab brought up with `netlab up`, taken down on drop.
struct Lab(std::collections::HashMap<String, String>);

impl Lab {
    fn up(rate: &str) -> Option<Lab> {
        let out = Command::new("bash")
            .arg(netlab())
            .args(["up", "--rate", rate])
            .output()
            .expect("run scripts/netlab");
        if out.status.code() == Some(77) {
            println!("skipped: {}", text(&out.stdout).trim());
            return None;
        }
        assert!(out.status.success(), "netlab up: {}", text(&out.stderr));
        let vars = text(&out.stdout)
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.trim_matches('\'').to_string()))
            .collect();
        Some(Lab(vars))
    }

    fn var(&self, k: &str) -> &str {
        self.0
            .get(k)
            .unwrap_or_else(|| panic!("netlab up printed no {k}"))
    }

    /// `procmig ARGS` inside namespace `ns`.
    fn procmig(&self, ns: &str, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", self.var(ns)])
            .arg(procmig())
            .args(args);
        c
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(netlab())
            .args(["down", self.var("NETLAB_ID")])
            .output();
    }
}

/// The veth taken down in the middle of the bulk copy: no close, no
/// reset, only silence. Both sides must give up within --timeout (TCP
/// keepalive, TCP_USER_TIMEOUT and the frame deadline), the source running
/// on untraced and nothing committed.
#[test]
fn a_dead_link_ends_both_sides_and_the_source_runs_on() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    use std::time::{Duration, Instant};
    let Some(lab) = Lab::up("100mbit") else {
        return;
    };
    let agent = Agent::start(&[
        "--size",
        "64M",
        "--profile",
        "random",
        "--dirty-rate",
        "2000",
    ]);
    let dir = TempDir::new("netlab-dead");
    let img = dir.join("img");
    let dst = format!("{}:4444", lab.var("NETLAB_DST_ADDR"));
    let mut recv = lab
        .procmig(
            "NETLAB_DST_NS",
            &[
                "recv",
                "--listen",
                &dst,
                "--timeout",
                "3s",
                "--out",
                img.to_str().unwrap(),
            ],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut recv_err = BufReader::new(recv.stderr.take().unwrap());
    let mut line = String::new();
    recv_err.read_line(&mut line).unwrap();
    assert!(line.contains("listening"), "{line}");
    let pid = agent.pid.to_string();
    let mut send = lab
        .procmig(
            "NETLAB_SRC_NS",
            &[
                "send",
                "--pid",
                &pid,
                "--to",
                &dst,
                "--timeout",
                "3s",
                "--max-bandwidth",
                "4M",
            ],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Well into the bulk copy (64 MiB of random bytes at 4 MB/s).
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        send.try_wait().unwrap().is_none(),
        "the migration ended early"
    );
    let down = Command::new("ip")
        .args([
            "-n",
            lab.var("NETLAB_SRC_NS"),
            "link",
            "set",
            lab.var("NETLAB_SRC_IF"),
            "down",
        ])
        .status()
        .unwrap();
    assert!(down.success());
    let cut = Instant::now();
    let bound = Duration::from_secs(60);
    let mut ended = [None, None];
    while ended.iter().any(Option::is_none) && cut.elapsed() < bound {
        for (i, c) in [&mut send, &mut recv].into_iter().enumerate() {
            if ended[i].is_none() && c.try_wait().unwrap().is_some() {
                ended[i] = Some(cut.elapsed());
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = send.kill();
    let _ = recv.kill();
    let _ = recv.wait();
    let st = send.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(send.stderr.as_mut().unwrap(), &mut err).unwrap();
    let mut rerr = String::new();
    std::io::Read::read_to_string(&mut recv_err, &mut rerr).unwrap();
    println!(
        "dead link: sender gave up after {:?}, receiver after {:?}",
        ended[0], ended[1]
    );
    assert!(
        ended[0].is_some(),
        "the sender still waits {bound:?} after the link died"
    );
    assert!(
        ended[1].is_some(),
        "the receiver still waits {bound:?} after the link died"
    );
    assert_eq!(st.code(), Some(2), "sender: {err}");
    assert!(
        !err.contains("panicked") && !rerr.contains("panicked"),
        "{err}{rerr}"
    );
    assert!(!img.exists(), "a dead link committed an image");
    assert_running(agent.pid);
    assert_eq!(uffd_wp_vmas(agent.pid), 0);
}
