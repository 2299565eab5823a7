//! The receiver's whole session fed from bytes: admission, the Hello, the
//! region table, rounds of pages, End, Commit, exactly as `procmig recv`
//! runs them, through a Unix socket pair. Before the bytes go in, every
//! frame's checksum is set right (otherwise almost every mutation would
//! stop at the first checksum and nothing deeper would be reached).
//!
//! Asserted on every input: no panic, no hang (libFuzzer's -timeout), no
//! memory beyond -rss_limit_mb, and the rule that the receiver commits
//! nothing partial: when `serve` fails, there is no image and no staging
//! directory left behind.
#![no_main]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use procmig::dest::{self, RecvConfig};
use procmig::protocol::{transport::Connection, HEADER_LEN};

fn scratch() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        // libFuzzer exits without running destructors, so each run leaves
        // its (empty) directory: remove those of runs that are gone.
        for e in std::fs::read_dir(&base).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let pid = name.strip_prefix("procmig-fuzz-").and_then(|p| p.parse::<u32>().ok());
            if let Some(pid) = pid {
                if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let d = base.join(format!("procmig-fuzz-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    })
}

/// Walk the bytes as frames and set each payload checksum.
fn fix_checksums(data: &mut [u8]) {
    let mut at = 0;
    while at + HEADER_LEN <= data.len() {
        let len = u32::from_le_bytes(data[at + 8..at + 12].try_into().unwrap()) as usize;
        let end = (at + HEADER_LEN).saturating_add(len).min(data.len());
        let sum = xxhash_rust::xxh3::xxh3_64(&data[at + HEADER_LEN..end]) as u32;
        data[at + 12..at + 16].copy_from_slice(&sum.to_le_bytes());
        at = end;
    }
}

fuzz_target!(|input: &[u8]| {
    let mut data = input.to_vec();
    fix_checksums(&mut data);
    let out = scratch().join("img");
    let cfg = RecvConfig {
        recover_timeout: std::time::Duration::ZERO,
        listen: String::new(),
        out: out.clone(),
        decompress_threads: 1,
        force: true,
        progress: None,
        timeout: Duration::from_secs(2),
        max_image_size: Some(64 << 20),
        restore: None,
        tls: None,
    };
    let (ours, theirs) = UnixStream::pair().unwrap();
    let sender = std::thread::spawn(move || {
        let mut s = theirs;
        let _ = s.write_all(&data);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let _ = s.read_to_end(&mut Vec::new());
    });
    let cancel = Arc::new(AtomicBool::new(false));
    let r = dest::serve(&cfg, Connection::from_unix(ours, "fuzz"), &cancel);
    sender.join().unwrap();
    let left: Vec<_> = std::fs::read_dir(scratch())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    match r {
        Ok(_) => {
            assert!(out.is_dir(), "committed, but no image");
            std::fs::remove_dir_all(&out).unwrap();
        }
        Err(e) => assert!(left.is_empty(), "failed ({e}) but left {left:?}"),
    }
});
