//! Post-copy: the process runs on the destination before all of its memory
//! has arrived; its faults are served over the connection while the rest
//! is pushed. The restored process must see exactly the memory it would
//! have seen (procmig-agent checks every page; python's output must equal
//! an unmigrated run's).

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

struct Outcome {
    send: std::process::Output,
    recv_ok: bool,
    recv: serde_json::Value,
    recv_err: String,
    restored: Option<Pid>,
}

fn migrate(pid: i32, dir: &TempDir, send_extra: &[&str]) -> Outcome {
    let recv = Recv::start(&dir.join("img"), &["--restore", "--json"]);
    let mut args = vec!["--json"];
    args.extend_from_slice(send_extra);
    let send = send(pid, &recv, &args);
    let (recv_ok, out, recv_err) = recv.wait();
    let recv: serde_json::Value = serde_json::from_str(&out).unwrap_or(serde_json::Value::Null);
    let restored = recv["restored_pid"].as_i64().map(|p| Pid(p as i32));
    Outcome {
        send,
        recv_ok,
        recv,
        recv_err,
        restored,
    }
}

fn assert_postcopy(o: &Outcome) -> i32 {
    assert!(
        o.send.status.success() && o.recv_ok,
        "send: {}{}\nrecv: {}{}",
        text(&o.send.stdout),
        text(&o.send.stderr),
        o.recv,
        o.recv_err
    );
    let s: serde_json::Value = serde_json::from_slice(&o.send.stdout).unwrap();
    assert!(s["postcopy"]["pages"].as_u64().unwrap() > 0, "{s}");
    let pc = &o.recv["postcopy"];
    assert!(pc["pages"].as_u64().unwrap() > 0, "{pc}");
    assert_eq!(pc["pages"], s["postcopy"]["pages"]);
    // Built during pre-copy: only the last pages were placed at the switch.
    assert_eq!(o.recv["restore_early"], true, "{}", o.recv);
    let pid = o.restored.as_ref().expect("restored pid").0;
    assert_running(pid);
    pid
}

/// Migrate the (restored) agent again into an image and check every page
/// of it with the agent's own ledger.
fn agent_checks_out(pid: i32, dir: &TempDir) -> String {
    let recv = Recv::start(&dir.join("again"), &[]);
    let out = send(
        pid,
        &recv,
        &[
            "--on-complete",
            "resume",
            "--max-iterations",
            "2",
            "--force-downtime",
        ],
    );
    let (ok, rout, rerr) = recv.wait();
    assert!(
        out.status.success() && ok,
        "{}{rout}{rerr}",
        text(&out.stderr)
    );
    let (ok, v) = agent_verify(&dir.join("again"));
    assert!(ok, "the restored agent's memory: {v}");
    v
}

#[test]
fn busy_agent_after_0_and_1_rounds_and_at_the_start() {
    if !can_restore("post-copy") {
        return;
    }
    // `start`: no bulk copy, every private anonymous page by post-copy.
    for after in ["0", "1", "start"] {
        let dir = TempDir::new("postcopy-agent");
        let agent = Agent::start(&["--size", "128M", "--threads", "2", "--dirty-rate", "20000"]);
        // The background push held to 20 MB/s: the agent's writes meet
        // missing pages before it ends, however loaded the machine.
        let o = migrate(
            agent.pid,
            &dir,
            &["--postcopy-after", after, "--max-bandwidth", "20M"],
        );
        let pid = assert_postcopy(&o);
        if after == "start" {
            let rounds = o.send.stdout.clone();
            let s: serde_json::Value = serde_json::from_slice(&rounds).unwrap();
            // Round 0 carried no page; the 128 MiB came by post-copy.
            assert_eq!(s["rounds"][0]["pages_sent"], 0, "{s}");
            assert!(s["postcopy"]["pages"].as_u64().unwrap() >= 32768, "{s}");
        }
        let requested = o.recv["postcopy"]["requested"].as_u64().unwrap();
        assert!(requested > 0, "after {after}: no fault asked for a page");
        // The answers came on the preempt channel, the background push on
        // the main connection, and the two made one whole memory.
        let sent: serde_json::Value = serde_json::from_slice(&o.send.stdout).unwrap();
        assert_eq!(sent["postcopy"]["preempt_channel"], true, "{sent}");
        // The image (pages as they stood at the switch, post-copy pages
        // included) and the process after it ran on both check out.
        let (ok, v) = agent_verify(&dir.join("img"));
        assert!(ok, "after {after}: image: {v}");
        std::thread::sleep(Duration::from_millis(300));
        agent_checks_out(pid, &dir);
        let _restored = Pid(pid);
    }
}

#[test]
fn pages_dropped_after_the_switch_read_as_zero() {
    if !can_restore("post-copy MADV_DONTNEED") {
        return;
    }
    let dir = TempDir::new("postcopy-dontneed");
    // The agent drops pages (MADV_DONTNEED) as it runs and records it in
    // its ledger; verify then requires them all zero.
    let agent = Agent::start(&[
        "--size",
        "128M",
        "--dirty-rate",
        "20000",
        "--dontneed-rate",
        "2000",
    ]);
    let o = migrate(
        agent.pid,
        &dir,
        &["--postcopy-after", "0", "--max-bandwidth", "20M"],
    );
    let pid = assert_postcopy(&o);
    let _restored = Pid(pid);
    std::thread::sleep(Duration::from_millis(500));
    agent_checks_out(pid, &dir);
}

#[test]
fn python_that_outruns_pre_copy_finishes_with_the_same_output() {
    if !can_restore("post-copy python") || !have("python3", "post-copy python") {
        return;
    }
    let dir = TempDir::new("postcopy-python");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/programs/dict_mutator.py");
    let run = |out: &Path| {
        spawn_clean(
            Command::new("python3")
                .arg(&script)
                .args(["300000", "40"])
                .stdout(std::fs::File::create(out).unwrap())
                .stderr(Stdio::null()),
        )
    };
    let mut reference = run(&dir.join("ref.txt"));
    assert!(reference.wait().unwrap().success());
    let want = std::fs::read_to_string(dir.join("ref.txt")).unwrap();
    let log = dir.join("log.txt");
    let src = Kill(run(&log));
    wait_for(30, "python to start mutating", || lines(&log).len() >= 3);
    // After one round whatever the machine's speed (whether `auto` would
    // switch depends on it; `auto_switches_when_pre_copy_cannot_converge`
    // tests that with a load no machine can converge).
    let o = migrate(
        src.0.id() as i32,
        &dir,
        &["--postcopy-after", "1", "--max-bandwidth", "30M"],
    );
    let pid = assert_postcopy(&o);
    wait_for(120, "the restored python to finish", || !alive(pid));
    assert_eq!(std::fs::read_to_string(&log).unwrap(), want);
}

#[test]
fn auto_switches_when_pre_copy_cannot_converge() {
    if !can_restore("post-copy auto") {
        return;
    }
    let dir = TempDir::new("postcopy-auto");
    // 16 MiB rewritten at up to 80 MB/s through a 2 MB/s link: even on a
    // loaded machine the process outruns the link every round.
    let agent = Agent::start(&["--size", "16M", "--dirty-rate", "20000"]);
    let o = migrate(
        agent.pid,
        &dir,
        &["--postcopy-after", "auto", "--max-bandwidth", "2M"],
    );
    let pid = assert_postcopy(&o);
    let _restored = Pid(pid);
    let s: serde_json::Value = serde_json::from_slice(&o.send.stdout).unwrap();
    let rounds = s["rounds"].as_array().unwrap().len();
    assert!(rounds <= 5, "auto switched only after {rounds} rounds");
    std::thread::sleep(Duration::from_millis(300));
    agent_checks_out(pid, &dir);
}

#[test]
fn destination_killed_during_post_copy_leaves_the_source_whole() {
    if !can_restore("post-copy, destination killed") {
        return;
    }
    let dir = TempDir::new("postcopy-kill");
    let agent = Agent::start(&["--size", "32M", "--dirty-rate", "20000"]);
    let recv = Recv::start(&dir.join("img"), &["--restore"]);
    let recv_pid = recv.child.id() as i32;
    // A slow background push keeps post-copy going for seconds.
    let pid = agent.pid.to_string();
    let to = recv.addr();
    let sender = std::process::Command::new(procmig())
        .args([
            "send",
            "--pid",
            &pid,
            "--to",
            &to,
            "--postcopy-after",
            "0",
            "--max-bandwidth",
            "2M",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let restored = wait_for_child_running(recv_pid);
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: plain kill.
    unsafe { libc::kill(recv_pid, libc::SIGKILL) };
    drop(recv);
    let out = sender.wait_with_output().unwrap();
    // The source says what happened, exits 3, and keeps the process
    // stopped with all of its memory.
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(err.contains("post-copy failed"), "{err}");
    assert!(err.contains("--resume-source"), "{err}");
    assert_eq!(proc_state(agent.pid).map(|s| s.0), Some('T'));
    // The restored copy died with its restorer (it lacked memory).
    wait_for(10, "the restored copy to die", || !alive(restored));
    // Resumed by hand, the source runs and its memory checks out.
    let r = run(&["send", "--resume-source", "--pid", &agent.pid.to_string()]);
    assert!(r.status.success(), "{}", text(&r.stderr));
    assert_running(agent.pid);
    // Not stopped any more: a second resume says so.
    assert_one_line_error(
        &run(&["send", "--resume-source", "--pid", &agent.pid.to_string()]),
        "nothing to resume",
    );
    let recv = Recv::start(&dir.join("img2"), &[]);
    let out = send(agent.pid, &recv, &[]);
    assert!(
        recv.wait().0 && out.status.success(),
        "{}",
        text(&out.stderr)
    );
    check_image(
        &agent,
        &dir.join("img2"),
        "the source after a broken post-copy",
    );
}

#[test]
fn postcopy_needs_a_restoring_receiver() {
    let dir = TempDir::new("postcopy-norestore");
    let agent = Agent::start(&["--size", "16M"]);
    let recv = Recv::start(&dir.join("img"), &[]);
    let out = send(agent.pid, &recv, &["--postcopy-after", "1"]);
    assert_one_line_error(&out, "post-copy needs a receiver that restores");
    assert_running(agent.pid);
    let (ok, _, _) = recv.wait();
    assert!(!ok);
    assert!(!dir.join("img").exists());
}

#[test]
fn four_thread_c_writer_goes_on_without_a_gap() {
    if !can_restore("post-copy threads") {
        return;
    }
    let dir = TempDir::new("postcopy-threads");
    let Some(prog) = compile("threads_checksum.c", &dir) else {
        return;
    };
    let log = dir.join("log.txt");
    let src = Kill(spawn_clean(Command::new(&prog).arg(&log)));
    wait_for(10, "first lines", || lines(&log).len() > 20);
    let o = migrate(
        src.0.id() as i32,
        &dir,
        // Right after the bulk copy: its pages compress so well (one word
        // written per page) that a round later pre-copy may converge.
        &["--postcopy-after", "0", "--max-bandwidth", "20M"],
    );
    let pid = assert_postcopy(&o);
    let _restored = Pid(pid);
    let before = lines(&log).len();
    wait_for(30, "the restored threads to write", || {
        lines(&log).len() > before + 40
    });
    // Each thread's sequence goes on across the switch: no gap, no repeat.
    let mut last = [None::<u64>; 4];
    for l in lines(&log) {
        let w: Vec<&str> = l.split_whitespace().collect();
        let t: usize = w[0][1..].parse().unwrap();
        let seq: u64 = w[1].parse().unwrap();
        if let Some(prev) = last[t] {
            assert_eq!(seq, prev + 1, "thread {t}: {l:?} after {prev}");
        }
        last[t] = Some(seq);
    }
}

/// Children forked while pages are still missing get a userfaultfd of
/// their own (UFFD_EVENT_FORK) and their own copy of what is missing: each
/// child digests the whole list and must agree with its parent. (Before
/// the fork event was read, the first child to touch a missing page waited
/// on a userfaultfd nobody read, and read zeros once the receiver exited.)
#[test]
fn a_child_forked_during_post_copy_sees_its_parents_memory() {
    if !can_restore("post-copy fork") || !have("python3", "post-copy fork") {
        return;
    }
    let dir = TempDir::new("postcopy-fork");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/programs/forker.py");
    let go = dir.join("go");
    let run = |out: &Path| {
        spawn_clean(
            Command::new("python3")
                .arg(&script)
                .arg("60")
                .arg(&go)
                .stdout(std::fs::File::create(out).unwrap())
                .stderr(Stdio::null()),
        )
    };
    std::fs::write(&go, b"").unwrap();
    let mut reference = run(&dir.join("ref.txt"));
    assert!(reference.wait().unwrap().success());
    let want = std::fs::read_to_string(dir.join("ref.txt")).unwrap();
    std::fs::remove_file(&go).unwrap();
    let log = dir.join("log.txt");
    let src = Kill(run(&log));
    wait_for(30, "python to start", || lines(&log).len() >= 3);
    // Forking starts once the restored copy runs, while pages are still
    // missing (a slow background push): the children must see them.
    let recv = Recv::start(&dir.join("img"), &["--restore", "--json"]);
    let recv_pid = recv.child.id() as i32;
    let sender = Command::new(procmig())
        .args([
            "send",
            "--json",
            "--pid",
            &src.0.id().to_string(),
            "--to",
            &recv.addr(),
        ])
        .args(["--postcopy-after", "start", "--compress", "none"])
        .args(["--max-bandwidth", "3M"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_child_running(recv_pid);
    std::fs::write(&go, b"").unwrap();
    let send = sender.wait_with_output().unwrap();
    let (recv_ok, out, recv_err) = recv.wait();
    let o = Outcome {
        send,
        recv_ok,
        recv: serde_json::from_str(&out).unwrap_or(serde_json::Value::Null),
        recv_err,
        restored: None,
    };
    let o = Outcome {
        restored: o.recv["restored_pid"].as_i64().map(|p| Pid(p as i32)),
        ..o
    };
    let pid = assert_postcopy(&o);
    let forked = o.recv["postcopy"]["forked"].as_u64().unwrap();
    assert!(forked > 0, "no fork while pages were missing: {}", o.recv);
    wait_for(120, "the restored python to finish", || !alive(pid));
    let got = std::fs::read_to_string(&log).unwrap();
    assert!(!got.contains("BAD"), "{got}");
    assert_eq!(got, want);
}

/// The link breaks during post-copy: the sender exits 3 with the command
/// that finishes the migration, the destination keeps the restored process
/// running (paused), a wrong token is refused, and `send --resume` with
/// the right one brings every missing page: the agent's memory checks out.
#[test]
fn a_broken_link_pauses_and_send_resume_finishes() {
    if !can_restore("post-copy, pause and resume") {
        return;
    }
    let dir = TempDir::new("postcopy-resume");
    let agent = Agent::start(&["--size", "32M", "--dirty-rate", "20000"]);
    let recv = Recv::start(
        &dir.join("img"),
        &[
            "--restore",
            "--json",
            "--timeout",
            "5s",
            "--recover-timeout",
            "60s",
        ],
    );
    let recv_pid = recv.child.id() as i32;
    let proxy = CutProxy::start(recv.addr());
    let pid = agent.pid.to_string();
    // A slow background push keeps post-copy going for seconds.
    let sender = Command::new(procmig())
        .args(["send", "--pid", &pid, "--to"])
        .arg(format!("127.0.0.1:{}", proxy.port))
        .args([
            "--postcopy-after",
            "0",
            "--max-bandwidth",
            "2M",
            "--timeout",
            "3s",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let restored = wait_for_child_running(recv_pid);
    let _killed_at_the_end = Pid(restored);
    std::thread::sleep(Duration::from_millis(300));
    proxy.cut();
    let out = sender.wait_with_output().unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    let token = resume_token(&err);
    // Paused: the restored copy runs on, nothing is committed, the source
    // is stopped with all of its memory.
    assert_running(restored);
    assert!(!dir.join("img").exists());
    assert_eq!(proc_state(agent.pid).map(|s| s.0), Some('T'));
    let wrong = run(&["send", "--resume", "1", "--pid", &pid, "--to", &recv.addr()]);
    assert!(!wrong.status.success());
    assert!(
        text(&wrong.stderr).contains("no paused migration with that token"),
        "{}",
        text(&wrong.stderr)
    );
    // The right token with another (stopped) process: refused too, or a
    // stranger's memory would fill the restored process.
    let other = Kill(spawn_clean(
        Command::new("sleep")
            .arg("60")
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    ));
    let other_pid = other.0.id() as i32;
    // SAFETY: plain kill of our own child.
    unsafe { libc::kill(other_pid, libc::SIGSTOP) };
    wait_for(10, "sleep to stop", || {
        proc_state(other_pid).is_some_and(|s| s.0 == 'T')
    });
    let stranger = run(&[
        "send",
        "--resume",
        &token,
        "--pid",
        &other_pid.to_string(),
        "--to",
        &recv.addr(),
    ]);
    assert!(!stranger.status.success());
    assert!(
        text(&stranger.stderr).contains("this paused migration is of process"),
        "{}",
        text(&stranger.stderr)
    );
    let r = run(&[
        "send",
        "--resume",
        &token,
        "--pid",
        &pid,
        "--to",
        &recv.addr(),
        "--json",
    ]);
    assert!(r.status.success(), "{}", text(&r.stderr));
    let s: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    assert_eq!(s["restored_pid"].as_i64(), Some(restored as i64), "{s}");
    assert!(s["missing_pages"].as_u64().unwrap() > 0, "{s}");
    assert_eq!(s["missing_pages"], s["pages"], "{s}");
    resumed_and_whole(recv, &dir, restored, "post-copy paused", 1);
}

/// The end of a paused and resumed post-copy: the receiver committed,
/// said `why` (it paused), counts `pauses`; the image is whole (every page
/// the resumed sources sent is in it) and so is the running agent.
fn resumed_and_whole(recv: Recv, dir: &TempDir, restored: i32, why: &str, pauses: u32) {
    let (ok, rout, rerr) = recv.wait();
    assert!(ok, "{rout}{rerr}");
    assert!(rerr.contains(why), "{rerr}");
    let rj: serde_json::Value = serde_json::from_str(&rout).unwrap();
    assert_eq!(rj["postcopy"]["pauses"], pauses, "{rj}");
    let (ok, v) = agent_verify(&dir.join("img"));
    assert!(ok, "image after {pauses} resume(s): {v}");
    std::thread::sleep(Duration::from_millis(300));
    agent_checks_out(restored, dir);
}

/// QMP migrate-pause and migrate-recover (`procmig pause`, `procmig recv
/// --recover`): paused on purpose from the source's control socket, the
/// destination told to wait on a second address, resumed there; paused
/// again from the destination's socket, resumed again: every page arrives
/// once and the agent checks out.
#[test]
fn migrate_pause_and_recover_on_another_address() {
    if !can_restore("post-copy, migrate-pause and migrate-recover") {
        return;
    }
    let dir = TempDir::new("postcopy-qmp-pause");
    let (dsock, ssock) = (dir.join("dest.sock"), dir.join("src.sock"));
    let agent = Agent::start(&["--size", "32M", "--dirty-rate", "20000"]);
    let recv = Recv::start(
        &dir.join("img"),
        &[
            "--restore",
            "--json",
            "--recover-timeout",
            "60s",
            "--qmp",
            dsock.to_str().unwrap(),
        ],
    );
    let recv_pid = recv.child.id() as i32;
    let pid = agent.pid.to_string();
    let status = |sock: &Path| -> String {
        let o = run(&["status", "--json", "--qmp", sock.to_str().unwrap()]);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
        v["status"].as_str().unwrap_or("").to_string()
    };
    // Not paused yet: nothing to recover, and a receiver is not paused
    // before post-copy either.
    let early = run(&["pause", "--qmp", dsock.to_str().unwrap()]);
    assert!(!early.status.success());
    assert!(
        text(&early.stderr).contains("migrate-pause pauses post-copy"),
        "{}",
        text(&early.stderr)
    );
    // No bulk copy, uncompressed at 2 MB/s: post-copy lasts many seconds.
    let sender = Command::new(procmig())
        .args(["send", "--pid", &pid, "--to", &recv.addr()])
        .args(["--postcopy-after", "start", "--compress", "none"])
        .args(["--max-bandwidth", "2M", "--qmp", ssock.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let restored = wait_for_child_running(recv_pid);
    let _killed_at_the_end = Pid(restored);
    wait_for(30, "post-copy on both sides", || {
        status(&ssock) == "postcopy-active" && status(&dsock) == "postcopy-active"
    });
    let not_yet = run(&[
        "recv",
        "--recover",
        "127.0.0.1:0",
        "--qmp",
        dsock.to_str().unwrap(),
    ]);
    assert!(!not_yet.status.success());
    assert!(
        text(&not_yet.stderr).contains("needs a paused post-copy"),
        "{}",
        text(&not_yet.stderr)
    );
    let p = run(&["pause", "--qmp", ssock.to_str().unwrap()]);
    assert!(p.status.success(), "{}", text(&p.stderr));
    let out = sender.wait_with_output().unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("paused by migrate-pause"), "{err}");
    let token = resume_token(&err);
    wait_for(10, "the destination to pause", || {
        status(&dsock) == "postcopy-paused"
    });
    assert_running(restored);
    // A second address to wait on (QEMU: migrate-recover).
    let r = run(&[
        "recv",
        "--recover",
        "127.0.0.1:0",
        "--qmp",
        dsock.to_str().unwrap(),
    ]);
    assert!(r.status.success(), "{}", text(&r.stderr));
    let second = text(&r.stdout)
        .split_whitespace()
        .find_map(|w| w.strip_prefix("tcp:").map(str::to_string))
        .unwrap_or_else(|| panic!("no address in {:?}", text(&r.stdout)));
    assert_ne!(second, recv.addr());
    let resume = |to: &str| {
        Command::new(procmig())
            .args([
                "send", "--resume", &token, "--pid", &pid, "--to", to, "--json",
            ])
            .args(["--compress", "none", "--max-bandwidth", "2M"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let first = resume(&second);
    wait_for(30, "the destination to go on", || {
        status(&dsock) == "postcopy-active"
    });
    // Paused again, from the destination's side this time.
    let p = run(&["pause", "--qmp", dsock.to_str().unwrap()]);
    assert!(p.status.success(), "{}", text(&p.stderr));
    let out = first.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    wait_for(10, "the destination to pause again", || {
        status(&dsock) == "postcopy-paused"
    });
    let last = run(&[
        "send", "--resume", &token, "--pid", &pid, "--to", &second, "--json",
    ]);
    assert!(last.status.success(), "{}", text(&last.stderr));
    resumed_and_whole(recv, &dir, restored, "paused by migrate-pause", 2);
}
