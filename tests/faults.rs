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
fn proxy(to: String, at: At, action: Action, struck: Arc<AtomicBool>) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let (mut from_src, _) = l.accept().unwrap();
        let mut to_dst = TcpStream::connect(&to).unwrap();
        let (mut back_from, mut back_to) =
            (to_dst.try_clone().unwrap(), from_src.try_clone().unwrap());
        let cut = Arc::new(AtomicBool::new(false));
        let cut_back = cut.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = back_from.read(&mut buf) {
                if n == 0 {
                    break;
                }
                if !cut_back.load(Ordering::Relaxed) && back_to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            // The receiver closed (or died): the sender sees it too,
            // unless the link is "cut", where nobody sees anything.
            if !cut_back.load(Ordering::Relaxed) {
                let _ = back_to.shutdown(std::net::Shutdown::Both);
            }
        });
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
    });
    port
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

fn run_case(at: At, fault: Fault) {
    let what = format!("{fault:?} at {at:?}");
    let agent = Agent::start(&[
        "--size",
        "16M",
        "--profile",
        "mixed",
        "--dirty-rate",
        "4000",
    ]);
    let dir = TempDir::new("fault");
    let out = dir.join("img");
    let mut recv = Command::new(procmig())
        .args([
            "recv",
            "--listen",
            "127.0.0.1:0",
            "--timeout",
            "3s",
            "--out",
        ])
        .arg(&out)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(recv.stderr.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let recv_addr = line.trim().rsplit(' ').next().unwrap().to_string();
    let recv_pid = recv.id() as i32;
    let sender_pid = Arc::new(AtomicI32::new(0));
    let sp = sender_pid.clone();
    let strike = move || {
        let sender = Pid::from_raw(sp.load(Ordering::Relaxed));
        match fault {
            Fault::KillSender => drop(kill(sender, Signal::SIGKILL)),
            Fault::KillReceiver => drop(kill(Pid::from_raw(recv_pid), Signal::SIGKILL)),
            Fault::InterruptSender => drop(kill(sender, Signal::SIGINT)),
            Fault::TerminateSender => drop(kill(sender, Signal::SIGTERM)),
            Fault::CutLink => {}
        }
    };
    let action = match fault {
        Fault::CutLink => Action::Cut,
        _ => Action::Strike(Box::new(strike)),
    };
    let struck = Arc::new(AtomicBool::new(false));
    let port = proxy(recv_addr, at, action, struck.clone());
    let mut sender = Command::new(procmig())
        .args(["send", "--pid", &agent.pid.to_string(), "--to"])
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
    let (state, tracer) = proc_state(agent.pid).expect("the source process is gone");
    assert_eq!(tracer, 0, "{what}: source left traced");
    let stopped = state == 'T';
    println!(
        "{what}: image committed: {committed}, source stopped: {stopped}, sender exit {:?}",
        st.code()
    );
    match (committed, stopped) {
        (true, true) => {}
        (false, false) => {
            assert_eq!(uffd_wp_vmas(agent.pid), 0, "{what}: write-protect left");
        }
        (false, true) => assert_eq!(
            st.code(),
            Some(3),
            "{what}: source stopped, nothing committed, and the sender did not say so: {err}"
        ),
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
