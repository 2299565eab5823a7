//! The injected-syscall path: after tracking is armed and finished, the
//! target's registers, its code bytes and its fd table are exactly as
//! before, and it keeps running correctly, also when it was blocked in a
//! system call or has several threads.

#![cfg(target_arch = "x86_64")]

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use common::*;
use nix::sys::ptrace;
use nix::unistd::Pid;
use procmig::dirty::{self, probe, Tracking};
use procmig::process::{self, Attachment, Leave, MemReader};

/// Every thread's registers, as raw words.
fn registers(att: &Attachment) -> BTreeMap<i32, Vec<u64>> {
    att.tids()
        .into_iter()
        .map(|tid| {
            let r = ptrace::getregs(Pid::from_raw(tid)).unwrap();
            let words = std::mem::size_of_val(&r) / 8;
            // SAFETY: user_regs_struct is plain u64 fields.
            let v =
                unsafe { std::slice::from_raw_parts(&r as *const _ as *const u64, words) }.to_vec();
            (tid, v)
        })
        .collect()
}

/// 16 code bytes around each thread's instruction pointer.
fn code(att: &Attachment, pid: i32) -> BTreeMap<i32, Vec<u8>> {
    let mem = MemReader::open(pid).unwrap();
    att.tids()
        .into_iter()
        .map(|tid| {
            let rip = ptrace::getregs(Pid::from_raw(tid)).unwrap().rip & !7;
            let mut b = vec![0u8; 16];
            mem.read(rip, &mut b).unwrap();
            (tid, b)
        })
        .collect()
}

fn fds(pid: i32) -> BTreeMap<String, String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let link = std::fs::read_link(e.path())
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            (e.file_name().to_string_lossy().into_owned(), link)
        })
        .collect()
}

/// Arm and finish uffd-wp tracking on a stopped `pid` (or, where this
/// kernel lacks it, inject getpid), checking nothing visible changed.
fn inject_and_compare(pid: i32) {
    let mut att = Attachment::seize(pid).unwrap();
    att.stop().unwrap();
    let (regs, bytes, files) = (registers(&att), code(&att, pid), fds(pid));

    // A plain injected call returns the right answer in every thread.
    for tid in att.tids() {
        assert_eq!(
            att.inject_syscall(tid, libc::SYS_getpid, [0; 6]).unwrap(),
            pid as i64
        );
    }
    if probe::probe().uffd_wp_async.is_ok() {
        let regions = process::read_regions(pid).unwrap();
        let mut tracker = dirty::create(Tracking::UffdWp, pid, process::page_size()).unwrap();
        tracker.arm(&mut att, &regions).unwrap();
        // The userfaultfd made inside the target was closed there again.
        assert_eq!(fds(pid), files, "fd table while tracking");
        assert!(uffd_wp_vmas(pid) > 0, "no VMA registered for write-protect");
        tracker.finish(Some(&mut att));
        assert_eq!(uffd_wp_vmas(pid), 0, "VMAs still registered after finish");
    } else {
        println!("skipped: uffd-wp arm/finish (kernel lacks it); injected getpid only");
    }
    assert_eq!(registers(&att), regs, "registers");
    assert_eq!(code(&att, pid), bytes, "code bytes");
    assert_eq!(fds(pid), files, "fd table");
    att.detach(Leave::AsFound).unwrap();
}

#[test]
fn blocked_in_read() {
    let mut cat = Command::new("cat")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = cat.id() as i32;
    std::thread::sleep(std::time::Duration::from_millis(200)); // blocked in read(0)
    inject_and_compare(pid);
    // The interrupted read resumes: cat still echoes.
    let mut stdin = cat.stdin.take().unwrap();
    stdin.write_all(b"still here\n").unwrap();
    let mut line = String::new();
    BufReader::new(cat.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line, "still here\n");
    drop(stdin);
    assert!(cat.wait().unwrap().success());
}

#[test]
fn blocked_in_nanosleep() {
    let t = std::time::Instant::now();
    let mut sleep = Command::new("sleep").arg("1.5").spawn().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    inject_and_compare(sleep.id() as i32);
    // The sleep was restarted, not cut short nor broken.
    assert!(sleep.wait().unwrap().success());
    assert!(t.elapsed() >= std::time::Duration::from_millis(1400));
}

#[test]
fn several_threads_busy_writing() {
    let agent = Agent::start(&["--size", "8M", "--dirty-rate", "20000", "--threads", "3"]);
    inject_and_compare(agent.pid);
    assert_running(agent.pid);
    // Still writing correctly: stop it and let it check itself.
    std::thread::sleep(std::time::Duration::from_millis(200));
    let dir = TempDir::new("inject");
    let recv = Recv::start(&dir.join("img"), &[]);
    let sent = send(agent.pid, &recv, &["--mode", "stop-and-copy"]);
    assert!(sent.status.success(), "{}", text(&sent.stderr));
    assert!(recv.wait().0);
    let (ok, out) = agent_verify(&dir.join("img"));
    assert!(ok, "{out}");
}
