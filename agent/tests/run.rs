//! Runs the real `procmig-agent` binary.

use std::collections::BTreeSet;
use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use procmig::image::{
    digest_pages, hex_digest, region_file_name, Manifest, RegionRecord, FORMAT_NAME,
    FORMAT_VERSION, MANIFEST_NAME,
};

const AGENT: &str = env!("CARGO_BIN_EXE_procmig-agent");
const BASE: u64 = 0x5a00_0000_0000;

/// The child is killed when this is dropped, even if the test fails.
struct Agent {
    child: Child,
    pid: u32,
    size: u64,
    data_pages: u64,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(args: &[&str]) -> Agent {
    let mut child = Command::new(AGENT)
        .arg("run")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn procmig-agent");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let fields: Vec<&str> = line.trim_end().split(' ').collect();
    assert_eq!(fields.len(), 6, "ready line {line:?}");
    assert_eq!(&fields[..2], ["procmig-agent", "ready"], "{line:?}");
    let value = |key: &str, at: usize| {
        fields[at]
            .strip_prefix(key)
            .unwrap_or_else(|| panic!("{line:?} lacks {key}"))
            .to_owned()
    };
    let pid: u32 = value("pid=", 2).parse().unwrap();
    assert_eq!(value("base=", 3), "0x5a0000000000");
    let size: u64 = value("size=", 4).parse().unwrap();
    let data_pages: u64 = value("data_pages=", 5).parse().unwrap();
    assert_eq!(pid, child.id());
    Agent {
        child,
        pid,
        size,
        data_pages,
    }
}

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill has no memory-safety preconditions; the pid is our child.
    let rc = unsafe { libc::kill(pid as libc::pid_t, sig) };
    assert_eq!(rc, 0, "kill {pid} {sig}");
}

/// Wait until every thread of `pid` is stopped. A thread that exits while
/// this looks (the agent's helper threads come and go) does not count.
fn wait_stopped(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let all_stopped = fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .filter_map(|task| fs::read_to_string(task.ok()?.path().join("stat")).ok())
            .all(|stat| {
                let state = stat.rsplit(") ").next().unwrap().chars().next().unwrap();
                state == 'T' || state == 't'
            });
        if all_stopped {
            return;
        }
        assert!(Instant::now() < deadline, "agent {pid} did not stop");
        sleep(Duration::from_millis(2));
    }
}

/// Copy the stopped agent's region into an image directory, the way the
/// receiver would.
fn snapshot(agent: &Agent, dir: &Path) {
    let mem = fs::File::open(format!("/proc/{}/mem", agent.pid)).unwrap();
    let mut bytes = vec![0u8; agent.size as usize];
    mem.read_exact_at(&mut bytes, BASE).unwrap();
    let _ = fs::remove_dir_all(dir);
    fs::create_dir_all(dir).unwrap();
    let file = region_file_name(0);
    fs::write(dir.join(&file), &bytes).unwrap();
    let manifest = Manifest {
        format: FORMAT_NAME.into(),
        version: FORMAT_VERSION,
        pid: agent.pid,
        comm: "procmig-agent".into(),
        page_size: 4096,
        created_unix: 0,
        regions: vec![RegionRecord {
            start: BASE,
            end: BASE + agent.size,
            perms: "rw-p".into(),
            name: String::new(),
            file,
            populated_pages: agent.size / 4096,
            xxh3: hex_digest(digest_pages(&bytes, 4096)),
        }],
    };
    fs::write(
        dir.join(MANIFEST_NAME),
        serde_json::to_vec(&manifest).unwrap(),
    )
    .unwrap();
}

fn agent(args: &[&str]) -> Output {
    Command::new(AGENT).args(args).output().unwrap()
}

fn temp_dir(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("procmig-agent-it-{}-{name}", std::process::id()))
}

#[test]
fn ready_line_and_mapping() {
    let agent = start(&["--size", "8M", "--dirty-rate", "2000"]);
    assert_eq!(agent.size, 8 << 20);
    assert_eq!(agent.data_pages, 2048 - 1 - 2);
    let maps = fs::read_to_string(format!("/proc/{}/maps", agent.pid)).unwrap();
    assert!(
        maps.lines()
            .any(|l| l.starts_with("5a0000000000-5a0000800000 rw-p")),
        "{maps}"
    );
}

#[test]
fn snapshots_of_a_busy_agent_verify() {
    let agent = start(&[
        "--size",
        "8M",
        "--profile",
        "mixed",
        "--dirty-rate",
        "50000",
        "--threads",
        "3",
        "--seed",
        "99",
    ]);
    let dir = temp_dir("busy");
    let mut writes = Vec::new();
    for _ in 0..4 {
        sleep(Duration::from_millis(150));
        signal(agent.pid, libc::SIGSTOP);
        wait_stopped(agent.pid);
        snapshot(&agent, &dir);
        signal(agent.pid, libc::SIGCONT);

        let out = agent_verify(&dir, false);
        let text = String::from_utf8(out.stdout).unwrap();
        assert_eq!(out.status.code(), Some(0), "{text}");
        assert!(
            text.starts_with("verify: ok: 2045 pages checked, "),
            "{text}"
        );
        let json = agent_verify(&dir, true);
        assert_eq!(json.status.code(), Some(0));
        let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
        assert_eq!(v["ok"], true);
        writes.push(v["writes"].as_u64().unwrap());
    }
    let _ = fs::remove_dir_all(&dir);
    assert!(writes[0] > 0, "{writes:?}");
    assert!(writes.windows(2).all(|w| w[0] < w[1]), "{writes:?}");
}

#[test]
fn stale_snapshot_fails() {
    let agent = start(&["--size", "1M", "--dirty-rate", "20000", "--hot-pages", "4"]);
    let dir = temp_dir("stale");
    sleep(Duration::from_millis(100));
    signal(agent.pid, libc::SIGSTOP);
    wait_stopped(agent.pid);
    snapshot(&agent, &dir);
    // Make a hot page's ledger entry newer than the page, picking a page
    // the writer was not in the middle of rewriting.
    let file = dir.join(region_file_name(0));
    let mut bytes = fs::read(&file).unwrap();
    let inflight = u64::from_ne_bytes(bytes[616..624].try_into().unwrap());
    let page = (0..4u64).find(|&p| p + 1 != inflight).unwrap();
    let at = 4096 + 4 * page as usize;
    let gen = u32::from_ne_bytes(bytes[at..at + 4].try_into().unwrap());
    bytes[at..at + 4].copy_from_slice(&(gen + 1).to_ne_bytes());
    fs::write(&file, &bytes).unwrap();
    let out = agent_verify(&dir, false);
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(1), "{text}");
    // 1 MiB: header, one ledger page, then data page 0 at BASE + 0x2000.
    let addr = BASE + 0x2000 + page * 0x1000;
    let expect = format!(
        "verify: FAILED: 1 bad pages (first: page {page} at {addr:#x}: expected gen {}, looks like gen {gen})",
        gen + 1
    );
    assert_eq!(text.lines().next(), Some(expect.as_str()), "{text}");
    let _ = fs::remove_dir_all(&dir);
}

/// Mappings and threads of `pid` right now.
fn maps_and_tasks(pid: u32) -> (usize, usize) {
    let maps = fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let tasks = fs::read_dir(format!("/proc/{pid}/task")).unwrap().count();
    (maps.lines().count(), tasks)
}

#[test]
fn churning_agent_verifies() {
    let agent = start(&[
        "--size",
        "8M",
        "--churn",
        "200",
        "--threads",
        "2",
        "--dirty-rate",
        "5000",
        "--kernel-writes",
        "100",
        "--dontneed-rate",
        "100",
        "--seed",
        "5",
    ]);
    let mut maps = BTreeSet::new();
    let mut tasks = BTreeSet::new();
    let until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < until {
        let (m, t) = maps_and_tasks(agent.pid);
        maps.insert(m);
        tasks.insert(t);
        sleep(Duration::from_millis(3));
    }
    assert!(maps.len() > 1, "mapping count never changed: {maps:?}");
    assert!(tasks.len() > 1, "thread count never changed: {tasks:?}");

    let dir = temp_dir("churn");
    for _ in 0..2 {
        signal(agent.pid, libc::SIGSTOP);
        wait_stopped(agent.pid);
        snapshot(&agent, &dir);
        signal(agent.pid, libc::SIGCONT);
        let out = agent_verify(&dir, true);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(out.status.code(), Some(0), "{v}");
        assert_eq!(v["ok"], true, "{v}");
        assert!(v["writes"].as_u64().unwrap() > 1000, "{v}");
        assert!(v["kernel_writes"].as_u64().unwrap() > 10, "{v}");
        assert!(v["discards"].as_u64().unwrap() > 10, "{v}");
        assert!(v["churn_events"].as_u64().unwrap() > 20, "{v}");
        let text = agent_verify(&dir, false);
        assert_eq!(text.status.code(), Some(0));
        assert!(String::from_utf8(text.stdout)
            .unwrap()
            .starts_with("verify: ok: 2045 pages checked, "));
        sleep(Duration::from_millis(200));
    }
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn exit_after_ends_the_process() {
    let mut agent = start(&[
        "--size",
        "4M",
        "--exit-after",
        "0.5",
        "--dirty-rate",
        "2000",
        "--churn",
        "200",
        "--kernel-writes",
        "100",
        "--dontneed-rate",
        "100",
    ]);
    let ready = Instant::now();
    let status = loop {
        if let Some(status) = agent.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            ready.elapsed() < Duration::from_secs(2),
            "agent still running 2 s after the ready line"
        );
        sleep(Duration::from_millis(5));
    };
    let took = ready.elapsed();
    assert_eq!(status.code(), Some(0), "{status:?}");
    assert!(took >= Duration::from_millis(450), "exited after {took:?}");
}

fn agent_verify(dir: &Path, json: bool) -> Output {
    let mut cmd = Command::new(AGENT);
    cmd.arg("verify").arg(dir);
    if json {
        cmd.arg("--json");
    }
    cmd.output().unwrap()
}

#[test]
fn bad_input_is_one_line() {
    let out = agent(&["run", "--size", "4K"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("too small"), "{err}");

    let out = agent(&["run", "--size", "12X"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());

    let out = agent(&["run", "--threads", "65"]);
    assert_eq!(out.status.code(), Some(2));

    for bad in ["-1", "soon", "inf"] {
        let out = agent(&["run", "--size", "1M", "--exit-after", bad]);
        assert_eq!(out.status.code(), Some(2), "--exit-after {bad}");
        assert!(out.stdout.is_empty());
    }

    let out = agent(&["verify", "/nonexistent/procmig-image"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("verify: error: "), "{err}");

    let out = agent(&["verify", "--json", "/nonexistent/procmig-image"]);
    assert_eq!(out.status.code(), Some(2));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"], false);
}

#[test]
fn man_page() {
    let out = agent(&["man"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("\n.TH procmig-agent 1 "), "{text}");
    assert!(text.contains("working\\-set"));
}
