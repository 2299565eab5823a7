//! Shared helpers for the integration tests: run the built binaries, start
//! agents and receivers on loopback, give each test its own directory.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn procmig() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_procmig"))
}

/// procmig-agent is a binary of another workspace package: look next to
/// procmig, and build it if it is not there.
pub fn agent_bin() -> PathBuf {
    let dir = procmig().parent().unwrap().to_path_buf();
    let path = dir.join("procmig-agent");
    if !path.exists() {
        let profile = if dir.ends_with("release") {
            vec!["--release"]
        } else {
            vec![]
        };
        let st = Command::new(env!("CARGO"))
            .args(["build", "-p", "procmig-agent"])
            .args(profile)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("run cargo build -p procmig-agent");
        assert!(st.success(), "building procmig-agent failed");
    }
    path
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A fresh directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("procmig-test-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
    pub fn join(&self, s: &str) -> PathBuf {
        self.0.join(s)
    }
    /// Entries of the directory, names only.
    pub fn entries(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&self.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running procmig-agent, killed on drop.
pub struct Agent {
    pub child: Child,
    pub pid: i32,
    pub base: u64,
}

impl Agent {
    pub fn start(args: &[&str]) -> Agent {
        Agent::start_in(None, args)
    }

    /// Start it in the network namespace `/run/netns/NETNS` (a netlab side).
    pub fn start_in(netns: Option<&str>, args: &[&str]) -> Agent {
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new(agent_bin());
        cmd.arg("run")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let ns = netns.map(|n| std::ffi::CString::new(format!("/run/netns/{n}")).unwrap());
        // No descriptors leaked from the test harness (restore refuses a
        // pipe to another process, rightly).
        // SAFETY: open, setns, close and close_range are async-signal-safe;
        // the path was allocated before the fork.
        unsafe {
            cmd.pre_exec(move || {
                if let Some(path) = &ns {
                    let fd = libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
                    if fd < 0 || libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    libc::close(fd);
                }
                libc::close_range(3, u32::MAX, 0);
                Ok(())
            });
        }
        let mut child = cmd.spawn().expect("spawn procmig-agent");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(
            line.starts_with("procmig-agent ready"),
            "agent said {line:?}"
        );
        let field = |k: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(k))
                .unwrap_or_else(|| panic!("no {k} in {line:?}"))
                .to_string()
        };
        let pid = field("pid=").parse().unwrap();
        let base = u64::from_str_radix(field("base=").trim_start_matches("0x"), 16).unwrap();
        Agent { child, pid, base }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// State letter and tracer of a process, from /proc.
pub fn proc_state(pid: i32) -> Option<(char, i32)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let get = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .map(|v| v.trim().to_string())
    };
    let state = get("State:")?.chars().next()?;
    let tracer = get("TracerPid:")?.parse().ok()?;
    Some((state, tracer))
}

/// Assert that `pid` runs freely: not stopped, not traced.
pub fn assert_running(pid: i32) {
    // The state may take a moment to settle after a detach.
    let t = Instant::now();
    loop {
        let (state, tracer) = proc_state(pid).expect("process is gone");
        if state != 'T' && state != 't' && tracer == 0 {
            return;
        }
        if t.elapsed() > Duration::from_secs(5) {
            panic!("process {pid} is not running freely: state {state}, tracer {tracer}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// VMAs registered with userfaultfd write-protect (smaps flag `uw`): none
/// must remain once a migration ended, however it ended.
pub fn uffd_wp_vmas(pid: i32) -> usize {
    std::fs::read_to_string(format!("/proc/{pid}/smaps"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("VmFlags:") && l.split_whitespace().any(|f| f == "uw"))
        .count()
}

/// A `procmig recv` listening on a free loopback port.
pub struct Recv {
    pub child: Child,
    pub port: u16,
}

impl Recv {
    pub fn start(out: &Path, extra: &[&str]) -> Recv {
        let mut child = Command::new(procmig())
            .args(["recv", "--listen", "127.0.0.1:0", "--out"])
            .arg(out)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn procmig recv");
        let mut first = String::new();
        let mut err = BufReader::new(child.stderr.take().unwrap());
        err.read_line(&mut first).unwrap();
        let port = first
            .trim()
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("recv said {first:?}"));
        // Keep stderr readable for wait().
        child.stderr = Some(unsafe_reattach(err));
        Recv { child, port }
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Wait for exit; returns (success, stdout, stderr after the first line).
    pub fn wait(mut self) -> (bool, String, String) {
        let mut out = String::new();
        let mut err = String::new();
        if let Some(mut o) = self.child.stdout.take() {
            o.read_to_string(&mut out).unwrap();
        }
        if let Some(mut e) = self.child.stderr.take() {
            e.read_to_string(&mut err).unwrap();
        }
        let st = self.child.wait().unwrap();
        (st.success(), out, err)
    }
}

impl Drop for Recv {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Put a BufReader's inner pipe back (nothing else was buffered: recv
/// prints only its listening line before the connection).
fn unsafe_reattach(r: BufReader<std::process::ChildStderr>) -> std::process::ChildStderr {
    assert!(
        r.buffer().is_empty(),
        "recv printed more than one line early"
    );
    r.into_inner()
}

/// Run `procmig ARGS` to completion.
pub fn run(args: &[&str]) -> Output {
    Command::new(procmig())
        .args(args)
        .output()
        .expect("run procmig")
}

/// `procmig verify --pid PID --image IMAGE`.
pub fn verify(pid: i32, image: &Path) -> Output {
    run(&[
        "verify",
        "--pid",
        &pid.to_string(),
        "--image",
        image.to_str().unwrap(),
    ])
}

/// `procmig send` of `pid` to `recv` with extra args.
pub fn send(pid: i32, recv: &Recv, extra: &[&str]) -> Output {
    let pid = pid.to_string();
    let to = recv.addr();
    let mut args = vec!["send", "--pid", &pid, "--to", &to];
    args.extend_from_slice(extra);
    run(&args)
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A port nothing listens on.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Assert a failed command printed exactly one line to stderr containing
/// `needle`, and no panic.
pub fn assert_one_line_error(out: &Output, needle: &str) {
    let err = text(&out.stderr);
    assert!(!out.status.success(), "command succeeded; stderr: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one error line, got: {err}");
    assert!(
        lines[0].contains(needle),
        "error line {:?} does not mention {needle:?}",
        lines[0]
    );
}

/// Run `procmig-agent verify DIR`; returns (exit ok, stdout).
pub fn agent_verify(image: &Path) -> (bool, String) {
    let out = Command::new(agent_bin())
        .arg("verify")
        .arg(image)
        .output()
        .unwrap();
    let said = text(&out.stdout) + &text(&out.stderr);
    // The manifest's digests too: the receiver builds them from the pages
    // as they arrived, whichever way they came (rounds, zero runs,
    // post-copy), and they must match what the files hold.
    let bad = procmig::image::Image::open(image)
        .map_err(|e| e.to_string())
        .and_then(|i| i.check_digests().map_err(|e| e.to_string()));
    match bad {
        Ok(bad) if bad.is_empty() => (out.status.success(), said),
        Ok(bad) => (
            false,
            format!("{said}manifest digests differ in regions {bad:?}"),
        ),
        Err(e) => (false, format!("{said}manifest: {e}")),
    }
}

/// Both checks of an image of `agent`: the agent's own ledger (no stale or
/// torn page) and a byte-for-byte comparison with the stopped process.
/// `what` names the case in failure messages.
pub fn check_image(agent: &Agent, image: &Path, what: &str) {
    let (ok, out) = agent_verify(image);
    assert!(ok, "agent verify for {what}: {out}");
    let v = run(&[
        "verify",
        "--pid",
        &agent.pid.to_string(),
        "--image",
        image.to_str().unwrap(),
    ]);
    assert!(
        v.status.success() && text(&v.stdout).contains("identical"),
        "procmig verify for {what}: {}{}",
        text(&v.stdout),
        text(&v.stderr)
    );
}

/// A Hello as a source of this build sends it (4 KiB pages, raw pages),
/// for hand-made streams.
pub fn hello_frame() -> procmig::protocol::Control {
    use procmig::protocol::{self, Control, Hello, WireCodec};
    Control::Hello(Hello {
        version: protocol::VERSION,
        min_version: protocol::MIN_VERSION,
        page_size: 4096,
        capabilities: protocol::CAPABILITIES,
        codec: WireCodec::Raw as u8,
        level: 0,
        compress_threads: 1,
        pid: 42,
        comm: "test".into(),
    })
}

/// Hello and a one-region table (0x10000-0x20000): how every hand-made
/// stream begins.
pub fn start_of_stream() -> Vec<u8> {
    use procmig::protocol::{Control, RegionEntry};
    let mut b = Vec::new();
    hello_frame().encode(&mut b);
    Control::Regions(vec![RegionEntry {
        start: 0x10000,
        end: 0x20000,
        prot: 3,
        name: "x".into(),
    }])
    .encode(&mut b);
    b
}

// --- restore and post-copy tests: real programs ---------------------------

/// Restore needs root; say so when it is not there.
pub fn can_restore(test: &str) -> bool {
    if !is_root() {
        println!("skipped: {test}: restoring a process needs root");
        return false;
    }
    true
}

/// Whether `prog` can be run; prints `skipped:` when not.
pub fn have(prog: &str, test: &str) -> bool {
    let ok = Command::new("sh")
        .args(["-c", &format!("command -v {prog}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        println!("skipped: {test}: {prog} is not installed (scripts/setup installs it)");
    }
    ok
}

/// Compile one of tests/programs/*.c into `dir`.
pub fn compile(src: &str, dir: &TempDir) -> Option<PathBuf> {
    if !have("gcc", src) {
        return None;
    }
    let out = dir.join(src.trim_end_matches(".c"));
    let st = Command::new("gcc")
        .args(["-O2", "-pthread", "-o"])
        .arg(&out)
        .arg(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/programs")
                .join(src),
        )
        .status()
        .expect("run gcc");
    assert!(st.success(), "gcc {src} failed");
    Some(out)
}

/// Spawn with no descriptors beyond 0-2 (the test harness may leak some,
/// e.g. a jobserver pipe, which restore would rightly refuse) in a session
/// of its own.
pub fn spawn_clean(cmd: &mut Command) -> Child {
    use std::os::unix::process::CommandExt;
    // SAFETY: close_range and setsid are async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::close_range(3, u32::MAX, 0);
            libc::setsid();
            Ok(())
        });
    }
    cmd.spawn().expect("spawn test program")
}

/// A process that is not our child (a restored one): killed on drop.
pub struct Pid(pub i32);

impl Drop for Pid {
    fn drop(&mut self) {
        // SAFETY: plain kill.
        unsafe { libc::kill(self.0, libc::SIGKILL) };
    }
}

/// Kill a spawned child on drop.
pub struct Kill(pub Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn alive(pid: i32) -> bool {
    proc_state(pid).is_some_and(|(s, _)| s != 'Z' && s != 'X')
}

/// Wait until `f` holds, up to `secs` seconds.
pub fn wait_for(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < Duration::from_secs(secs), "timed out: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn lines(p: &Path) -> Vec<String> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .map(String::from)
        .collect()
}

/// `redis-cli -p PORT ARGS`, its answer trimmed; within 60 s.
#[allow(dead_code)]
pub fn redis_cli(port: u16, args: &[&str]) -> String {
    let mut c = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("run redis-cli");
    let t = std::time::Instant::now();
    while c.try_wait().unwrap().is_none() {
        if t.elapsed() > std::time::Duration::from_secs(60) {
            let _ = c.kill();
            panic!("redis-cli {args:?} still waiting after 60 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let mut out = String::new();
    let _ = c.stdout.take().unwrap().read_to_string(&mut out);
    out.trim().to_string()
}

/// A redis-server of its own (no persistence, started in `dir`), filled by
/// redis-benchmark with `keys` SETs over `range` keys; 20 of its keys and
/// their values are kept to check later. Killed on drop.
#[allow(dead_code)]
pub struct Redis {
    pub server: Kill,
    pub port: u16,
    pub sample: Vec<(String, String)>,
}

#[allow(dead_code)]
impl Redis {
    pub fn start(dir: &TempDir, keys: u32, range: u32) -> Redis {
        let port = free_port();
        let server = Kill(spawn_clean(
            Command::new("redis-server")
                .args([
                    "--port",
                    &port.to_string(),
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ])
                .current_dir(dir.path())
                .stdout(Stdio::null()),
        ));
        wait_for(10, "redis to answer", || {
            redis_cli(port, &["ping"]) == "PONG"
        });
        let fill = Command::new("redis-benchmark")
            .args(["-p", &port.to_string(), "-q", "-t", "set"])
            .args(["-n", &keys.to_string(), "-r", &range.to_string()])
            .output()
            .unwrap();
        assert!(
            fill.status.success(),
            "redis-benchmark: {}",
            text(&fill.stderr)
        );
        let sample = (0..20)
            .map(|_| {
                let k = redis_cli(port, &["randomkey"]);
                let v = redis_cli(port, &["get", &k]);
                (k, v)
            })
            .collect();
        Redis {
            server,
            port,
            sample,
        }
    }

    pub fn pid(&self) -> i32 {
        self.server.0.id() as i32
    }

    /// The sampled keys still hold their values.
    pub fn assert_keys_kept(&self) {
        for (k, v) in &self.sample {
            assert_eq!(&redis_cli(self.port, &["get", k]), v, "key {k}");
        }
    }
}

/// A TCP proxy on a free loopback port to `to`, whose connections can all
/// be cut at once (a link that breaks under both ends).
pub struct CutProxy {
    pub port: u16,
    socks: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

impl CutProxy {
    pub fn start(to: String) -> CutProxy {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let socks = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = socks.clone();
        std::thread::spawn(move || {
            for a in l.incoming().flatten() {
                let Ok(b) = std::net::TcpStream::connect(&to) else {
                    continue;
                };
                let mut s = kept.lock().unwrap();
                s.push(a.try_clone().unwrap());
                s.push(b.try_clone().unwrap());
                for (mut from, mut into) in
                    [(a.try_clone().unwrap(), b.try_clone().unwrap()), (b, a)]
                {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut into);
                        let _ = into.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        CutProxy { port, socks }
    }

    /// Cut every connection through it.
    pub fn cut(&self) {
        for s in self.socks.lock().unwrap().iter() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// Wait until the receiver's child (the restored process: built early,
/// traced and stopped until the handover) runs freely; returns its pid.
pub fn wait_for_child_running(recv_pid: i32) -> i32 {
    let child = || {
        std::fs::read_to_string(format!("/proc/{recv_pid}/task/{recv_pid}/children"))
            .ok()
            .and_then(|s| {
                s.split_whitespace()
                    .next()
                    .and_then(|p| p.parse::<i32>().ok())
            })
    };
    wait_for(60, "the restored process", || {
        child().is_some_and(|p| proc_state(p).is_some_and(|(s, t)| s != 'T' && s != 't' && t == 0))
    });
    child().unwrap()
}

/// The token in the `procmig send --resume TOKEN ...` command a sender
/// prints when post-copy breaks.
pub fn resume_token(stderr: &str) -> String {
    stderr
        .split("--resume ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("no resume command in: {stderr}"))
        .to_string()
}
