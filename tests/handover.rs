//! The handover: one side owns the process at every instant. Until the
//! source sends Commit, a failure resumes it and the receiver commits
//! nothing; after Commit the source never resumes by itself, and without
//! the receiver's Ack it is left stopped and says so (exit 3).

mod common;

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::thread::JoinHandle;

use common::*;
use procmig::protocol::{self, AckInfo, Control, Kind, Welcome};

/// What the fake receiver does once it has read Commit.
#[derive(Clone, Copy)]
enum AfterCommit {
    /// Vanish without an answer.
    Vanish,
    /// Refuse (as a receiver whose disk failed would).
    Refuse,
    /// Confirm.
    Ack,
}

/// A receiver that speaks the protocol without keeping any page: Welcome,
/// RoundApplied per round, Applied after End, then `after` on Commit.
/// Returns whether it read a Commit.
fn fake_receiver(after: AfterCommit) -> (u16, JoinHandle<bool>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let h = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut w = s.try_clone().unwrap();
        let mut payload = Vec::new();
        loop {
            let Ok(kind) = protocol::read_frame(&mut s, &mut payload) else {
                return false;
            };
            if kind == Kind::Pages {
                continue;
            }
            let answer = match Control::decode(kind, &payload).unwrap() {
                Control::Hello(_) => Control::Welcome(Welcome {
                    version: protocol::VERSION,
                    capabilities: protocol::CAPABILITIES,
                    decompress_threads: 1,
                    channel_token: 0,
                }),
                Control::RoundEnd(r) => Control::RoundApplied(r),
                Control::End(_) => Control::Applied,
                Control::Commit => {
                    match after {
                        AfterCommit::Vanish => {}
                        AfterCommit::Refuse => protocol::write_control(
                            &mut w,
                            &Control::Error {
                                code: protocol::error_code::FAILED,
                                message: "no space left on device".into(),
                            },
                        )
                        .unwrap(),
                        AfterCommit::Ack => protocol::write_control(
                            &mut w,
                            &Control::Ack(AckInfo {
                                normal_pages: 0,
                                zero_pages: 0,
                                decompress_busy_ns: 0,
                                commit_ns: 0,
                                restored_pid: 0,
                            }),
                        )
                        .unwrap(),
                    }
                    let _ = w.shutdown(std::net::Shutdown::Both);
                    return true;
                }
                _ => continue,
            };
            protocol::write_control(&mut w, &answer).unwrap();
        }
    });
    (port, h)
}

fn send_to(pid: i32, port: u16, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "send".to_string(),
        "--pid".into(),
        pid.to_string(),
        "--to".into(),
        format!("127.0.0.1:{port}"),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    run(&args)
}

#[test]
fn no_answer_after_commit_leaves_the_process_stopped() {
    let agent = Agent::start(&["--size", "4M", "--dirty-rate", "2000"]);
    let (port, fake) = fake_receiver(AfterCommit::Vanish);
    let sent = send_to(agent.pid, port, &["--on-complete", "resume", "--json"]);
    assert!(fake.join().unwrap(), "the receiver never saw Commit");
    assert_eq!(sent.status.code(), Some(3), "{}", text(&sent.stderr));
    assert_one_line_error(&sent, "handover in doubt");
    assert!(text(&sent.stderr).contains(&format!("kill -CONT {}", agent.pid)));
    let report: serde_json::Value = serde_json::from_slice(&sent.stdout).unwrap();
    assert_eq!(report["process"], "stopped", "{report}");
    // Stopped and untraced, although --on-complete resume was asked for.
    assert_eq!(proc_state(agent.pid).unwrap(), ('T', 0));
}

#[test]
fn a_refused_commit_resumes_the_process() {
    let agent = Agent::start(&["--size", "4M", "--dirty-rate", "2000"]);
    let (port, fake) = fake_receiver(AfterCommit::Refuse);
    let sent = send_to(agent.pid, port, &[]);
    assert!(fake.join().unwrap());
    assert_eq!(sent.status.code(), Some(2), "{}", text(&sent.stderr));
    assert_one_line_error(&sent, "no space left on device");
    assert_running(agent.pid);
}

#[test]
fn an_acknowledged_commit_completes() {
    let agent = Agent::start(&["--size", "4M", "--dirty-rate", "2000"]);
    let (port, fake) = fake_receiver(AfterCommit::Ack);
    let sent = send_to(agent.pid, port, &["--on-complete", "stop"]);
    assert!(fake.join().unwrap());
    assert!(sent.status.success(), "{}", text(&sent.stderr));
    assert_eq!(proc_state(agent.pid).unwrap(), ('T', 0));
}

#[test]
fn a_source_gone_before_commit_leaves_nothing_committed() {
    // A source that sends the whole stream, sees Applied, and goes away
    // without Commit (it died in the final stop): the receiver must not
    // commit, since the source process runs on there.
    let dir = TempDir::new("nocommit");
    let recv = Recv::start(&dir.join("img"), &[]);
    let mut s = TcpStream::connect(recv.addr()).unwrap();
    s.write_all(&handmade_stream()).unwrap();
    let mut payload = Vec::new();
    loop {
        let kind = protocol::read_frame(&mut s, &mut payload).unwrap();
        if kind == Kind::Applied {
            break;
        }
    }
    drop(s);
    let (ok, _, err) = recv.wait();
    assert!(!ok, "the receiver committed without Commit");
    assert!(!err.contains("panicked"), "{err}");
    assert!(dir.entries().is_empty(), "left behind: {:?}", dir.entries());
}

/// Hello, one region, one zero page, End: a whole version-2 stream up to
/// (not including) Commit.
fn handmade_stream() -> Vec<u8> {
    use procmig::protocol::{Run, Totals};
    let mut b = start_of_stream();
    Control::Zero {
        round: 0,
        region: 0,
        runs: vec![Run { first: 2, count: 1 }],
    }
    .encode(&mut b);
    Control::RoundEnd(0).encode(&mut b);
    Control::End(Totals {
        rounds: 1,
        normal_pages: 0,
        zero_pages: 1,
        page_frames: 0,
        zero_frames: 1,
    })
    .encode(&mut b);
    b
}
