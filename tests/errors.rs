//! Bad input and failures: one clear line, the source keeps running, and
//! no image appears under the final name.

mod common;

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use procmig::protocol::{self, Control, Kind, Run, WireCodec};

#[test]
fn no_such_pid() {
    let out = run(&["send", "--pid", "999999999", "--to", "127.0.0.1:1"]);
    assert_one_line_error(&out, "no process with pid 999999999");
}

#[test]
fn pid_we_may_not_trace() {
    // As root, drop to nobody and try to trace our own (root-owned) agent;
    // otherwise try pid 1, which an unprivileged user may never trace.
    let agent;
    let out = if is_root() {
        if Command::new("setpriv").arg("--version").output().is_err() {
            println!("skipped: setpriv is not installed");
            return;
        }
        agent = Agent::start(&["--size", "1M"]);
        // The binary must be reachable by nobody: copy it to a 0755 dir.
        let dir = TempDir::new("nobody");
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let bin = dir.join("procmig");
        std::fs::copy(procmig(), &bin).unwrap();
        let o = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(&bin)
            .args([
                "send",
                "--pid",
                &agent.pid.to_string(),
                "--to",
                "127.0.0.1:1",
            ])
            .output()
            .unwrap();
        assert_running(agent.pid);
        o
    } else {
        run(&["send", "--pid", "1", "--to", "127.0.0.1:1"])
    };
    assert_one_line_error(&out, "not permitted to trace");
}

#[test]
fn receiver_not_listening() {
    let agent = Agent::start(&["--size", "2M", "--dirty-rate", "1000"]);
    let to = format!("127.0.0.1:{}", free_port());
    let out = run(&["send", "--pid", &agent.pid.to_string(), "--to", &to]);
    assert_one_line_error(&out, "cannot connect to receiver");
    assert_running(agent.pid);
}

#[test]
fn port_in_use() {
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let dir = TempDir::new("port");
    let out = run(&[
        "recv",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--out",
        dir.join("img").to_str().unwrap(),
    ]);
    assert_one_line_error(&out, "cannot listen on");
    assert!(dir.entries().is_empty(), "left behind: {:?}", dir.entries());
}

#[test]
fn out_dir_not_writable() {
    let dir = TempDir::new("notdir");
    let file = dir.join("plainfile");
    std::fs::write(&file, b"x").unwrap();
    let out = run(&[
        "recv",
        "--listen",
        "0",
        "--out",
        file.join("img").to_str().unwrap(),
    ]);
    assert_one_line_error(&out, "cannot write into");
}

#[test]
fn out_exists_needs_force() {
    let dir = TempDir::new("exists");
    std::fs::create_dir(dir.join("img")).unwrap();
    let out = run(&[
        "recv",
        "--listen",
        "0",
        "--out",
        dir.join("img").to_str().unwrap(),
    ]);
    assert_one_line_error(&out, "already exists");
}

#[test]
fn bad_options() {
    for (args, needle) in [
        (
            vec!["--compress", "zstd", "--compress-level", "25"],
            "out of range",
        ),
        (
            vec!["--compress", "lz4", "--compress-level", "3"],
            "does not apply to lz4",
        ),
        (vec!["--compress-threads", "0"], "--compress-threads"),
        (vec!["--max-bandwidth", "fast"], "invalid size"),
        (vec!["--region", "9-1"], "empty address range"),
    ] {
        let mut a = vec!["send", "--pid", "1", "--to", "127.0.0.1:1"];
        a.extend(args);
        let out = run(&a);
        assert!(!out.status.success());
        assert!(
            text(&out.stderr).contains(needle),
            "{a:?}: {}",
            text(&out.stderr)
        );
    }
}

/// Start a receiver, feed it `bytes`, and check it fails with one line
/// mentioning `needle` and commits nothing.
fn feed_receiver(bytes: &[u8], needle: &str) {
    let dir = TempDir::new("feed");
    let recv = Recv::start(&dir.join("img"), &[]);
    {
        let mut s = TcpStream::connect(recv.addr()).unwrap();
        let _ = s.write_all(bytes);
        let _ = s.shutdown(std::net::Shutdown::Write);
        // Read whatever it answers until it closes.
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let _ = std::io::Read::read_to_end(&mut s, &mut Vec::new());
    }
    let (ok, _, err) = recv.wait();
    assert!(!ok, "receiver accepted a bad stream");
    assert!(!err.contains("panicked"), "{err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].contains(needle), "{:?} lacks {needle:?}", lines[0]);
    assert!(dir.entries().is_empty(), "left behind: {:?}", dir.entries());
}

fn pages_frame(first: u64, xxh3: u64) -> Vec<u8> {
    let data = vec![0xabu8; 4096];
    let mut b = Vec::new();
    let start = protocol::begin_frame(&mut b, Kind::Pages);
    protocol::put_pages_header(
        &mut b,
        0,
        0,
        WireCodec::Raw,
        4096,
        xxh3,
        &[Run { first, count: 1 }],
    );
    b.extend_from_slice(&data);
    protocol::end_frame(&mut b, start);
    b
}

/// A whole valid stream: one page (page 3 of the region), one round, End,
/// and the handover's Commit (a real source sends it only after Applied;
/// the receiver reads it after Applied either way).
fn complete_stream() -> Vec<u8> {
    let mut b = start_of_stream();
    b.extend(pages_frame(3, good_xxh3()));
    end_of_stream(&mut b, 1);
    b
}

/// End a one-round stream of one Pages frame holding `pages` pages:
/// RoundEnd, End with the totals, and the handover's Commit.
fn end_of_stream(b: &mut Vec<u8>, pages: u64) {
    Control::RoundEnd(0).encode(b);
    Control::End(protocol::Totals {
        rounds: 1,
        normal_pages: pages,
        zero_pages: 0,
        page_frames: 1,
        zero_frames: 0,
    })
    .encode(b);
    Control::Commit.encode(b);
}

fn good_xxh3() -> u64 {
    xxhash_rust::xxh3::xxh3_64(&[0xabu8; 4096])
}

#[test]
fn garbage_is_rejected_and_the_real_sender_still_gets_through() {
    // A client sending garbage is turned away with one line; one that
    // connects and says nothing holds nothing; the real stream commits.
    let dir = TempDir::new("garbage");
    let out = dir.join("img");
    let recv = Recv::start(&out, &[]);
    let garbage: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    {
        let mut s = TcpStream::connect(recv.addr()).unwrap();
        let _ = s.write_all(&garbage);
        let _ = s.shutdown(std::net::Shutdown::Write);
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        // The receiver closes it.
        let _ = std::io::Read::read_to_end(&mut s, &mut Vec::new());
    }
    let _idle = TcpStream::connect(recv.addr()).unwrap();
    let mut s = TcpStream::connect(recv.addr()).unwrap();
    s.write_all(&complete_stream()).unwrap();
    let mut payload = Vec::new();
    for want in [Kind::Welcome, Kind::RoundApplied, Kind::Applied, Kind::Ack] {
        assert_eq!(protocol::read_frame(&mut s, &mut payload).unwrap(), want);
    }
    let (ok, _, err) = recv.wait();
    assert!(ok, "{err}");
    let rejected: Vec<&str> = err.lines().filter(|l| l.contains("rejected")).collect();
    assert_eq!(rejected.len(), 1, "{err}");
    assert!(rejected[0].contains("not a procmig stream"), "{err}");
    assert!(procmig::image::Image::open(&out).is_ok());
}

#[test]
fn truncated_stream() {
    let mut b = start_of_stream();
    b.extend(pages_frame(1, good_xxh3()));
    let full = pages_frame(2, good_xxh3());
    b.extend_from_slice(&full[..full.len() / 2]);
    feed_receiver(&b, "truncated");
}

#[test]
fn stream_that_stops_between_frames() {
    let mut b = start_of_stream();
    b.extend(pages_frame(1, good_xxh3()));
    feed_receiver(&b, "connection closed");
}

#[test]
fn page_checksum_mismatch() {
    let mut b = start_of_stream();
    b.extend(pages_frame(1, good_xxh3() ^ 1));
    Control::RoundEnd(0).encode(&mut b);
    feed_receiver(&b, "checksum mismatch");
}

/// A zstd frame of `runs` holding `pages` (compressed as one batch), with
/// the checksum `xxh3`.
fn zstd_pages_frame(runs: &[Run], pages: &[u8], xxh3: u64) -> Vec<u8> {
    let mut c = procmig::codec::Compressor::new(procmig::codec::Compression::Zstd, 1).unwrap();
    let mut data = Vec::new();
    assert_eq!(c.compress(pages, &mut data), Some(WireCodec::Zstd));
    let mut b = Vec::new();
    let start = protocol::begin_frame(&mut b, Kind::Pages);
    protocol::put_pages_header(
        &mut b,
        0,
        0,
        WireCodec::Zstd,
        pages.len() as u32,
        xxh3,
        runs,
    );
    b.extend_from_slice(&data);
    protocol::end_frame(&mut b, start);
    b
}

#[test]
fn compressed_pages_with_a_bad_checksum() {
    // A frame of one run is decompressed straight into the image, one of
    // several through a buffer: either way a bad checksum fails the
    // session and leaves no image behind.
    let pages: Vec<u8> = (0..3 * 4096u32).map(|i| (i % 251) as u8).collect();
    let good = xxhash_rust::xxh3::xxh3_64(&pages);
    for runs in [
        &[Run { first: 2, count: 3 }][..],
        &[Run { first: 0, count: 1 }, Run { first: 5, count: 2 }][..],
    ] {
        let mut b = start_of_stream();
        b.extend(zstd_pages_frame(runs, &pages, good ^ 1 << 40));
        Control::RoundEnd(0).encode(&mut b);
        feed_receiver(&b, "checksum mismatch");
    }
}

#[test]
fn compressed_pages_land_where_their_runs_say() {
    // The same two shapes with the right checksum: the image holds each
    // run's pages at its place, zero elsewhere.
    let ps = 4096;
    let pages: Vec<u8> = (0..3 * ps as u32).map(|i| (i % 251) as u8 | 1).collect();
    let good = xxhash_rust::xxh3::xxh3_64(&pages);
    for runs in [
        &[Run { first: 2, count: 3 }][..],
        &[Run { first: 0, count: 1 }, Run { first: 5, count: 2 }][..],
    ] {
        let dir = TempDir::new("zstd-runs");
        let out = dir.join("img");
        let recv = Recv::start(&out, &[]);
        let mut b = start_of_stream();
        b.extend(zstd_pages_frame(runs, &pages, good));
        end_of_stream(&mut b, 3);
        let mut s = TcpStream::connect(recv.addr()).unwrap();
        s.write_all(&b).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let _ = std::io::Read::read_to_end(&mut s, &mut Vec::new());
        let (ok, _, err) = recv.wait();
        assert!(ok, "{err}");
        let img = procmig::image::Image::open(&out).unwrap();
        let region = std::fs::read(out.join(&img.manifest.regions[0].file)).unwrap();
        let mut want = vec![0u8; region.len()];
        let mut off = 0;
        for r in runs {
            let (at, len) = (r.first as usize * ps, r.count as usize * ps);
            want[at..at + len].copy_from_slice(&pages[off..off + len]);
            off += len;
        }
        assert!(region == want, "runs {runs:?} landed elsewhere");
        assert!(img.check_digests().unwrap().is_empty(), "runs {runs:?}");
    }
}

#[test]
fn page_outside_region() {
    let mut b = start_of_stream();
    b.extend(pages_frame(16, good_xxh3()));
    feed_receiver(&b, "outside region");
}

#[test]
fn page_sent_twice_in_a_round() {
    let mut b = start_of_stream();
    b.extend(pages_frame(3, good_xxh3()));
    b.extend(pages_frame(3, good_xxh3()));
    feed_receiver(&b, "sent twice");
}

#[test]
fn totals_that_do_not_match() {
    let mut b = start_of_stream();
    b.extend(pages_frame(3, good_xxh3()));
    Control::RoundEnd(0).encode(&mut b);
    Control::End(protocol::Totals {
        rounds: 1,
        normal_pages: 2,
        zero_pages: 0,
        page_frames: 1,
        zero_frames: 0,
    })
    .encode(&mut b);
    feed_receiver(&b, "totals differ");
}

#[test]
fn a_complete_handmade_stream_commits() {
    // The counterpart of the failures above: the same frames, ended
    // properly, produce an image with exactly that page.
    // Version 2 confirms each round (RoundApplied) and commits on the
    // source's Commit; a version-1 source gets the version-1 answers.
    for (version, answers) in [
        (
            protocol::VERSION,
            &[Kind::Welcome, Kind::RoundApplied, Kind::Applied, Kind::Ack][..],
        ),
        (1, &[Kind::Welcome, Kind::Applied, Kind::Ack][..]),
    ] {
        let dir = TempDir::new("handmade");
        check_handmade_commit(&dir, version, answers);
    }
}

fn check_handmade_commit(dir: &TempDir, version: u16, answers: &[Kind]) {
    let out = dir.join("img");
    let recv = Recv::start(&out, &[]);
    let mut b = Vec::new();
    if let Control::Hello(mut h) = hello_frame() {
        h.version = version;
        Control::Hello(h).encode(&mut b);
    }
    let hello_len = {
        let mut h = Vec::new();
        hello_frame().encode(&mut h);
        h.len()
    };
    b.extend_from_slice(&complete_stream()[hello_len..]);
    let mut s = TcpStream::connect(recv.addr()).unwrap();
    s.write_all(&b).unwrap();
    let mut payload = Vec::new();
    for want in answers {
        let got = protocol::read_frame(&mut s, &mut payload).unwrap();
        assert_eq!(got, *want, "version {version}");

        if got == Kind::Welcome {
            match Control::decode(got, &payload).unwrap() {
                Control::Welcome(w) => assert_eq!(w.version, version),
                other => panic!("{other:?}"),
            }
        }
    }
    let (ok, _, err) = recv.wait();
    assert!(ok, "{err}");
    let img = procmig::image::Image::open(&out).unwrap();
    let rec = &img.manifest.regions[0];
    let map = img.map_region(rec).unwrap();
    assert!(map[..3 * 4096].iter().all(|&b| b == 0));
    assert!(map[3 * 4096..4 * 4096].iter().all(|&b| b == 0xab));
    assert!(map[4 * 4096..].iter().all(|&b| b == 0));
    assert_eq!(dir.entries(), vec!["img"]);
}

#[test]
fn force_replaces_an_existing_image_only_when_complete() {
    let dir = TempDir::new("force");
    let out = dir.join("img");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("old-file"), b"old").unwrap();
    // A failed migration leaves the old image alone.
    {
        let recv = Recv::start(&out, &["--force"]);
        let mut s = TcpStream::connect(recv.addr()).unwrap();
        s.write_all(&start_of_stream()).unwrap();
        drop(s);
        assert!(!recv.wait().0);
        assert!(
            out.join("old-file").exists(),
            "old image damaged by a failed run"
        );
    }
    // A complete one replaces it.
    let recv = Recv::start(&out, &["--force"]);
    let b = complete_stream();
    let mut s = TcpStream::connect(recv.addr()).unwrap();
    s.write_all(&b).unwrap();
    let mut rest = Vec::new();
    let _ = std::io::Read::read_to_end(&mut s, &mut rest);
    let (ok, _, err) = recv.wait();
    assert!(ok, "{err}");
    assert!(!out.join("old-file").exists());
    assert!(procmig::image::Image::open(&out).is_ok());
    assert_eq!(
        dir.entries(),
        vec!["img"],
        "staging or old copies left behind"
    );
}

/// A slow migration (bandwidth-capped, incompressible), interrupted.
fn slow_migration() -> (Agent, TempDir, Recv, std::process::Child) {
    let agent = Agent::start(&[
        "--size",
        "64M",
        "--profile",
        "random",
        "--dirty-rate",
        "500",
    ]);
    let dir = TempDir::new("slow");
    let recv = Recv::start(&dir.join("img"), &[]);
    let send = Command::new(procmig())
        .args([
            "send",
            "--pid",
            &agent.pid.to_string(),
            "--to",
            &recv.addr(),
        ])
        .args(["--max-bandwidth", "4M", "--compress", "lz4"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Let it get going: the process is stopped while pages flow.
    let t = std::time::Instant::now();
    while proc_state(agent.pid).map(|s| s.1) == Some(0) && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500));
    (agent, dir, recv, send)
}

#[test]
fn sigint_resumes_the_source() {
    let (agent, dir, recv, send) = slow_migration();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(send.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let out = send.wait_with_output().unwrap();
    assert_one_line_error(&out, "cancelled");
    assert_running(agent.pid);
    assert_eq!(uffd_wp_vmas(agent.pid), 0, "write-protect left registered");
    let (ok, _, err) = recv.wait();
    assert!(!ok, "receiver committed a cancelled migration");
    assert!(err.lines().count() == 1, "{err}");
    assert!(dir.entries().is_empty(), "left behind: {:?}", dir.entries());
}

#[test]
fn receiver_dies_mid_stream() {
    let (agent, dir, mut recv, send) = slow_migration();
    recv.child.kill().unwrap();
    let out = send.wait_with_output().unwrap();
    assert_one_line_error(&out, "connection");
    assert_running(agent.pid);
    assert_eq!(uffd_wp_vmas(agent.pid), 0, "write-protect left registered");
    let _ = recv.child.wait();
    // The receiver was killed -9: its staging directory may remain, but
    // nothing is under the final name.
    assert!(!dir.join("img").exists());
}

#[test]
fn sigterm_on_the_receiver_removes_staging() {
    let (agent, dir, recv, send) = slow_migration();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(recv.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let (ok, _, err) = recv.wait();
    assert!(!ok);
    assert!(err.contains("cancelled"), "{err}");
    let out = send.wait_with_output().unwrap();
    assert_one_line_error(&out, "receiver");
    assert_running(agent.pid);
    assert!(dir.entries().is_empty(), "left behind: {:?}", dir.entries());
}

#[test]
fn a_dangling_symlink_out_is_refused_up_front() {
    let dir = TempDir::new("symlink");
    let out = dir.join("img");
    std::os::unix::fs::symlink(dir.join("nowhere"), &out).unwrap();
    let r = run(&[
        "recv",
        "--listen",
        "127.0.0.1:0",
        "--out",
        out.to_str().unwrap(),
        "--force",
    ]);
    assert_one_line_error(&r, "symbolic link");
    assert_eq!(r.status.code(), Some(2));
}

#[test]
fn stale_staging_of_a_dead_receiver_is_removed_and_a_bare_port_is_loopback() {
    let dir = TempDir::new("stale");
    // PIDs are at most 2^22 on Linux: this one belongs to nobody.
    let stale = dir.join(".img.partial-99999999");
    std::fs::create_dir(&stale).unwrap();
    std::fs::write(stale.join("seg-0.bin"), b"old").unwrap();
    let mut child = std::process::Command::new(procmig())
        .args(["recv", "--listen", "0", "--out"])
        .arg(dir.join("img"))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stderr.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(line.contains("listening on 127.0.0.1:"), "{line}");
    assert!(!stale.exists(), "stale staging left: {:?}", dir.entries());
}
