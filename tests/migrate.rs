//! End-to-end migrations over loopback, checked byte for byte.

mod common;

use common::*;
use procmig::image::Image;

/// Migrate a busy agent with the given send options and check the image
/// both ways: the agent's own consistency check, and a byte-for-byte
/// comparison with the (stopped) source.
fn migrate_and_check(agent_args: &[&str], send_args: &[&str]) -> serde_json::Value {
    let agent = Agent::start(agent_args);
    let dir = TempDir::new("mig");
    let out = dir.join("img");
    let recv = Recv::start(&out, &["--json"]);
    // The agent is busy and the machine may be loaded: whether pre-copy
    // converges depends on speed, which is not what these tests check.
    // A bounded number of rounds, then the final stop, always completes.
    let mut args = vec!["--json", "--max-iterations", "3", "--force-downtime"];
    args.extend_from_slice(send_args);
    let sent = send(agent.pid, &recv, &args);
    let (ok, rjson, rerr) = recv.wait();
    assert!(
        sent.status.success(),
        "send {send_args:?} failed: {}",
        text(&sent.stderr)
    );
    assert!(ok, "recv failed: {rerr}");
    let report: serde_json::Value = serde_json::from_slice(&sent.stdout).unwrap();
    let rreport: serde_json::Value = serde_json::from_str(&rjson).unwrap();

    // on-complete stop (the default) leaves the process stopped, untraced.
    let (state, tracer) = proc_state(agent.pid).unwrap();
    assert_eq!((state, tracer), ('T', 0), "source after migration");

    check_image(&agent, &out, &format!("{send_args:?}"));
    // Verify left it stopped as it found it.
    assert_eq!(proc_state(agent.pid).unwrap(), ('T', 0));

    let image = Image::open(&out).unwrap();
    assert!(
        image.check_digests().unwrap().is_empty(),
        "manifest digests"
    );
    assert!(
        image.region_at(agent.base).is_some(),
        "agent region in image"
    );
    assert_eq!(report["normal"], rreport["normal"]);
    assert_eq!(report["duplicate"], rreport["duplicate"]);
    report
}

#[test]
fn every_codec_threads_and_levels() {
    let agent = [
        "--size",
        "24M",
        "--profile",
        "mixed",
        "--dirty-rate",
        "20000",
    ];
    let cases: &[(&str, &[&str])] = &[
        ("none", &[]),
        ("zlib", &["--compress-level", "1"]),
        ("zlib", &["--compress-level", "6"]),
        ("zstd", &["--compress-level", "1"]),
        ("zstd", &["--compress-level", "5"]),
        ("lz4", &[]),
    ];
    for (codec, level) in cases {
        for threads in ["1", "3"] {
            let mut args = vec!["--compress", codec, "--compress-threads", threads];
            args.extend_from_slice(level);
            let r = migrate_and_check(&agent, &args);
            assert_eq!(r["compression"]["method"], *codec);
            assert_eq!(
                r["compression"]["threads"].as_u64().unwrap(),
                threads.parse::<u64>().unwrap()
            );
            let rate = r["compression"]["compression_rate"].as_f64().unwrap();
            if *codec == "none" {
                assert_eq!(r["compression"]["pages"], 0);
            } else {
                // mixed: half text, a quarter zero, a quarter random.
                assert!(rate > 1.5, "{codec}: compression rate {rate}");
            }
            assert!(r["duplicate"].as_u64().unwrap() > 0, "zero pages detected");
        }
    }
}

#[test]
fn wire_bytes_shrink_with_compression() {
    let agent = ["--size", "32M", "--profile", "text"];
    let none = migrate_and_check(&agent, &["--compress", "none"]);
    let zstd = migrate_and_check(&agent, &["--compress", "zstd"]);
    let (n, z) = (
        none["transferred"].as_u64().unwrap(),
        zstd["transferred"].as_u64().unwrap(),
    );
    assert!(z * 2 < n, "zstd sent {z} bytes, none {n}");

    // Incompressible batches go raw instead of growing.
    let random = migrate_and_check(
        &["--size", "16M", "--profile", "random"],
        &["--compress", "zstd"],
    );
    assert!(
        random["compression"]["raw_batches"].as_u64().unwrap() >= 60,
        "{random}"
    );
    let raw = random["normal_bytes"].as_u64().unwrap();
    assert!(
        random["transferred"].as_u64().unwrap() < raw + raw / 50,
        "{random}"
    );
}

#[test]
fn small_batches_and_a_region_filter() {
    let agent = Agent::start(&["--size", "8M", "--profile", "random"]);
    let dir = TempDir::new("region");
    let out = dir.join("img");
    let recv = Recv::start(&out, &[]);
    // Only the agent's RAM region, by address range.
    let range = format!("{:x}-{:x}", agent.base, agent.base + (8 << 20));
    let sent = send(
        agent.pid,
        &recv,
        &[
            "--region",
            &range,
            "--batch-pages",
            "3",
            "--on-complete",
            "resume",
        ],
    );
    assert!(sent.status.success(), "{}", text(&sent.stderr));
    assert!(recv.wait().0);
    let image = Image::open(&out).unwrap();
    assert_eq!(image.manifest.regions.len(), 1);
    assert_eq!(image.manifest.regions[0].start, agent.base);
    // Resumed: the agent keeps running, untraced.
    assert_running(agent.pid);
}

#[test]
fn on_complete_kill() {
    let mut agent = Agent::start(&["--size", "4M"]);
    let dir = TempDir::new("kill");
    let recv = Recv::start(&dir.join("img"), &[]);
    let sent = send(agent.pid, &recv, &["--on-complete", "kill"]);
    assert!(sent.status.success(), "{}", text(&sent.stderr));
    assert!(recv.wait().0);
    let st = agent.child.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(st.signal(), Some(libc::SIGKILL));
}

/// A program nobody here wrote: a python3 process holding a few hundred MiB
/// of objects.
#[test]
fn python_process_byte_for_byte() {
    let Ok(mut py) = std::process::Command::new("python3")
        .args([
            "-c",
            "import sys\n\
             data = [('item-%d' % i) * 8 for i in range(2_500_000)]\n\
             blob = bytearray(64 << 20)\n\
             print('ready', flush=True)\n\
             sys.stdin.read()\n",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
    else {
        println!("skipped: python3 is not installed");
        return;
    };
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(py.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "ready");
    let pid = py.id() as i32;
    let dir = TempDir::new("py");
    let out = dir.join("img");
    let recv = Recv::start(&out, &[]);
    let sent = send(pid, &recv, &["--compress", "zstd", "--json"]);
    let (ok, _, err) = recv.wait();
    assert!(sent.status.success(), "{}", text(&sent.stderr));
    assert!(ok, "{err}");
    let report: serde_json::Value = serde_json::from_slice(&sent.stdout).unwrap();
    assert!(
        report["normal_bytes"].as_u64().unwrap() > 200 << 20,
        "{report}"
    );
    let v = verify(pid, &out);
    assert!(v.status.success(), "{}", text(&v.stdout));
    // Resume it and let it finish normally.
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGCONT,
    );
    drop(py.stdin.take());
    let st = py.wait().unwrap();
    assert!(st.success(), "python exited with {st}");
}

#[test]
fn verify_reports_differences() {
    let agent = Agent::start(&["--size", "4M", "--profile", "text"]);
    let dir = TempDir::new("diff");
    let out = dir.join("img");
    let recv = Recv::start(&out, &[]);
    assert!(send(agent.pid, &recv, &[]).status.success());
    assert!(recv.wait().0);
    // Corrupt one byte of the agent's region in the image.
    let image = Image::open(&out).unwrap();
    let rec = image.region_at(agent.base).unwrap().clone();
    let path = out.join(&rec.file);
    let mut bytes = std::fs::read(&path).unwrap();
    let at = (agent.base - rec.start) as usize + 5 * 4096 + 100;
    bytes[at] ^= 0xff;
    std::fs::write(&path, bytes).unwrap();
    let v = verify(agent.pid, &out);
    assert_eq!(v.status.code(), Some(1));
    let s = text(&v.stdout);
    assert!(s.contains("1 of"), "{s}");
    assert!(s.contains(&format!("{:#x}", agent.base + 5 * 4096)), "{s}");
    assert!(!Image::open(&out)
        .unwrap()
        .check_digests()
        .unwrap()
        .is_empty());
}

#[test]
fn compress_auto_adapts_to_a_slow_link() {
    // On a 20 MB/s link the link is the bottleneck: auto must compress
    // (and pick levels above zstd-1 at times), and the image must be exact.
    let r = migrate_and_check(
        &["--size", "24M", "--profile", "text"],
        &[
            "--compress",
            "auto",
            "--max-bandwidth",
            "20M",
            "--mode",
            "stop-and-copy",
        ],
    );
    assert_eq!(r["compression"]["method"], "auto");
    let choices = r["compression"]["auto_choices"]
        .as_object()
        .expect("auto_choices");
    let zstd: u64 = choices
        .iter()
        .filter(|(k, _)| k.starts_with("zstd"))
        .map(|(_, v)| v.as_u64().unwrap())
        .sum();
    assert!(
        zstd > 0,
        "auto never chose zstd on a slow link: {choices:?}"
    );
    assert!(
        r["compression"]["compression_rate"].as_f64().unwrap() > 2.5,
        "{r}"
    );
}

#[test]
fn verify_says_when_the_process_ran_on() {
    // Resumed after the migration, a busy process moves on: verify must
    // say so instead of only reporting differences.
    let agent = Agent::start(&["--size", "4M", "--dirty-rate", "20000"]);
    let dir = TempDir::new("ranon");
    let out = dir.join("img");
    let recv = Recv::start(&out, &[]);
    let sent = send(
        agent.pid,
        &recv,
        &[
            "--on-complete",
            "resume",
            "--max-iterations",
            "3",
            "--force-downtime",
        ],
    );
    assert!(sent.status.success(), "{}", text(&sent.stderr));
    assert!(recv.wait().0);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let v = loop {
        let v = verify(agent.pid, &out);
        if v.status.code() == Some(1) || std::time::Instant::now() > deadline {
            break v;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert_eq!(v.status.code(), Some(1), "{}", text(&v.stdout));
    let s = text(&v.stdout);
    assert!(s.contains("DIFFERENT"), "{s}");
    assert!(s.contains("was running when verify started"), "{s}");
    assert_running(agent.pid);
}

#[test]
fn verify_without_a_pid_checks_the_image_against_its_digests() {
    // The image of a stopped agent checks out; one flipped byte in a
    // region file, or a page gone, is found and named, exit status 1.
    let agent = Agent::start(&["--size", "4M"]);
    let dir = TempDir::new("digests");
    let out = dir.join("img");
    let recv = Recv::start(&out, &[]);
    let sent = send(agent.pid, &recv, &["--mode", "stop-and-copy"]);
    assert!(sent.status.success(), "{}", text(&sent.stderr));
    assert!(recv.wait().0);
    let check = || run(&["verify", "--image", out.to_str().unwrap()]);
    let v = check();
    assert!(v.status.success(), "{}{}", text(&v.stdout), text(&v.stderr));
    assert!(text(&v.stdout).contains("intact"), "{}", text(&v.stdout));
    let image = procmig::image::Image::open(&out).unwrap();
    let (i, r) = image
        .manifest
        .regions
        .iter()
        .enumerate()
        .max_by_key(|(_, r)| r.populated_pages)
        .unwrap();
    let path = out.join(&r.file);
    let mut bytes = std::fs::read(&path).unwrap();
    let at = bytes.iter().rposition(|&b| b != 0).unwrap();
    bytes[at] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();
    let v = check();
    assert_eq!(v.status.code(), Some(1), "{}", text(&v.stdout));
    let s = text(&v.stdout);
    assert!(
        s.contains("DIFFERENT") && s.contains(&format!("region {i} ")),
        "{s}"
    );
    // The same page all zero (as if a hole): still found.
    let page = at / 4096 * 4096;
    bytes[page..page + 4096].fill(0);
    std::fs::write(&path, &bytes).unwrap();
    assert_eq!(check().status.code(), Some(1));
}

#[test]
fn progress_lines_for_logs_never_pass_100_percent() {
    // 24 MiB at 8 MB/s: about three seconds, long enough for lines.
    let agent = Agent::start(&[
        "--size",
        "24M",
        "--profile",
        "random",
        "--dirty-rate",
        "2000",
    ]);
    let dir = TempDir::new("progress");
    let recv = Recv::start(&dir.join("img"), &["--progress"]);
    let sent = send(
        agent.pid,
        &recv,
        &[
            "--progress",
            "--compress",
            "none",
            "--max-bandwidth",
            "8M",
            "--max-iterations",
            "3",
            "--force-downtime",
        ],
    );
    assert!(sent.status.success(), "{}", text(&sent.stderr));
    let (ok, _, rerr) = recv.wait();
    assert!(ok, "{rerr}");
    let err = text(&sent.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("send: ")).collect();
    assert!(!lines.is_empty(), "no progress lines: {err}");
    assert!(lines[0].starts_with("send: bulk "), "{err}");
    for l in &lines {
        if let Some(pct) = l.split_whitespace().find_map(|w| w.strip_suffix("%:")) {
            let pct: f64 = pct.parse().unwrap();
            assert!((0.0..=100.0).contains(&pct), "{l}");
        }
    }
    assert!(
        rerr.lines().any(|l| l.starts_with("recv: receiving: ")),
        "{rerr}"
    );
}

/// A 1 GiB private anonymous region with one page written: the bulk copy
/// reads its populated pages, not its size. (With uffd-wp tracking armed
/// first, the never-touched pages carry markers that pagemap shows as
/// swapped; they were read and sent as 262 k zero pages.) The image still
/// matches the process page for page.
#[test]
fn a_sparse_region_costs_its_populated_pages() {
    if !have("python3", "sparse region") {
        return;
    }
    let dir = TempDir::new("sparse");
    let script = "import mmap, sys, time\n\
                  m = mmap.mmap(-1, 1 << 30, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)\n\
                  m[4096 * 1000] = 7\n\
                  print('ready', flush=True)\n\
                  time.sleep(300)\n";
    let mut child = spawn_clean(
        std::process::Command::new("python3")
            .args(["-c", script])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null()),
    );
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "ready");
    let pid = child.id() as i32;
    let _kill = Kill(child);
    let recv = Recv::start(&dir.join("img"), &[]);
    let out = send(pid, &recv, &["--json", "--on-complete", "stop"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let (ok, _, err) = recv.wait();
    assert!(ok, "{err}");
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // python itself has a few thousand pages; the region alone 262144.
    let zero = s["duplicate"].as_u64().unwrap();
    let normal = s["normal"].as_u64().unwrap();
    assert!(
        zero + normal < 50_000,
        "{zero} zero and {normal} normal pages sent: {s}"
    );
    let v = verify(pid, &dir.join("img"));
    assert!(v.status.success(), "{}{}", text(&v.stdout), text(&v.stderr));
}
