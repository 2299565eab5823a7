//! Mutated streams against a real receiver: bit flips, cut ends, dropped,
//! doubled and swapped frames of a valid two-round stream. Whatever it
//! gets, the receiver never panics, ends, and commits nothing or exactly
//! the image the unmutated stream makes. (Not coverage-guided fuzzing; a
//! deterministic sample that runs in every `cargo test`.)

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;
use procmig::protocol::{self, Control, RegionEntry, Run, Totals};

/// Frames of a valid stream: two rounds, a table change, pages and zeros.
fn frames() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut push = |c: Control| {
        let mut b = Vec::new();
        c.encode(&mut b);
        out.push(b);
    };
    push(hello_frame());
    let table = |end: u64| {
        Control::Regions(vec![RegionEntry {
            start: 0x10000,
            end,
            prot: 3,
            name: "x".into(),
        }])
    };
    push(table(0x20000));
    let page = |first: u64, round: u32, fill: u8| {
        let raw = vec![fill; 4096];
        let mut b = Vec::new();
        protocol::encode_pages(
            &mut b,
            round,
            0,
            &[Run { first, count: 1 }],
            &raw,
            |_, _| None,
        );
        b
    };
    let mut frames = out;
    frames.push(page(1, 0, 0xab));
    frames.push(page(2, 0, 0xcd));
    let mut more = Vec::new();
    for c in [
        Control::Zero {
            round: 0,
            region: 0,
            runs: vec![Run { first: 3, count: 2 }],
        },
        Control::RoundEnd(0),
        table(0x30000),
    ] {
        let mut b = Vec::new();
        c.encode(&mut b);
        more.push(b);
    }
    frames.extend(more);
    frames.push(page(1, 1, 0x11));
    frames.push(page(20, 1, 0x22));
    for c in [
        Control::RoundEnd(1),
        Control::End(Totals {
            rounds: 2,
            normal_pages: 4,
            zero_pages: 2,
            page_frames: 4,
            zero_frames: 1,
        }),
        Control::Commit,
    ] {
        let mut b = Vec::new();
        c.encode(&mut b);
        frames.push(b);
    }
    frames
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn mutate(frames: &[Vec<u8>], rng: &mut Rng) -> Vec<u8> {
    let mut f: Vec<Vec<u8>> = frames.to_vec();
    // Keep Hello intact most of the time, so the session itself is hit.
    let pick = |rng: &mut Rng| 1 + rng.below(f.len() - 1);
    match rng.below(6) {
        0 => {
            let i = pick(rng);
            let j = rng.below(f[i].len());
            f[i][j] ^= 1 << rng.below(8);
        }
        1 => {
            let i = pick(rng);
            f.remove(i);
        }
        2 => {
            let i = pick(rng);
            let dup = f[i].clone();
            f.insert(i, dup);
        }
        3 => {
            let (i, j) = (pick(rng), pick(rng));
            f.swap(i, j);
        }
        4 => {
            let i = pick(rng);
            let j = rng.below(f[i].len());
            f[i].truncate(j);
            f.truncate(i + 1);
        }
        _ => {
            // A payload byte that the frame checksum does not cover: fix
            // the checksum so the decoder, not the checksum, must object.
            let i = pick(rng);
            if f[i].len() > 16 {
                let j = 16 + rng.below(f[i].len() - 16);
                f[i][j] = rng.next() as u8;
                let check = xxhash_rust::xxh3::xxh3_64(&f[i][16..]) as u32;
                f[i][12..16].copy_from_slice(&check.to_le_bytes());
            }
        }
    }
    f.concat()
}

#[test]
fn mutated_streams_never_panic_nor_commit_garbage() {
    let frames = frames();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let (mut committed, mut refused) = (0, 0);
    for case in 0..60 {
        let bytes = mutate(&frames, &mut rng);
        let dir = TempDir::new("mutate");
        let out = dir.join("img");
        let recv = Recv::start(&out, &["--timeout", "2s"]);
        {
            let mut s = TcpStream::connect(recv.addr()).unwrap();
            let _ = s.write_all(&bytes);
            let _ = s.shutdown(std::net::Shutdown::Write);
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let _ = s.read_to_end(&mut Vec::new());
        }
        // A stream whose Hello was broken leaves the receiver listening:
        // end it as a user would (a finished one ignores this).
        std::thread::sleep(Duration::from_millis(50));
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(recv.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let (ok, _, err) = recv.wait();
        assert!(!err.contains("panicked"), "case {case}: {err}");
        if ok {
            committed += 1;
            let image = procmig::image::Image::open(&out).unwrap();
            assert!(image.check_digests().unwrap().is_empty(), "case {case}");
            // And it is the image the unmutated stream makes.
            let map = image.map_region(&image.manifest.regions[0]).unwrap();
            assert_eq!(map.len(), 0x20000, "case {case}");
            for (p, page) in map.chunks(4096).enumerate() {
                let want = match p {
                    1 => 0x11,
                    2 => 0xcd,
                    20 => 0x22,
                    _ => 0,
                };
                assert!(page.iter().all(|&b| b == want), "case {case}: page {p}");
            }
        } else {
            refused += 1;
            assert!(
                !out.exists(),
                "case {case}: failed but committed something: {err}"
            );
        }
    }
    println!("mutated streams: {committed} committed, {refused} refused");
    assert!(refused > 0);
}
