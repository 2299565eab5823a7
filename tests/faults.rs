//! Fault injection across every phase: a proxy between sender and
//! receiver watches the stream and, at a chosen frame, kills the sender or
//! the receiver (SIGKILL), interrupts the sender (SIGINT, SIGTERM), or
//! cuts the link (stops forwarding, sockets left open). Whatever happens,
//! the rule holds: exactly one runnable copy (the source running,
//! untraced, nothing committed; or the source stopped and the image
//! committed), or the source stopped with the sender saying the handover
//! is in doubt (exit 3); and both sides end within a bound.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Far above every --timeout here: only a missing deadline comes near it.
const BOUND: Duration = Duration::from_secs(60);

/// Where in the stream the fault strikes: after the proxy forwarded...
#[derive(Debug, Clone, Copy, PartialEq)]
enum At {
    /// ...the first Pages frame (bulk copy).
    Bulk,
    /// ...RoundEnd(1) (iterating).
    Iterate,
    /// ...End (the process is stopped, the receiver not yet told to commit).
    End,
    /// ...Commit (handed over, not yet acknowledged).
    Commit,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    KillSender,
    KillReceiver,
    InterruptSender,
    TerminateSender,
    CutLink,
}

impl At {
    fn hit(self, kind: u16, payload: &[u8], pages_seen: &mut u32) -> bool {
        match (self, kind) {
            (At::Bulk, 4) => {
                *pages_seen += 1;
                *pages_seen == 1
            }
            (At::Iterate, 6) => payload == 1u32.to_le_bytes(),
            (At::End, 7) => true,
            (At::Commit, 12) => true,
            _ => false,
        }
    }
}

/// Read one raw frame: (kind, the whole frame's bytes).
fn raw_frame(r: &mut impl Read) -> Option<(u16, Vec<u8>)> {
    let mut head = [0u8; 16];
    r.read_exact(&mut head).ok()?;
    let kind = u16::from_le_bytes([head[4], head[5]]);
    let len = u32::from_le_bytes(head[8..12].try_into().unwrap()) as usize;
    let mut frame = head.to_vec();
    frame.resize(16 + len, 0);
    r.read_exact(&mut frame[16..]).ok()?;
    Some((kind, frame))
}

/// What the proxy does when the frame it waits for has passed.
enum Action {
    /// Run this (a signal to one side).
    Strike(Box<dyn FnOnce() + Send>),
    /// Stop forwarding both ways, sockets kept open: a dead link, as a
    /// veth taken down (nobody sees a close, only silence).
    Cut,
}

/// Forward one connection to `to`; once the frame `at` names has passed,
/// act.
/// Forward `a` to `b` until either closes, or swallow once `cut`.
fn forward(mut a: TcpStream, mut b: TcpStream, cut: Arc<AtomicBool>) {
    let mut buf = [0u8; 4096];
    while let Ok(n) = a.read(&mut buf) {
        if n == 0 {
            break;
        }
        if !cut.load(Ordering::Relaxed) && b.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    if !cut.load(Ordering::Relaxed) {
        let _ = b.shutdown(std::net::Shutdown::Both);
    } else {
        std::thread::sleep(BOUND);
    }
}

/// The proxy: the first connection is the migration stream, watched frame
/// by frame; later ones (the post-copy preempt channel) are forwarded as
/// they are, and cut with it.
fn proxy(to: String, at: At, action: Action, struck: Arc<AtomicBool>) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let cut = Arc::new(AtomicBool::new(false));
    std::thread::spawn(move || {
        let Ok((from_src, _)) = l.accept() else {
            return;
        };
        {
            let (to, cut) = (to.clone(), cut.clone());
            std::thread::spawn(move || watch(from_src, to, at, action, struck, cut));
        }
        while let Ok((src, _)) = l.accept() {
            let Ok(dst) = TcpStream::connect(&to) else {
                continue;
            };
            let (s2, d2) = (src.try_clone().unwrap(), dst.try_clone().unwrap());
            let (c1, c2) = (cut.clone(), cut.clone());
            std::thread::spawn(move || forward(src, dst, c1));
            std::thread::spawn(move || forward(d2, s2, c2));
        }
    });
    port
}

/// The migration stream through the proxy: frames forwarded one by one,
/// and `action` taken once the frame `at` has passed.
fn watch(
    mut from_src: TcpStream,
    to: String,
    at: At,
    action: Action,
    struck: Arc<AtomicBool>,
    cut: Arc<AtomicBool>,
) {
    let mut to_dst = TcpStream::connect(&to).unwrap();
    let (back_from, back_to) = (to_dst.try_clone().unwrap(), from_src.try_clone().unwrap());
    {
        let cut = cut.clone();
        std::thread::spawn(move || forward(back_from, back_to, cut));
    }
    let mut action = Some(action);
    let mut pages = 0;
    while let Some((kind, frame)) = raw_frame(&mut from_src) {
        if cut.load(Ordering::Relaxed) {
            continue; // swallowed by the dead link
        }
        if to_dst.write_all(&frame).is_err() {
            break;
        }
        if action.is_some() && at.hit(kind, &frame[16..], &mut pages) {
            struck.store(true, Ordering::Relaxed);
            match action.take().unwrap() {
                Action::Strike(f) => f(),
                Action::Cut => cut.store(true, Ordering::Relaxed),
            }
        }
    }
    if cut.load(Ordering::Relaxed) {
        std::thread::sleep(BOUND);
    }
    drop((from_src, to_dst));
}

fn wait_bounded(child: &mut Child, what: &str) -> std::process::ExitStatus {
    let t = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        if t.elapsed() > BOUND {
            let _ = child.kill();
            panic!("{what} still running after {BOUND:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A receiver on a free loopback port: the child, its stderr (kept open: a
/// receiver writing to a closed stderr would die of it) and its address.
fn start_recv(
    out: &std::path::Path,
    extra: &[&str],
) -> (Child, std::io::BufReader<std::process::ChildStderr>, String) {
    let mut recv = Command::new(procmig())
        .args(["recv", "--listen", "127.0.0.1:0", "--timeout", "3s"])
        .args(extra)
        .arg("--out")
        .arg(out)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    let mut err = std::io::BufReader::new(recv.stderr.take().unwrap());
    std::io::BufRead::read_line(&mut err, &mut line).unwrap();
    let addr = line.trim().rsplit(' ').next().unwrap().to_string();
    (recv, err, addr)
}

/// What the proxy does for `fault`, `delay` after its frame passed:
/// signal the sender (its pid, once known, in `sender`) or the receiver,
/// or cut the link.
fn action_for(fault: Fault, sender: Arc<AtomicI32>, recv_pid: i32, delay: Duration) -> Action {
    let strike = move || {
        std::thread::sleep(delay);
        let sender = Pid::from_raw(sender.load(Ordering::Relaxed));
        match fault {
            Fault::KillSender => drop(kill(sender, Signal::SIGKILL)),
            Fault::KillReceiver => drop(kill(Pid::from_raw(recv_pid), Signal::SIGKILL)),
            Fault::InterruptSender => drop(kill(sender, Signal::SIGINT)),
            Fault::TerminateSender => drop(kill(sender, Signal::SIGTERM)),
            Fault::CutLink => {}
        }
    };
    match fault {
        Fault::CutLink => Action::Cut,
        _ => Action::Strike(Box::new(strike)),
    }
}

fn run_case(at: At, fault: Fault) {
    let agent = Agent::start(&[
        "--size",
        "16M",
        "--profile",
        "mixed",
        "--dirty-rate",
        "4000",
    ]);
    strike(agent.pid, at, fault, &|| {});
}

/// Migrate `pid` through the proxy, strike `fault` at `at`, and check the
/// rule. `survivor` then checks a source that runs on, or that was left
/// stopped with the sender saying so (exit 3) and is resumed here as its
/// user would, with `send --resume-source`. A source handed over (image
/// committed, process stopped) is continued with SIGCONT afterwards, so
/// that the next case can migrate it again.
fn strike(pid: i32, at: At, fault: Fault, survivor: &dyn Fn()) {
    let what = format!("{fault:?} at {at:?}");
    let dir = TempDir::new("fault");
    let out = dir.join("img");
    let (mut recv, _recv_err, recv_addr) = start_recv(&out, &[]);
    let recv_pid = recv.id() as i32;
    let sender_pid = Arc::new(AtomicI32::new(0));
    let action = action_for(fault, sender_pid.clone(), recv_pid, Duration::ZERO);
    let struck = Arc::new(AtomicBool::new(false));
    let port = proxy(recv_addr, at, action, struck.clone());
    let mut sender = Command::new(procmig())
        .args(["send", "--pid", &pid.to_string(), "--to"])
        .arg(format!("127.0.0.1:{port}"))
        .args([
            "--timeout",
            "3s",
            "--max-bandwidth",
            "16M",
            "--max-iterations",
            "3",
        ])
        .args(["--force-downtime", "--on-complete", "stop"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    sender_pid.store(sender.id() as i32, Ordering::Relaxed);
    let st = wait_bounded(&mut sender, &format!("sender ({what})"));
    let mut err = String::new();
    let _ = sender.stderr.take().unwrap().read_to_string(&mut err);
    wait_bounded(&mut recv, &format!("receiver ({what})"));
    assert!(!err.contains("panicked"), "{what}: {err}");
    assert!(
        struck.load(Ordering::Relaxed),
        "{what}: the stream never reached that point: {err}"
    );

    let committed = out.exists();
    let (state, tracer) = proc_state(pid).expect("the source process is gone");
    assert_eq!(tracer, 0, "{what}: source left traced");
    let stopped = state == 'T';
    println!(
        "{what}: image committed: {committed}, source stopped: {stopped}, sender exit {:?}",
        st.code()
    );
    match (committed, stopped) {
        (true, true) => {
            let _ = kill(Pid::from_raw(pid), Signal::SIGCONT);
        }
        (false, false) => {
            assert_eq!(uffd_wp_vmas(pid), 0, "{what}: write-protect left");
            survivor();
        }
        (false, true) => {
            assert_eq!(
                st.code(),
                Some(3),
                "{what}: source stopped, nothing committed, and the sender did not say so: {err}"
            );
            let r = run(&["send", "--pid", &pid.to_string(), "--resume-source"]);
            assert!(r.status.success(), "{what}: {}", text(&r.stderr));
            survivor();
        }
        (true, false) => panic!("{what}: two live copies: image committed and source running"),
    }
}

fn each_phase(fault: Fault) {
    for at in [At::Bulk, At::Iterate, At::End, At::Commit] {
        run_case(at, fault);
    }
}

#[test]
fn sender_killed_in_every_phase() {
    each_phase(Fault::KillSender);
}

#[test]
fn receiver_killed_in_every_phase() {
    each_phase(Fault::KillReceiver);
}

#[test]
fn sender_interrupted_in_every_phase() {
    each_phase(Fault::InterruptSender);
}

#[test]
fn sender_terminated_in_every_phase() {
    each_phase(Fault::TerminateSender);
}

#[test]
fn link_cut_in_every_phase() {
    each_phase(Fault::CutLink);
}

/// The matrix again with redis-server serving redis-benchmark as the
/// source: whenever the source is the survivor, redis answers, holds the
/// keys it held before, and takes new writes.
#[test]
fn redis_under_load_survives_every_fault_in_every_phase() {
    if !have("redis-server", "redis fault matrix") || !have("redis-benchmark", "redis fault matrix")
    {
        return;
    }
    let dir = TempDir::new("fault-redis");
    let redis = Redis::start(&dir, 20000, 20000);
    let port = redis.port;
    // Load that never touches those keys (counters and a list).
    let _load = Kill(spawn_clean(
        Command::new("redis-benchmark")
            .args([
                "-p",
                &port.to_string(),
                "-q",
                "-n",
                "100000000",
                "-r",
                "1000",
                "-c",
                "4",
            ])
            .args(["-t", "get,incr,lpush"])
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    ));
    let survivor = || {
        assert_eq!(redis_cli(port, &["ping"]), "PONG");
        redis.assert_keys_kept();
        assert_eq!(redis_cli(port, &["set", "after", "yes"]), "OK");
        assert_eq!(redis_cli(port, &["get", "after"]), "yes");
    };
    for fault in [
        Fault::KillSender,
        Fault::KillReceiver,
        Fault::InterruptSender,
        Fault::TerminateSender,
        Fault::CutLink,
    ] {
        for at in [At::Bulk, At::Iterate, At::End, At::Commit] {
            strike(redis.pid(), at, fault, &survivor);
        }
    }
}

/// Post-copy: strike once the process was handed over (Commit passed),
/// while the destination runs it and pages still flow. Neither side holds
/// the whole process then, so the rule is: the migration completes (the
/// restored copy runs, the image is committed, the source is stopped), or
/// it breaks and the restored copy dies, nothing is committed, and the
/// source is stopped with all of its memory (the sender, if alive, exits 3
/// and says how to resume it).
fn run_postcopy_case(fault: Fault) {
    if !is_root() {
        println!("skipped: post-copy faults: restoring a process needs root");
        return;
    }
    let what = format!("post-copy, {fault:?} after Commit");
    let agent = Agent::start(&["--size", "16M", "--dirty-rate", "20000"]);
    let dir = TempDir::new("fault-postcopy");
    let out = dir.join("img");
    // A broken post-copy pauses for 2 s, then the receiver gives up.
    let (mut recv, mut recv_err, recv_addr) =
        start_recv(&out, &["--restore", "--recover-timeout", "2s"]);
    let recv_pid = recv.id() as i32;
    // Every process the receiver starts (the restored copy).
    let seen = Arc::new(std::sync::Mutex::new(Vec::<i32>::new()));
    let watching = Arc::new(AtomicBool::new(true));
    {
        let (seen, watching) = (seen.clone(), watching.clone());
        std::thread::spawn(move || {
            while watching.load(Ordering::Relaxed) {
                let path = format!("/proc/{recv_pid}/task/{recv_pid}/children");
                if let Ok(s) = std::fs::read_to_string(path) {
                    let mut v = seen.lock().unwrap();
                    for p in s.split_whitespace().filter_map(|w| w.parse().ok()) {
                        if !v.contains(&p) {
                            v.push(p);
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        });
    }
    let sender_pid = Arc::new(AtomicI32::new(0));
    // Let post-copy get going first.
    let action = action_for(
        fault,
        sender_pid.clone(),
        recv_pid,
        Duration::from_millis(200),
    );
    let struck = Arc::new(AtomicBool::new(false));
    let port = proxy(recv_addr, At::Commit, action, struck.clone());
    let mut sender = Command::new(procmig())
        .args(["send", "--pid", &agent.pid.to_string(), "--to"])
        .arg(format!("127.0.0.1:{port}"))
        .args([
            "--timeout",
            "3s",
            "--postcopy-after",
            "0",
            "--max-bandwidth",
            "2M",
        ])
        // Its report would read like a test's "skipped: ..." line.
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    sender_pid.store(sender.id() as i32, Ordering::Relaxed);
    let st = wait_bounded(&mut sender, &format!("sender ({what})"));
    let mut err = String::new();
    let _ = sender.stderr.take().unwrap().read_to_string(&mut err);
    let rst = wait_bounded(&mut recv, &format!("receiver ({what})"));
    watching.store(false, Ordering::Relaxed);
    let mut rerr = String::new();
    let _ = recv_err.read_to_string(&mut rerr);
    assert!(!err.contains("panicked"), "{what}: {err}");
    assert!(!rerr.contains("panicked"), "{what}: receiver: {rerr}");
    if fault != Fault::KillReceiver {
        assert!(
            rst.code().is_some_and(|c| c != 101),
            "{what}: receiver: {rerr}"
        );
    }
    assert!(
        struck.load(Ordering::Relaxed),
        "{what}: never reached Commit: {err}"
    );
    let restored: Vec<i32> = seen.lock().unwrap().clone();
    let live: Vec<i32> = restored
        .iter()
        .copied()
        .filter(|&p| proc_state(p).is_some_and(|(s, _)| s != 'Z' && s != 'X'))
        .collect();
    let (state, tracer) = proc_state(agent.pid).expect("the source process is gone");
    assert_eq!(tracer, 0, "{what}: source left traced");
    assert_eq!(state, 'T', "{what}: the source runs again by itself: {err}");
    let committed = out.exists();
    println!(
        "{what}: committed {committed}, restored copies alive {live:?}, sender exit {:?}, receiver exit {:?}",
        st.code(),
        rst.code()
    );
    if committed {
        // Completed: exactly one copy runs, the destination's.
        assert_eq!(live.len(), 1, "{what}: completed without a running copy");
        assert!(st.success() || fault == Fault::KillSender, "{what}: {err}");
    } else {
        assert!(
            live.is_empty(),
            "{what}: a restored copy runs without its memory"
        );
        if fault != Fault::KillSender {
            assert_eq!(st.code(), Some(3), "{what}: {err}");
            assert!(err.contains("--resume-source"), "{what}: {err}");
        }
        // The source resumes by hand, whole.
        let r = run(&["send", "--resume-source", "--pid", &agent.pid.to_string()]);
        assert!(r.status.success(), "{what}: {}", text(&r.stderr));
        assert_running(agent.pid);
    }
    for p in live {
        let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
    }
}

#[test]
fn postcopy_faults_leave_one_copy_or_a_whole_stopped_source() {
    for fault in [
        Fault::KillSender,
        Fault::KillReceiver,
        Fault::InterruptSender,
        Fault::CutLink,
    ] {
        run_postcopy_case(fault);
    }
}
