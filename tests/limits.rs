//! The receiver's work and memory follow the bytes it receives, not the
//! sizes a stream declares; its output path is checked up front; stale
//! staging directories of dead receivers are removed; a bare port listens
//! on loopback only; an image over --max-image-size is refused. (The
//! children here stay small but the receiver that must: RUSAGE_CHILDREN
//! reports the largest one.)

mod common;

use std::io::Write;
use std::net::TcpStream;

use common::*;
use procmig::protocol::{Control, RegionEntry, Totals};

/// Hello, one region of `len` bytes, End with nothing sent, Commit.
fn empty_stream(len: u64) -> Vec<u8> {
    let mut b = Vec::new();
    hello_frame().encode(&mut b);
    Control::Regions(vec![RegionEntry {
        start: 0x7000_0000_0000,
        end: 0x7000_0000_0000 + len,
        prot: 3,
        name: "reservation".into(),
    }])
    .encode(&mut b);
    Control::RoundEnd(0).encode(&mut b);
    Control::End(Totals {
        rounds: 1,
        ..Default::default()
    })
    .encode(&mut b);
    Control::Commit.encode(&mut b);
    b
}

#[test]
fn a_stream_declaring_64_gib_costs_what_it_sends() {
    let dir = TempDir::new("huge");
    let out = dir.join("img");
    let recv = Recv::start(&out, &[]);
    let stream = empty_stream(64 << 30);
    assert!(stream.len() < 200, "{} bytes", stream.len());
    let mut s = TcpStream::connect(recv.addr()).unwrap();
    s.write_all(&stream).unwrap();
    let mut rest = Vec::new();
    let _ = std::io::Read::read_to_end(&mut s, &mut rest);
    let (ok, _, err) = recv.wait();
    assert!(ok, "{err}");
    // The receiver was this test's only child: its peak memory.
    // SAFETY: getrusage fills the struct it is given.
    let peak_kib = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru);
        ru.ru_maxrss
    };
    assert!(peak_kib < 256 << 10, "receiver peaked at {peak_kib} KiB");
    let image = procmig::image::Image::open(&out).unwrap();
    assert_eq!(image.manifest.regions[0].populated_pages, 0);
    assert!(image.check_digests().unwrap().is_empty());
}

#[test]
fn an_image_over_max_image_size_is_refused_and_the_source_runs_on() {
    let agent = Agent::start(&["--size", "8M", "--profile", "random"]);
    let dir = TempDir::new("maxsize");
    let recv = Recv::start(&dir.join("img"), &["--max-image-size", "2M"]);
    let sent = send(agent.pid, &recv, &["--compress", "none"]);
    let (ok, _, err) = recv.wait();
    assert!(!ok);
    assert!(
        err.contains("does not fit") && err.contains("--max-image-size"),
        "{err}"
    );
    assert_one_line_error(&sent, "does not fit");
    assert_running(agent.pid);
    assert!(dir.entries().is_empty(), "left behind: {:?}", dir.entries());
}
