//! Every wait has a deadline: a peer that trickles bytes or stops
//! answering ends the migration within --timeout, the source resumed and
//! nothing committed.

mod common;

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use procmig::protocol::{self, Control, Kind, Welcome};

/// Far above --timeout: only a missing deadline comes near it.
const BOUND: Duration = Duration::from_secs(60);

#[test]
fn a_slow_loris_cannot_hold_the_receiver() {
    let dir = TempDir::new("loris");
    let recv = Recv::start(&dir.join("img"), &["--timeout", "1s"]);
    let mut s = TcpStream::connect(recv.addr()).unwrap();
    let mut hello = Vec::new();
    hello_frame().encode(&mut hello);
    // One byte every 200 ms: each read succeeds, the frame never does.
    let t = Instant::now();
    for b in hello {
        if s.write_all(&[b]).is_err() || t.elapsed() > BOUND {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // The receiver closes it: reads end.
    s.set_read_timeout(Some(BOUND)).unwrap();
    let _ = std::io::Read::read_to_end(&mut s, &mut Vec::new());
    // Turned away (the receiver closed it) well before the bound...
    assert!(t.elapsed() < BOUND, "took {:?}", t.elapsed());
    // ...and the receiver still listens: a real migration gets through.
    let agent = Agent::start(&["--size", "4M"]);
    let sent = send(agent.pid, &recv, &["--timeout", "5s"]);
    assert!(sent.status.success(), "{}", text(&sent.stderr));
    let (ok, _, err) = recv.wait();
    assert!(ok, "{err}");
    assert!(err.contains("no whole frame within the --timeout"), "{err}");
    assert_eq!(dir.entries(), vec!["img"]);
}

#[test]
fn a_receiver_that_stops_answering_ends_the_migration() {
    // Accepts, welcomes, then neither reads nor answers: the source gives
    // up within its --timeout and runs on.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let fake = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut payload = Vec::new();
        let kind = protocol::read_frame(&mut s, &mut payload).unwrap();
        assert_eq!(kind, Kind::Hello);
        protocol::write_control(
            &mut s,
            &Control::Welcome(Welcome {
                version: protocol::VERSION,
                capabilities: protocol::CAPABILITIES,
                decompress_threads: 1,
                channel_token: 0,
            }),
        )
        .unwrap();
        // Hold the connection open, silent, until the test ends.
        let _ = done_rx.recv_timeout(BOUND);
        drop(s);
    });
    let agent = Agent::start(&["--size", "32M", "--profile", "random"]);
    let t = Instant::now();
    let sent = run(&[
        "send",
        "--pid",
        &agent.pid.to_string(),
        "--to",
        &format!("127.0.0.1:{port}"),
        "--timeout",
        "2s",
    ]);
    let took = t.elapsed();
    let _ = done_tx.send(());
    fake.join().unwrap();
    // The writer's TCP_USER_TIMEOUT or the wait for RoundApplied, whichever
    // comes first: the error names the connection either way.
    assert_one_line_error(&sent, "receiver");
    assert!(took < BOUND, "took {took:?}");
    assert_running(agent.pid);
    assert_eq!(uffd_wp_vmas(agent.pid), 0, "write-protect left registered");
}
