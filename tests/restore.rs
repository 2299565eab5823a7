//! Restore: the destination runs the migrated process, and it carries on
//! where it stopped. Real programs where possible: small C programs
//! (threads, a pipe, an eventfd, a timerfd and epoll), python3, redis-server
//! under redis-benchmark; and procmig-agent, which checks its own memory.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

struct Outcome {
    send: std::process::Output,
    recv_ok: bool,
    recv_out: String,
    recv_err: String,
    restored: Option<Pid>,
}

/// Migrate `pid` to a `recv --restore` on loopback.
fn migrate(pid: i32, dir: &TempDir, send_extra: &[&str], recv_extra: &[&str]) -> Outcome {
    let mut args = vec!["--restore"];
    args.extend_from_slice(recv_extra);
    let recv = Recv::start(&dir.join("img"), &args);
    let send = send(pid, &recv, send_extra);
    let (recv_ok, recv_out, recv_err) = recv.wait();
    let restored = recv_out
        .lines()
        .find_map(|l| l.strip_prefix("restored: pid "))
        .and_then(|r| r.split(',').next())
        .and_then(|p| p.parse().ok())
        .map(Pid);
    Outcome {
        send,
        recv_ok,
        recv_out,
        recv_err,
        restored,
    }
}

fn assert_migrated(o: &Outcome) -> i32 {
    assert!(
        o.send.status.success() && o.recv_ok,
        "send: {}{}\nrecv: {}{}",
        text(&o.send.stdout),
        text(&o.send.stderr),
        o.recv_out,
        o.recv_err
    );
    let pid = o.restored.as_ref().expect("recv names the restored pid").0;
    // Built during pre-copy: the downtime does not copy the memory again.
    assert!(
        o.recv_out.contains("its memory was filled during pre-copy"),
        "{}",
        o.recv_out
    );
    assert!(
        text(&o.send.stdout).contains(&format!("restored on the destination: pid {pid}")),
        "{}",
        text(&o.send.stdout)
    );
    assert_running(pid);
    pid
}

#[test]
fn agent_restored_carries_on_and_verifies() {
    if !can_restore("agent restore") {
        return;
    }
    let dir = TempDir::new("restore-agent");
    let agent = Agent::start(&["--size", "64M", "--threads", "2", "--dirty-rate", "2000"]);
    let o = migrate(
        agent.pid,
        &dir,
        &["--max-iterations", "3", "--force-downtime"],
        &[],
    );
    let _restored = o.restored.as_ref().map(|p| p.0);
    let pid = assert_migrated(&o);
    // The image holds the agent as it stopped.
    let (ok, first) = agent_verify(&dir.join("img"));
    assert!(ok, "{first}");
    // The source stays stopped (--on-complete stop), the copy runs.
    assert_eq!(proc_state(agent.pid).map(|s| s.0), Some('T'));
    std::thread::sleep(Duration::from_millis(500));
    // Migrate the restored agent again (no restore) and check that image:
    // clean, and its writes counter went on past the first.
    let recv = Recv::start(&dir.join("img2"), &[]);
    let out = send(
        pid,
        &recv,
        &[
            "--on-complete",
            "resume",
            "--max-iterations",
            "2",
            "--force-downtime",
        ],
    );
    let (rok, rout, rerr) = recv.wait();
    assert!(
        out.status.success() && rok,
        "{}{rout}{rerr}",
        text(&out.stderr)
    );
    let (ok, second) = agent_verify(&dir.join("img2"));
    assert!(ok, "{second}");
    let writes = |s: &str| -> u64 {
        s.split(',')
            .find_map(|w| w.trim().strip_suffix(" writes"))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no writes count in {s:?}"))
    };
    assert!(
        writes(&second) > writes(&first),
        "the restored agent did not go on writing: {first} then {second}"
    );
    assert_running(pid);
}

#[test]
fn four_threads_go_on_without_a_gap() {
    if !can_restore("threads restore") {
        return;
    }
    let dir = TempDir::new("restore-threads");
    let Some(prog) = compile("threads_checksum.c", &dir) else {
        return;
    };
    let log = dir.join("log.txt");
    let src = Kill(spawn_clean(Command::new(&prog).arg(&log)));
    let pid = src.0.id() as i32;
    wait_for(10, "first lines", || lines(&log).len() > 20);
    let o = migrate(
        pid,
        &dir,
        &["--max-iterations", "3", "--force-downtime"],
        &[],
    );
    let restored = assert_migrated(&o);
    let before = lines(&log).len();
    wait_for(20, "the restored threads to write", || {
        lines(&log).len() > before + 40
    });
    // Every thread's sequence is contiguous: no gap, no repeat across the
    // switch, and all four threads went on.
    let mut last = [None::<u64>; 4];
    let mut after = [0u32; 4];
    for (n, l) in lines(&log).iter().enumerate() {
        let w: Vec<&str> = l.split_whitespace().collect();
        let t: usize = w[0][1..].parse().unwrap();
        let seq: u64 = w[1].parse().unwrap();
        if let Some(prev) = last[t] {
            assert_eq!(seq, prev + 1, "thread {t}: line {n} {l:?} after {prev}");
        }
        last[t] = Some(seq);
        if n >= before {
            after[t] += 1;
        }
    }
    assert!(
        after.iter().all(|&c| c > 0),
        "not every thread went on: {after:?}"
    );
    // The checksums are the ones an unmigrated run computes: compare with
    // a fresh run of the same program up to the same sequence numbers.
    let ref_log = dir.join("ref.txt");
    let reference = Kill(spawn_clean(Command::new(&prog).arg(&ref_log)));
    let want = last.iter().map(|l| l.unwrap()).min().unwrap();
    wait_for(60, "the reference run", || {
        lines(&ref_log)
            .iter()
            .filter(|l| l.split_whitespace().nth(1) == Some(&want.to_string()))
            .count()
            == 4
    });
    drop(reference);
    let key = |l: &String| {
        let w: Vec<&str> = l.split_whitespace().collect();
        (w[0].to_string(), w[1].to_string())
    };
    let reference: std::collections::HashMap<_, _> = lines(&ref_log)
        .iter()
        .map(|l| (key(l), l.clone()))
        .collect();
    for l in lines(&log) {
        if let Some(r) = reference.get(&key(&l)) {
            assert_eq!(&l, r, "checksum differs from an unmigrated run");
        }
    }
    assert!(alive(restored));
}

#[test]
fn pipe_eventfd_timerfd_epoll_keep_working() {
    if !can_restore("pipe/epoll restore") {
        return;
    }
    let dir = TempDir::new("restore-epoll");
    let Some(prog) = compile("pipe_epoll.c", &dir) else {
        return;
    };
    let log = dir.join("log.txt");
    let src = Kill(spawn_clean(Command::new(&prog).arg(&log)));
    wait_for(10, "first lines", || lines(&log).len() > 3);
    let o = migrate(src.0.id() as i32, &dir, &[], &[]);
    let restored = assert_migrated(&o);
    let before = lines(&log).len();
    wait_for(20, "the restored process to go on", || {
        lines(&log).len() > before + 5
    });
    let all = lines(&log);
    assert!(!all.iter().any(|l| l.starts_with("BAD")), "{all:?}");
    // "ok N": N goes up by 50 each line, across the switch too.
    let ns: Vec<u64> = all
        .iter()
        .map(|l| l.split_whitespace().nth(1).unwrap().parse().unwrap())
        .collect();
    assert!(ns.windows(2).all(|w| w[1] == w[0] + 50), "{ns:?}");
    // The timer kept ticking after restore.
    let ticks = |l: &str| -> u64 { l.split_whitespace().last().unwrap().parse().unwrap() };
    assert!(ticks(all.last().unwrap()) > ticks(&all[before - 1]));
    assert!(alive(restored));
}

#[test]
fn python_finishes_with_the_output_of_an_unmigrated_run() {
    if !can_restore("python3 restore") || !have("python3", "python3 restore") {
        return;
    }
    let dir = TempDir::new("restore-python");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/programs/dict_progress.py");
    let run = |out: &Path| {
        spawn_clean(
            Command::new("python3")
                .arg(&script)
                .env("PYTHONHASHSEED", "7")
                .stdout(std::fs::File::create(out).unwrap()),
        )
    };
    let mut reference = run(&dir.join("ref.txt"));
    assert!(reference.wait().unwrap().success());
    let want = std::fs::read_to_string(dir.join("ref.txt")).unwrap();
    assert!(want.contains("final"), "{want}");
    let log = dir.join("log.txt");
    let src = Kill(run(&log));
    wait_for(20, "python to start its steps", || lines(&log).len() >= 3);
    let o = migrate(
        src.0.id() as i32,
        &dir,
        &["--max-iterations", "3", "--force-downtime"],
        &[],
    );
    let restored = assert_migrated(&o);
    wait_for(60, "the restored python to finish", || !alive(restored));
    assert_eq!(std::fs::read_to_string(&log).unwrap(), want);
}

#[test]
fn redis_answers_keeps_its_keys_and_serves_a_new_benchmark() {
    if !can_restore("redis restore")
        || !have("redis-server", "redis restore")
        || !have("redis-benchmark", "redis restore")
    {
        return;
    }
    let dir = TempDir::new("restore-redis");
    let redis = Redis::start(&dir, 20000, 50000);
    let port = redis.port;
    let dbsize = redis_cli(port, &["dbsize"]);
    // A client connected across the migration: sees EOF once the source
    // is gone (--on-complete kill), as documented.
    let mut client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    {
        use std::io::{Read, Write};
        client.write_all(b"PING\r\n").unwrap();
        let mut b = [0u8; 7];
        client.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"+PONG\r\n");
    }
    let o = migrate(redis.pid(), &dir, &["--on-complete", "kill"], &[]);
    let restored = assert_migrated(&o);
    assert!(!alive(redis.pid()) || proc_state(redis.pid()).is_some_and(|s| s.0 == 'Z'));
    {
        use std::io::Read;
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut b = [0u8; 16];
        assert_eq!(
            client.read(&mut b).unwrap(),
            0,
            "the old connection sees EOF"
        );
    }
    assert_eq!(redis_cli(port, &["ping"]), "PONG");
    assert_eq!(redis_cli(port, &["dbsize"]), dbsize);
    redis.assert_keys_kept();
    let bench = Command::new("redis-benchmark")
        .args([
            "-p",
            &port.to_string(),
            "-q",
            "-n",
            "10000",
            "-t",
            "set,get",
        ])
        .output()
        .unwrap();
    assert!(bench.status.success(), "{}", text(&bench.stderr));
    assert!(
        text(&bench.stdout).contains("GET"),
        "{}",
        text(&bench.stdout)
    );
    assert!(alive(restored));
}

#[test]
fn restore_later_from_an_image_on_disk_unless_damaged() {
    if !can_restore("restore from an image") {
        return;
    }
    let dir = TempDir::new("restore-image");
    let Some(prog) = compile("pipe_epoll.c", &dir) else {
        return;
    };
    let log = dir.join("log.txt");
    let src = Kill(spawn_clean(Command::new(&prog).arg(&log)));
    wait_for(10, "first lines", || lines(&log).len() > 2);
    // A plain receiver keeps the state in the image; the source is killed.
    let recv = Recv::start(&dir.join("img"), &[]);
    let out = send(src.0.id() as i32, &recv, &["--on-complete", "kill"]);
    let (ok, rout, rerr) = recv.wait();
    assert!(
        out.status.success() && ok,
        "{}{rout}{rerr}",
        text(&out.stderr)
    );
    let img = dir.join("img");
    assert!(img.join("state.json").exists());
    let before = lines(&log).len();
    // Damaged on disk (one byte of its largest region file), it is refused
    // and nothing runs.
    let file = std::fs::read_dir(&img)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "bin"))
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap();
    let mut bytes = std::fs::read(&file).unwrap();
    let at = bytes
        .iter()
        .position(|&b| b != 0)
        .expect("a byte that is not zero");
    bytes[at] ^= 0x40;
    std::fs::write(&file, &bytes).unwrap();
    let r = run(&["restore", "--image", img.to_str().unwrap()]);
    assert_one_line_error(&r, "the image is damaged");
    assert!(
        text(&r.stderr).contains(file.file_name().unwrap().to_str().unwrap()),
        "{}",
        text(&r.stderr)
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(lines(&log).len(), before, "nothing runs until restored");
    // Mended, it runs.
    bytes[at] ^= 0x40;
    std::fs::write(&file, &bytes).unwrap();
    let r = run(&["restore", "--image", img.to_str().unwrap()]);
    assert!(r.status.success(), "{}", text(&r.stderr));
    let pid: i32 = text(&r.stdout)
        .split_whitespace()
        .nth(2)
        .and_then(|p| p.trim_end_matches(',').parse().ok())
        .unwrap_or_else(|| panic!("{}", text(&r.stdout)));
    let _restored = Pid(pid);
    wait_for(20, "the restored process to go on", || {
        lines(&log).len() > before + 3
    });
    assert!(!lines(&log).iter().any(|l| l.starts_with("BAD")));
}

#[test]
fn refusals_are_one_line_and_leave_the_source_running() {
    if !can_restore("refusals") || !have("python3", "refusals") {
        return;
    }
    let dir = TempDir::new("restore-refuse");
    // An inotify descriptor: a kind restore does not recreate.
    let src = Kill(spawn_clean(Command::new("python3").args([
        "-c",
        "import ctypes,time\nfd=ctypes.CDLL(None).inotify_init()\nassert fd>=0\nprint('ready',flush=True)\ntime.sleep(600)",
    ]).stdout(Stdio::piped())));
    let pid = src.0.id() as i32;
    wait_for(10, "python to create its inotify fd", || {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| {
                d.flatten().any(|e| {
                    std::fs::read_link(e.path())
                        .is_ok_and(|l| l.to_string_lossy().contains("inotify"))
                })
            })
            .unwrap_or(false)
    });
    let c = run(&["check", "--pid", &pid.to_string()]);
    assert_eq!(c.status.code(), Some(2));
    let t = text(&c.stdout);
    assert!(t.contains("inotify descriptors are not restored"), "{t}");
    assert!(
        t.contains("pipe to another process") || !t.contains("fd 1 "),
        "{t}"
    );
    // A restore-bound migration refuses before anything is stopped.
    let o = migrate(pid, &dir, &[], &[]);
    assert_one_line_error(&o.send, "cannot be restored on the destination");
    assert!(o.restored.is_none());
    assert_running(pid);
    assert!(!dir.join("img").exists(), "nothing is committed");
}

#[test]
fn no_new_privs_is_kept_and_reduced_capabilities_are_refused() {
    if !can_restore("privilege flags") || !have("setpriv", "privilege flags") {
        return;
    }
    let dir = TempDir::new("restore-privflags");
    let Some(prog) = compile("pipe_epoll.c", &dir) else {
        return;
    };
    // no_new_privs: restored as it was.
    let log = dir.join("log.txt");
    let src = Kill(spawn_clean(
        Command::new("setpriv")
            .arg("--no-new-privs")
            .arg(&prog)
            .arg(&log),
    ));
    wait_for(10, "first lines", || !lines(&log).is_empty());
    let o = migrate(src.0.id() as i32, &dir, &[], &[]);
    let restored = assert_migrated(&o);
    let status = std::fs::read_to_string(format!("/proc/{restored}/status")).unwrap();
    assert!(status.lines().any(|l| l == "NoNewPrivs:\t1"), "{status}");
    // A root process with a smaller bounding set would come back with
    // more privileges: refused before anything is stopped.
    let log2 = dir.join("log2.txt");
    let src2 = Kill(spawn_clean(
        Command::new("setpriv")
            .arg("--bounding-set=-net_raw")
            .arg(&prog)
            .arg(&log2),
    ));
    wait_for(10, "first lines", || !lines(&log2).is_empty());
    let c = run(&["check", "--pid", &src2.0.id().to_string()]);
    assert_eq!(c.status.code(), Some(2));
    assert!(text(&c.stdout).contains("CapBnd"), "{}", text(&c.stdout));
}

#[test]
fn a_changed_binary_is_refused() {
    if !can_restore("changed binary") {
        return;
    }
    let dir = TempDir::new("restore-binary");
    let Some(prog) = compile("pipe_epoll.c", &dir) else {
        return;
    };
    let log = dir.join("log.txt");
    let mut src = spawn_clean(Command::new(&prog).arg(&log));
    wait_for(10, "first lines", || !lines(&log).is_empty());
    let recv = Recv::start(&dir.join("img"), &[]);
    let out = send(src.id() as i32, &recv, &["--on-complete", "kill"]);
    assert!(recv.wait().0 && out.status.success());
    let _ = src.wait();
    // The binary changes on the destination.
    let mut bytes = std::fs::read(&prog).unwrap();
    bytes.extend_from_slice(b"changed");
    std::fs::write(&prog, bytes).unwrap();
    let r = run(&["restore", "--image", dir.join("img").to_str().unwrap()]);
    assert_one_line_error(&r, "differs from the source's");
}

#[test]
fn restore_without_privileges_says_what_it_needs() {
    if !can_restore("privileges") || !have("setpriv", "privileges") {
        return;
    }
    let dir = TempDir::new("restore-priv");
    std::fs::create_dir_all(dir.join("img")).unwrap();
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(procmig())
        .args(["restore", "--image", dir.join("img").to_str().unwrap()])
        .output()
        .unwrap();
    assert_one_line_error(&out, "needs root");
    // A restoring receiver says so at once, before it listens.
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(procmig())
        .args(["recv", "--listen", "0", "--restore", "--out"])
        .arg(dir.join("img2"))
        .output()
        .unwrap();
    assert_one_line_error(&out, "needs root");
}

#[test]
fn a_failed_restore_resumes_the_source() {
    if !can_restore("failed restore") {
        return;
    }
    let dir = TempDir::new("restore-fail");
    let Some(prog) = compile("pipe_epoll.c", &dir) else {
        return;
    };
    let log = dir.join("log.txt");
    // Its stderr is a pipe to us: restore opens --stdio for it, which
    // cannot be opened here, so the restore fails after every page is in.
    let mut cmd = Command::new(&prog);
    cmd.arg(&log).stderr(Stdio::piped());
    let src = Kill(spawn_clean(&mut cmd));
    let pid = src.0.id() as i32;
    wait_for(10, "first lines", || !lines(&log).is_empty());
    let o = migrate(pid, &dir, &[], &["--stdio", "/nonexistent/dir/stdio"]);
    assert_one_line_error(&o.send, "restore failed");
    assert!(o.recv_err.contains("restore failed"), "{}", o.recv_err);
    assert!(o.restored.is_none());
    assert!(!dir.join("img").exists(), "nothing is committed");
    // Exactly one copy runs: the source, untraced, going on.
    assert_running(pid);
    let before = lines(&log).len();
    wait_for(10, "the source to go on", || lines(&log).len() > before + 2);
    let same: Vec<_> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|p| std::fs::read_link(format!("/proc/{p}/exe")).is_ok_and(|e| e == prog))
        .collect();
    assert_eq!(same, vec![pid], "one copy of the program runs");
}

#[test]
fn same_pid_when_free_and_a_clear_error_when_not() {
    if !can_restore("--same-pid") {
        return;
    }
    let dir = TempDir::new("restore-samepid");
    let Some(prog) = compile("threads_checksum.c", &dir) else {
        return;
    };
    let log = dir.join("log.txt");
    let mut src = spawn_clean(Command::new(&prog).arg(&log));
    let pid = src.id() as i32;
    wait_for(10, "first lines", || lines(&log).len() > 8);
    let tids = |p: i32| -> Vec<i32> {
        let mut v: Vec<i32> = std::fs::read_dir(format!("/proc/{p}/task"))
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.file_name().to_str()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        v.sort_unstable();
        v
    };
    let before = tids(pid);
    assert_eq!(before.len(), 5);
    let recv = Recv::start(&dir.join("img"), &[]);
    let out = send(pid, &recv, &["--on-complete", "stop"]);
    assert!(recv.wait().0 && out.status.success());
    let img = dir.join("img");
    let restore = || run(&["restore", "--image", img.to_str().unwrap(), "--same-pid"]);
    // The source still holds its pid: refused, in one line.
    let r = restore();
    assert_one_line_error(&r, "pid is in use here");
    // Once it is gone (and reaped), the restored process has its pid and
    // its thread ids.
    let _ = src.kill();
    let _ = src.wait();
    let r = restore();
    assert!(r.status.success(), "{}", text(&r.stderr));
    let _restored = Pid(pid);
    assert!(
        text(&r.stdout).contains(&format!("restored: pid {pid},")),
        "{}",
        text(&r.stdout)
    );
    assert_eq!(tids(pid), before);
    let n = lines(&log).len();
    wait_for(20, "the restored threads to go on", || {
        lines(&log).len() > n + 8
    });
}
