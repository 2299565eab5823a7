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

    /// `procmig ARGS` inside network namespace `ns` (only that: `ip netns
    /// exec` would give it a mount namespace of its own too, and restore
    /// refuses a process in another namespace than procmig's).
    fn procmig(&self, ns: &str, args: &[&str]) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.var(ns)))
            .arg(procmig())
            .args(args);
        c
    }

    /// The veth of the source side up or down.
    fn link(&self, up: bool) {
        let st = Command::new("ip")
            .args([
                "-n",
                self.var("NETLAB_SRC_NS"),
                "link",
                "set",
                self.var("NETLAB_SRC_IF"),
                if up { "up" } else { "down" },
            ])
            .status()
            .unwrap();
        assert!(st.success());
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
    lab.link(false);
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

/// Post-copy over a veth that goes down: the sender gives up (exit 3,
/// printing the command that finishes the migration), the receiver pauses
/// with the restored agent running; the link comes back, `send --resume`
/// brings the missing pages over a new connection, and the restored
/// agent's memory checks out page by page.
#[test]
fn post_copy_paused_by_a_dead_link_is_resumed_over_a_new_connection() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    use std::time::{Duration, Instant};
    if !can_restore("netlab post-copy recovery") {
        return;
    }
    let Some(lab) = Lab::up("100mbit") else {
        return;
    };
    let src_ns = lab.var("NETLAB_SRC_NS").to_string();
    let agent = Agent::start_in(
        Some(&src_ns),
        &[
            "--size",
            "32M",
            "--profile",
            "random",
            "--dirty-rate",
            "5000",
        ],
    );
    let dir = TempDir::new("netlab-resume");
    let img = dir.join("img");
    let dst = format!("{}:4444", lab.var("NETLAB_DST_ADDR"));
    let mut recv = lab
        .procmig(
            "NETLAB_DST_NS",
            &[
                "recv",
                "--listen",
                &dst,
                "--restore",
                "--json",
                "--timeout",
                "3s",
                "--recover-timeout",
                "60s",
                "--out",
                img.to_str().unwrap(),
            ],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let recv_pid = recv.id() as i32;
    // The receiver's stderr, line by line as it comes.
    let (tx, lines) = std::sync::mpsc::channel::<String>();
    let err = BufReader::new(recv.stderr.take().unwrap());
    std::thread::spawn(move || {
        for l in err.lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let first = lines.recv_timeout(Duration::from_secs(30)).unwrap();
    assert!(first.contains("listening"), "{first}");
    let pid = agent.pid.to_string();
    let send = lab
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
                "--postcopy-after",
                "0",
                "--max-bandwidth",
                "2M",
            ],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Post-copy runs (32 MiB of random bytes at 2 MB/s: many seconds).
    let restored = wait_for_child_running(recv_pid);
    let _killed_at_the_end = Pid(restored);
    std::thread::sleep(Duration::from_millis(500));
    lab.link(false);
    let cut = Instant::now();
    let out = send.wait_with_output().unwrap();
    let serr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{serr}");
    let mut paused = None;
    while paused.is_none() && cut.elapsed() < Duration::from_secs(60) {
        if let Ok(l) = lines.recv_timeout(Duration::from_millis(200)) {
            if l.contains("post-copy paused") {
                paused = Some(cut.elapsed());
            }
        }
    }
    println!("dead link in post-copy: sender gave up, receiver paused after {paused:?}");
    assert!(paused.is_some(), "the receiver did not pause");
    assert_running(restored);
    assert!(!img.exists());
    let token = resume_token(&serr);
    lab.link(true);
    let r = lab
        .procmig(
            "NETLAB_SRC_NS",
            &[
                "send",
                "--resume",
                &token,
                "--pid",
                &pid,
                "--to",
                &dst,
                "--timeout",
                "10s",
            ],
        )
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", text(&r.stderr));
    let st = recv.wait().unwrap();
    let mut rout = String::new();
    std::io::Read::read_to_string(recv.stdout.as_mut().unwrap(), &mut rout).unwrap();
    assert!(st.success(), "{rout}");
    let rj: serde_json::Value = serde_json::from_str(&rout).unwrap();
    assert_eq!(rj["postcopy"]["pauses"], 1, "{rj}");
    let (ok, v) = agent_verify(&img);
    assert!(ok, "image after a resumed post-copy: {v}");
    // The restored agent (in the destination's namespace) migrated once
    // more, there, into an image its own ledger checks.
    std::thread::sleep(Duration::from_millis(300));
    let again = dir.join("again");
    let mut recv2 = lab
        .procmig(
            "NETLAB_DST_NS",
            &[
                "recv",
                "--listen",
                "127.0.0.1:4455",
                "--out",
                again.to_str().unwrap(),
            ],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let rp = restored.to_string();
    let s2 = lab
        .procmig(
            "NETLAB_DST_NS",
            &[
                "send",
                "--pid",
                &rp,
                "--to",
                "127.0.0.1:4455",
                "--on-complete",
                "resume",
                "--max-iterations",
                "2",
                "--force-downtime",
            ],
        )
        .output()
        .unwrap();
    assert!(s2.status.success(), "{}", text(&s2.stderr));
    assert!(recv2.wait().unwrap().success());
    let (ok, v) = agent_verify(&again);
    assert!(ok, "the restored agent's memory: {v}");
}
