//! A process's transparent huge pages survive being tracked: after a
//! migration that resumes it, and after a cancelled one, its huge-page
//! backed memory is huge again (uffd-wp splits huge pages while tracking).

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use procmig::dirty::probe;
use procmig::process::thp;

/// python3 writing random pages of a 64 MiB MADV_HUGEPAGE region until its
/// stdin closes.
fn thp_writer() -> Option<Child> {
    let script = "import mmap, random, sys, threading, time\n\
        N = 64 << 20\n\
        m = mmap.mmap(-1, N, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)\n\
        m.madvise(mmap.MADV_HUGEPAGE)\n\
        for i in range(0, N, 4096):\n    m[i] = 1\n\
        done = threading.Event()\n\
        threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()\n\
        print('ready', flush=True)\n\
        while not done.is_set():\n\
        \x20   for _ in range(500):\n\
        \x20       m[random.randrange(N // 4096) * 4096 + 9] = random.randrange(256)\n\
        \x20   time.sleep(0.005)\n";
    let mut child = Command::new("python3")
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .ok()?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .ok()?;
    (line.trim() == "ready").then_some(child)
}

/// The writer, with its huge pages, or why the test cannot run here.
fn start() -> Result<(Child, u64), String> {
    if let Err(why) = probe::probe().uffd_wp_async {
        return Err(format!("uffd-wp is not available: {why}"));
    }
    let mut child = thp_writer().ok_or("python3 is not installed")?;
    let huge = thp::anon_huge_bytes(child.id() as i32);
    if huge < 32 << 20 {
        let _ = child.kill();
        let _ = child.wait();
        return Err(format!(
            "transparent huge pages are not available (only {huge} bytes after MADV_HUGEPAGE)"
        ));
    }
    Ok((child, huge))
}

fn finish(mut child: Child) {
    drop(child.stdin.take());
    let st = child.wait().unwrap();
    assert!(st.success(), "python exited with {st}");
}

fn assert_huge_again(pid: i32, before: u64, what: &str) {
    let after = thp::anon_huge_bytes(pid);
    assert!(
        after * 10 >= before * 9,
        "{what}: huge pages {before} bytes before, {after} after"
    );
}

#[test]
fn huge_pages_survive_a_migration_that_resumes() {
    let (child, before) = match start() {
        Ok(c) => c,
        Err(why) => return println!("skipped: {why}"),
    };
    let pid = child.id() as i32;
    let dir = TempDir::new("thp");
    let recv = Recv::start(&dir.join("img"), &[]);
    let sent = send(
        pid,
        &recv,
        &[
            "--dirty-tracking",
            "uffd-wp",
            "--on-complete",
            "resume",
            "--max-bandwidth",
            "40M",
            "--max-iterations",
            "3",
            "--force-downtime",
        ],
    );
    assert!(sent.status.success(), "{}", text(&sent.stderr));
    assert!(recv.wait().0);
    assert_running(pid);
    assert_huge_again(pid, before, "after a completed migration");
    finish(child);
}

#[test]
fn huge_pages_survive_a_cancelled_migration() {
    let (child, before) = match start() {
        Ok(c) => c,
        Err(why) => return println!("skipped: {why}"),
    };
    let pid = child.id() as i32;
    let dir = TempDir::new("thpcancel");
    let recv = Recv::start(&dir.join("img"), &[]);
    let mut sender = Command::new(procmig())
        .args(["send", "--pid", &pid.to_string(), "--to", &recv.addr()])
        .args(["--dirty-tracking", "uffd-wp", "--max-bandwidth", "4M"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Cancel once tracking has split the huge pages (a few rounds in).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while thp::anon_huge_bytes(pid) * 2 > before && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(sender.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let st = sender.wait().unwrap();
    assert!(!st.success());
    assert!(!recv.wait().0);
    assert_running(pid);
    assert_eq!(uffd_wp_vmas(pid), 0, "write-protect left registered");
    assert_huge_again(pid, before, "after a cancelled migration");
    finish(child);
}
