//! The QMP control socket (`send --qmp PATH`) driven by the real QEMU
//! client library (`qemu.qmp` from PyPI) and by procmig's own shell
//! clients: follow a migration to completion, lower its bandwidth while it
//! runs, cancel one, and survive bad input.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/programs/qmp_client.py")
}

fn have_qemu_qmp() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import qemu.qmp"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        println!("skipped: the qemu.qmp Python package is not installed (scripts/setup installs it from PyPI)");
    }
    ok
}

/// tests/programs/qmp_client.py with `args`: what it saw, as JSON.
fn qemu_qmp_client(args: &[&str]) -> serde_json::Value {
    let out = Command::new("python3")
        .arg(script())
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "client: {}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `procmig send` of `agent` to `recv` serving QMP on `sock`, with
/// `extra` options; its report and errors piped.
fn send_with_qmp(agent: &Agent, recv: &Recv, sock: &Path, extra: &[&str]) -> Child {
    Command::new(procmig())
        .args([
            "send",
            "--pid",
            &agent.pid.to_string(),
            "--to",
            &recv.addr(),
        ])
        .arg("--qmp")
        .arg(sock)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// The options of the plain cases: raw pages, the agent left running.
const PLAIN: [&str; 4] = ["--compress", "none", "--on-complete", "resume"];

fn wait_socket(sock: &Path) {
    wait_for(20, "the QMP socket", || sock.exists());
}

#[test]
fn qemu_qmp_follows_steers_and_cancels_a_migration() {
    if !have_qemu_qmp() {
        return;
    }
    let dir = TempDir::new("qmp");
    let sock = dir.join("qmp.sock");
    let agent = Agent::start(&["--size", "96M", "--profile", "random"]);
    let recv = Recv::start(&dir.join("img"), &[]);
    let mut send = send_with_qmp(
        &agent,
        &recv,
        &sock,
        &[&PLAIN[..], &["--max-bandwidth", "30M"]].concat(),
    );
    wait_socket(&sock);
    // Lowered to 4 MB/s once active, back to unlimited 1.5 s later.
    let low = 4_000_000u64;
    let seen = qemu_qmp_client(&["follow", sock.to_str().unwrap(), &low.to_string()]);
    assert!(send.wait().unwrap().success());
    let (ok, _, err) = recv.wait();
    assert!(ok, "{err}");
    let statuses: Vec<&str> = seen["statuses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    assert_eq!(statuses.last(), Some(&"completed"), "{seen}");
    assert!(statuses.contains(&"active"), "{seen}");
    let t: Vec<u64> = seen["transferred"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert!(
        t.windows(2).all(|w| w[0] <= w[1]),
        "transferred went down: {t:?}"
    );
    // The new cap held on the wire: an upper bound, true on any machine
    // (one 256 KiB batch of slack for the batch in flight at the change).
    let rate = seen["rate_after"]
        .as_f64()
        .expect("measured after lowering");
    assert!(
        rate <= low as f64 * 1.2 + 256.0 * 1024.0 / 1.5,
        "{rate} B/s after lowering to {low}"
    );
    assert!(
        seen["unknown"].as_str().unwrap().contains("not been found"),
        "{seen}"
    );
    let events = seen["events"].to_string();
    assert!(
        events.contains(r#"MIGRATION:{\"status\": \"completed\"}"#),
        "{events}"
    );
    assert!(seen["final"]["downtime"].is_u64(), "{seen}");
    assert!(seen["final"]["compression"]["pages"].is_u64(), "{seen}");
    // The agent runs on (--on-complete resume): its own ledger checks the
    // image (no stale or torn page).
    let (ok, v) = agent_verify(&dir.join("img"));
    assert!(ok, "{v}");

    // A second one, cancelled: the source runs on, untraced.
    let _ = std::fs::remove_dir_all(dir.join("img2"));
    let recv = Recv::start(&dir.join("img2"), &[]);
    let mut send = send_with_qmp(
        &agent,
        &recv,
        &sock,
        &[&PLAIN[..], &["--max-bandwidth", "4M"]].concat(),
    );
    wait_socket(&sock);
    let seen = qemu_qmp_client(&["cancel", sock.to_str().unwrap()]);
    assert_eq!(
        seen["statuses"].as_array().unwrap().last().unwrap(),
        "cancelled",
        "{seen}"
    );
    let st = send.wait().unwrap();
    assert_eq!(st.code(), Some(2));
    drop(recv);
    assert_running(agent.pid);
    assert_eq!(uffd_wp_vmas(agent.pid), 0);
    assert!(!dir.join("img2").exists());
}

/// One raw exchange on a fresh connection: the greeting, then `input`,
/// then what comes back until `replies` lines.
fn raw(sock: &Path, input: &[u8], replies: usize) -> Vec<serde_json::Value> {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(input).unwrap();
    let mut got = Vec::new();
    let mut buf = Vec::new();
    let mut b = [0u8; 4096];
    while got.len() < replies + 1 {
        let n = s.read(&mut b).unwrap();
        assert!(n > 0, "closed after {got:?}");
        buf.extend_from_slice(&b[..n]);
        while let Some(i) = buf.iter().position(|&c| c == b'\n') {
            let line: Vec<u8> = buf.drain(..=i).collect();
            let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
            if v.get("event").is_none() {
                got.push(v);
            }
        }
    }
    got
}

/// A migration of a `size` agent at `rate`, raw pages, serving QMP; its
/// parts, for the test to drive and then check.
struct Slow {
    dir: TempDir,
    sock: PathBuf,
    agent: Agent,
    recv: Recv,
    send: Child,
}

fn slow(tag: &str, size: &str, rate: &str) -> Slow {
    let dir = TempDir::new(tag);
    let sock = dir.join("qmp.sock");
    let agent = Agent::start(&["--size", size, "--profile", "random"]);
    let recv = Recv::start(&dir.join("img"), &[]);
    let send = send_with_qmp(
        &agent,
        &recv,
        &sock,
        &[&PLAIN[..], &["--max-bandwidth", rate]].concat(),
    );
    wait_socket(&sock);
    Slow {
        dir,
        sock,
        agent,
        recv,
        send,
    }
}

#[test]
fn shell_clients_and_bad_input_never_disturb_the_migration() {
    let Slow {
        dir: _dir,
        sock,
        agent,
        recv,
        mut send,
    } = slow("qmp-shell", "64M", "2M");
    let s = sock.to_str().unwrap();
    let status = run(&["status", "--qmp", s, "--json"]);
    assert!(status.status.success(), "{}", text(&status.stderr));
    let v: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert!(
        ["setup", "active"].contains(&v["status"].as_str().unwrap()),
        "{v}"
    );
    let human = run(&["status", "--qmp", s]);
    assert!(
        text(&human.stdout).starts_with("status: "),
        "{}",
        text(&human.stdout)
    );
    // Before negotiation, bad JSON, unknown commands: QMP errors.
    let r = raw(&sock, b"{\"execute\":\"query-migrate\",\"id\":7}\n", 1);
    assert!(r[0]["QMP"].is_object(), "{r:?}");
    assert_eq!(r[1]["error"]["class"], "CommandNotFound");
    assert_eq!(r[1]["id"], 7);
    let r = raw(
        &sock,
        b"{\"execute\":\"qmp_capabilities\"}\n{bad json}\nnot json at all\n{\"execute\":\"nope\"}\n{\"execute\":\"query-status\"}\n",
        5,
    );
    assert_eq!(r[1]["return"], serde_json::json!({}));
    assert_eq!(r[2]["error"]["class"], "GenericError", "{r:?}");
    assert_eq!(r[3]["error"]["class"], "GenericError", "{r:?}");
    assert_eq!(r[4]["error"]["class"], "CommandNotFound", "{r:?}");
    assert_eq!(r[5]["return"]["running"], true, "{r:?}");
    // A client that leaves in the middle of a command.
    {
        let mut c = UnixStream::connect(&sock).unwrap();
        c.write_all(b"{\"execute\":\"qmp_capabilities\"}{\"execute\":\"query-mi")
            .unwrap();
    }
    // Steering from the shell, then cancelling.
    let set = run(&[
        "set",
        "--qmp",
        s,
        "--max-bandwidth",
        "1M",
        "--downtime-limit",
        "50ms",
    ]);
    assert!(set.status.success(), "{}", text(&set.stderr));
    let bad = run(&["status", "--qmp", "/nonexistent/qmp.sock"]);
    assert_one_line_error(&bad, "is a migration running with --qmp?");
    assert!(
        send.try_wait().unwrap().is_none(),
        "the migration ended early"
    );
    let cancel = run(&["cancel", "--qmp", s]);
    assert!(cancel.status.success(), "{}", text(&cancel.stderr));
    let st = send.wait().unwrap();
    let mut err = String::new();
    send.stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(st.code(), Some(2), "{err}");
    assert!(err.contains("cancelled"), "{err}");
    assert_running(agent.pid);
    assert!(!sock.exists(), "the socket outlived the migration");
    drop(recv);
}

/// `--postcopy-after command` switches only when QMP says
/// `migrate-start-postcopy`; `--events FILE` gets the same events as the
/// socket, one JSON line each.
#[test]
fn migrate_start_postcopy_and_the_events_file() {
    if !can_restore("migrate-start-postcopy") {
        return;
    }
    use procmig::control::client::Client;
    let dir = TempDir::new("qmp-postcopy");
    let sock = dir.join("qmp.sock");
    let events = dir.join("events.jsonl");
    let agent = Agent::start(&["--size", "64M", "--threads", "2", "--dirty-rate", "20000"]);
    let recv = Recv::start(&dir.join("img"), &["--restore", "--json"]);
    let events_arg = events.to_str().unwrap();
    let mut send = send_with_qmp(
        &agent,
        &recv,
        &sock,
        &[
            "--events",
            events_arg,
            "--postcopy-after",
            "command",
            "--max-bandwidth",
            "8M",
            "--json",
            "--on-complete",
            "kill",
        ],
    );
    wait_socket(&sock);
    let mut c = Client::connect(&sock, Duration::from_secs(10)).unwrap();
    wait_for(60, "the migration to be active", || {
        c.execute("query-migrate", serde_json::json!({})).unwrap()["status"] == "active"
    });
    c.execute("migrate-start-postcopy", serde_json::json!({}))
        .unwrap();
    drop(c);
    let st = send.wait().unwrap();
    let mut out = String::new();
    send.stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let mut err = String::new();
    send.stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(st.success(), "{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(report["postcopy"].is_object(), "no post-copy: {report}");
    let (ok, rout, rerr) = recv.wait();
    assert!(ok, "{rerr}");
    let r: serde_json::Value = serde_json::from_str(&rout).unwrap();
    if let Some(pid) = r["restored_pid"].as_i64() {
        let _ = std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status();
    }
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&events)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let statuses: Vec<&str> = lines
        .iter()
        .filter(|e| e["event"] == "MIGRATION")
        .map(|e| e["data"]["status"].as_str().unwrap())
        .collect();
    for s in ["setup", "active", "postcopy-active", "completed"] {
        assert!(statuses.contains(&s), "{s} missing from {statuses:?}");
    }
    assert!(lines.iter().any(|e| e["event"] == "MIGRATION_PASS"));
    assert!(lines.iter().all(|e| e["timestamp"]["seconds"].is_u64()));
}

#[test]
fn start_postcopy_needs_it_enabled() {
    use procmig::control::client::Client;
    let Slow {
        dir: _dir,
        sock,
        agent,
        recv,
        mut send,
    } = slow("qmp-nopostcopy", "32M", "2M");
    let mut c = Client::connect(&sock, Duration::from_secs(10)).unwrap();
    let e = c
        .execute("migrate-start-postcopy", serde_json::json!({}))
        .unwrap_err();
    assert!(e.to_string().contains("--postcopy-after"), "{e}");
    c.execute("migrate_cancel", serde_json::json!({})).unwrap();
    assert_eq!(send.wait().unwrap().code(), Some(2));
    assert_running(agent.pid);
    drop(recv);
}

/// `recv --qmp`: the destination's view (setup while it waits, the bytes
/// received), and migrate_cancel on a receiver that waits.
#[test]
fn the_receiver_answers_too() {
    use procmig::control::client::Client;
    let dir = TempDir::new("qmp-recv");
    let sock = dir.join("recv.sock");
    let recv = Recv::start(&dir.join("img"), &["--qmp", sock.to_str().unwrap()]);
    wait_socket(&sock);
    let mut c = Client::connect(&sock, Duration::from_secs(10)).unwrap();
    let r = c.execute("query-migrate", serde_json::json!({})).unwrap();
    assert_eq!(r["status"], "setup", "{r}");
    assert_eq!(
        c.execute("query-status", serde_json::json!({})).unwrap()["status"],
        "inmigrate"
    );
    let e = c
        .execute(
            "migrate-set-parameters",
            serde_json::json!({"max-bandwidth": 1}),
        )
        .unwrap_err();
    assert!(e.to_string().contains("source"), "{e}");
    let agent = Agent::start(&["--size", "32M", "--profile", "random"]);
    let mut send = Command::new(procmig())
        .args([
            "send",
            "--pid",
            &agent.pid.to_string(),
            "--to",
            &recv.addr(),
        ])
        .args([
            "--max-bandwidth",
            "4M",
            "--compress",
            "none",
            "--on-complete",
            "resume",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(30, "bytes to arrive", || {
        let r = c.execute("query-migrate", serde_json::json!({})).unwrap();
        r["status"] == "active" && r["ram"]["transferred"].as_u64().unwrap() > 1 << 20
    });
    // Cancelled from the destination: nothing committed, the source
    // resumed.
    c.execute("migrate_cancel", serde_json::json!({})).unwrap();
    let (ok, _, err) = recv.wait();
    assert!(!ok);
    assert!(err.contains("cancelled"), "{err}");
    assert_eq!(send.wait().unwrap().code(), Some(2));
    assert!(!dir.join("img").exists());
    assert_running(agent.pid);
}
