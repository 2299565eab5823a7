//! Soft-dirty dirty tracking on a kernel that has it. This machine's kernel
//! is built without CONFIG_MEM_SOFT_DIRTY, so `scripts/vmtest` boots
//! Debian's kernel in QEMU (TCG) on an initramfs holding the release
//! binaries, migrates a busy procmig-agent inside the VM with
//! `procmig send $SEND_ARGS` and checks the image with both verifiers.
//! The script builds the release binaries itself; it needs the Debian
//! packages qemu-system-x86, busybox-static and cpio (exit status 77 and a
//! "skipped: why" line without them).

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, Stdio};

/// What `procmig send` is given inside the VM (the script's SEND_ARGS).
/// Bounded rounds: an emulated CPU on a loaded machine may not converge,
/// and convergence is not what this test checks.
pub const SEND_ARGS: &str = "--dirty-tracking soft-dirty --max-iterations 4 --force-downtime";

#[test]

fn soft_dirty_migration_in_vm() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/vmtest");
    let mut child = Command::new(&script)
        .env("SEND_ARGS", SEND_ARGS)
        .env("CARGO", env!("CARGO"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("run {}: {e}", script.display()));

    // Echo both streams as they come (a run takes a while), keep stdout.
    let mut stderr = child.stderr.take().unwrap();
    let err_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        eprint!("{s}");
        s
    });
    let mut stdout_lines = Vec::new();
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.expect("read the script's output");
        println!("{line}");
        stdout_lines.push(line);
    }
    let status = child.wait().expect("wait for scripts/vmtest");
    let stderr = err_thread.join().unwrap();

    if status.code() == Some(77) {
        let reason = stdout_lines
            .iter()
            .find_map(|l| l.strip_prefix("skipped: "))
            .unwrap_or("scripts/vmtest exited 77");
        println!("skipped: {reason}");
        return;
    }
    let passed = stdout_lines.iter().any(|l| l.trim_end() == "VMTEST: PASS");
    assert!(
        status.success() && passed,
        "scripts/vmtest with SEND_ARGS={SEND_ARGS:?} failed ({status}); \
         VMTEST lines:\n{}\nstderr:\n{stderr}",
        stdout_lines
            .iter()
            .filter(|l| l.starts_with("VMTEST") || l.starts_with("vmtest"))
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}
