//! Shared mappings: a /dev/shm (tmpfs) file lives only in memory and is
//! migrated; a shared mapping of a file on disk is left out, and both the
//! report and verify say so.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use common::*;

#[test]
fn dev_shm_is_migrated_and_a_disk_file_is_listed_as_left_out() {
    let dir = TempDir::new("shared");
    let shm = format!("/dev/shm/procmig-test-{}", std::process::id());
    if !std::path::Path::new("/dev/shm").is_dir() {
        return println!("skipped: no /dev/shm here");
    }
    let disk = dir.join("disk.bin");
    let script = "import mmap, sys\n\
        shm = open(sys.argv[1], 'w+b'); shm.truncate(4 << 20)\n\
        a = mmap.mmap(shm.fileno(), 4 << 20, flags=mmap.MAP_SHARED)\n\
        for i in range(0, 4 << 20, 4096): a[i:i+17] = b'shm-page-%08d' % (i // 4096)\n\
        disk = open(sys.argv[2], 'w+b'); disk.truncate(1 << 20)\n\
        b = mmap.mmap(disk.fileno(), 1 << 20, flags=mmap.MAP_SHARED)\n\
        b[0:4] = b'disk'\n\
        print('ready', flush=True)\n\
        sys.stdin.read()\n";
    let Ok(mut py) = Command::new("python3")
        .args(["-c", script, &shm, disk.to_str().unwrap()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
    else {
        return println!("skipped: python3 is not installed");
    };
    let mut line = String::new();
    BufReader::new(py.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready");
    let pid = py.id() as i32;
    let out = dir.join("img");
    let recv = Recv::start(&out, &[]);
    let sent = send(pid, &recv, &["--json"]);
    let (ok, _, err) = recv.wait();
    let _ = std::fs::remove_file(&shm);
    assert!(sent.status.success(), "{}", text(&sent.stderr));
    assert!(ok, "{err}");
    let report: serde_json::Value = serde_json::from_slice(&sent.stdout).unwrap();

    // The /dev/shm mapping is in the image, byte for byte.
    let image = procmig::image::Image::open(&out).unwrap();
    let rec = image
        .manifest
        .regions
        .iter()
        .find(|r| r.name == shm)
        .unwrap_or_else(|| panic!("{shm} not in the image: {report}"));
    let map = image.map_region(rec).unwrap();
    assert_eq!(&map[4096 * 7..4096 * 7 + 17], b"shm-page-00000007");
    // The disk file is left out, with its reason.
    let left = report["left_out"].as_array().unwrap();
    let d = left
        .iter()
        .find(|l| l["name"] == disk.to_str().unwrap())
        .unwrap_or_else(|| panic!("disk mapping not listed: {report}"));
    assert!(
        d["reason"].as_str().unwrap().contains("file on disk"),
        "{d}"
    );

    let v = verify(pid, &out);
    let s = text(&v.stdout);
    assert!(v.status.success(), "{s}");
    assert!(s.contains("identical"), "{s}");
    assert!(
        s.contains("not compared: 1 mappings") && s.contains("disk.bin"),
        "{s}"
    );
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGCONT,
    );
    drop(py.stdin.take());
    assert!(py.wait().unwrap().success());
}
