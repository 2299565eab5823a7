//! procmig: the command line. It parses arguments into the library's
//! configs, runs them, and prints reports and errors.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, CommandFactory, Parser, Subcommand};

use procmig::codec::Compression;
use procmig::dest::{self, RecvConfig};
use procmig::dirty::Tracking;
use procmig::image::Image;
use procmig::process::RegionFilter;
use procmig::progress::Display;
use procmig::protocol::tls::{host_of, TlsClient, TlsServer};
use procmig::source::{self, MigrationHandle, Mode, OnComplete, SendConfig, ThrottleParams};
use procmig::units::parse_size;

/// Live-migrate the memory of a running Linux process, the way QEMU
/// live-migrates a virtual machine.
#[derive(Parser)]
#[command(name = "procmig", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Copy a running process's memory to a receiver.
    Send(SendArgs),
    /// Receive a migration into an image directory.
    Recv(RecvArgs),
    /// Compare an image with a process, byte for byte; without --pid, check
    /// the image against the digests in its manifest.
    Verify(VerifyArgs),
    /// Run the process an image holds: recreate it from its memory and state.
    Restore(RestoreArgs),
    /// Say whether a process can be restored, one line per reason it cannot.
    Check {
        /// Process to check (not stopped, not changed).
        #[arg(long)]
        pid: i32,
    },
    /// Show what this kernel offers for dirty tracking, and permissions.
    Info {
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Ask a running migration how it is doing (QMP query-migrate).
    Status {
        /// The migration's control socket (`send --qmp PATH`).
        #[arg(long, value_name = "PATH")]
        qmp: PathBuf,
        /// Print QMP's reply as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Cancel a running migration: before the handover the source process resumes (QMP migrate_cancel).
    Cancel {
        /// The migration's control socket (`send --qmp PATH`).
        #[arg(long, value_name = "PATH")]
        qmp: PathBuf,
    },
    /// Pause a running post-copy on purpose (QMP migrate-pause): the link is shut, the destination waits, the sender exits with the command that resumes it.
    Pause {
        /// Either side's control socket (`send --qmp PATH` or `recv --qmp PATH`).
        #[arg(long, value_name = "PATH")]
        qmp: PathBuf,
    },
    /// Change a running migration's parameters (QMP migrate-set-parameters).
    Set {
        /// The migration's control socket (`send --qmp PATH`).
        #[arg(long, value_name = "PATH")]
        qmp: PathBuf,
        /// New cap on wire bytes per second (K/M/G suffixes; 0: unlimited).
        #[arg(long, value_name = "RATE", value_parser = parse_size)]
        max_bandwidth: Option<u64>,
        /// New longest acceptable pause, e.g. 100ms.
        #[arg(long, value_name = "TIME", value_parser = parse_duration)]
        downtime_limit: Option<Duration>,
    },
    /// Write the man pages (procmig.1, procmig-send.1, ...) into DIR.
    #[command(hide = true)]
    Man {
        /// Directory to write into.
        dir: PathBuf,
    },
}

#[derive(Args)]
struct SendArgs {
    /// Process to migrate.
    #[arg(long)]
    pid: i32,
    /// Receiver address, HOST:PORT.
    #[arg(
        long,
        value_name = "HOST:PORT",
        required_unless_present = "resume_source"
    )]
    to: Option<String>,
    /// Finish a post-copy that broke and is paused on the destination (exit status 3 printed the command): serve the missing pages of the stopped process over a new connection (QEMU: migrate with resume).
    #[arg(long, value_name = "TOKEN", value_parser = parse_token, conflicts_with = "resume_source")]
    resume: Option<u64>,
    /// Migrate nothing: resume a source process left stopped by a migration that broke after the handover (exit status 3), once its destination copy is known gone.
    #[arg(long, conflicts_with = "to")]
    resume_source: bool,
    /// Compression method (QEMU: multifd-compression); auto picks method and level per batch from the measured link and data.
    #[arg(long, value_enum, default_value_t = Compression::Zstd)]
    compress: Compression,
    /// Compression level: zlib 0-9 (0 stores), zstd 1-19; default 1. lz4 has no levels.
    #[arg(long, value_name = "N")]
    compress_level: Option<i32>,
    /// Compression worker threads [default: number of CPUs].
    #[arg(long, value_name = "N")]
    compress_threads: Option<usize>,
    /// Cap on bytes per second put on the wire, after compression (K/M/G suffixes).
    #[arg(long, value_name = "RATE", value_parser = parse_size)]
    max_bandwidth: Option<u64>,
    /// What to do with the process after a successful migration.
    #[arg(long, value_enum, default_value_t = OnComplete::Stop)]
    on_complete: OnComplete,
    /// Migrate only this address range (START-END, hex) or mapping name ([heap], a path). Repeatable.
    #[arg(long, value_name = "RANGE|NAME")]
    region: Vec<RegionFilter>,
    /// live: copy while the process runs, then a short downtime; stop-and-copy: stop it for the whole copy.
    #[arg(long, value_enum, default_value_t = Mode::Live)]
    mode: Mode,
    /// How written pages are found between rounds.
    #[arg(long, value_enum, default_value_t = Tracking::Auto)]
    dirty_tracking: Tracking,
    /// Longest acceptable pause of the process (QEMU: downtime-limit), e.g. 300ms, 1s.
    #[arg(long, value_name = "TIME", default_value = "300ms", value_parser = parse_duration)]
    downtime_limit: Duration,
    /// Rounds after the bulk copy before giving up (or forcing downtime) [default: 30, and give up after 3 rounds in a row that the process dirties memory faster than it can be sent, or that, with nothing left to send, stopping it, the last dirty sync and the receiver's answer alone exceed the downtime limit].
    #[arg(long, value_name = "N")]
    max_iterations: Option<u32>,
    /// Throttle a process that dirties memory faster than the link drains it (QEMU: auto-converge).
    #[arg(long)]
    auto_converge: bool,
    /// After --max-iterations, stop the process and finish even if the downtime will exceed the limit.
    #[arg(long)]
    force_downtime: bool,
    /// First throttle, % of CPU time taken away.
    #[arg(long, value_name = "PCT", default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=99))]
    cpu_throttle_initial: u32,
    /// Throttle added each time the process still outruns the link.
    #[arg(long, value_name = "PCT", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=99))]
    cpu_throttle_increment: u32,
    /// Highest throttle.
    #[arg(long, value_name = "PCT", default_value_t = 99, value_parser = clap::value_parser!(u32).range(1..=99))]
    max_cpu_throttle: u32,
    /// Throttle when bytes dirtied in a round exceed this % of bytes sent (twice in a row).
    #[arg(long, value_name = "PCT", default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=100))]
    throttle_trigger_threshold: u32,
    /// Pages per compression batch.
    #[arg(long, default_value_t = source::DEFAULT_BATCH_PAGES, value_parser = clap::value_parser!(u32).range(1..=1024), hide_short_help = true)]
    batch_pages: u32,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Print progress lines on stderr even when it is not a terminal (a bar is shown on a terminal anyway).
    #[arg(long)]
    progress: bool,
    /// Longest wait for the receiver's answers; a link silent this long is dead (TCP keepalive, TCP_USER_TIMEOUT).
    #[arg(long, value_name = "TIME", default_value = "30s", value_parser = parse_duration)]
    timeout: Duration,
    /// Serve QMP on this Unix socket while the migration runs (query-migrate, migrate-set-parameters, migrate_cancel, events); see `procmig status|cancel|set`.
    #[arg(long, value_name = "PATH")]
    qmp: Option<PathBuf>,
    /// Append the QMP events (MIGRATION, MIGRATION_PASS) to FILE as JSON lines as they happen (/dev/fd/N for a pipe).
    #[arg(long, value_name = "FILE")]
    events: Option<PathBuf>,
    /// Switch to post-copy after the bulk copy and N pre-copy rounds, at the `start` (no bulk copy: every private anonymous page by post-copy, like CRIU's lazy pages), `auto` when pre-copy stops converging, or `command` when QMP's migrate-start-postcopy says so; the process then runs on the destination and fetches what it lacks (needs `recv --restore`).
    #[arg(long, value_name = "N|start|auto|command")]
    postcopy_after: Option<source::PostcopyAfter>,
    /// TLS 1.3: directory with ca-cert.pem, and client-cert.pem/client-key.pem for a receiver that verifies its peers (QEMU's tls-creds-x509 layout).
    #[arg(long, value_name = "DIR")]
    tls_creds: Option<PathBuf>,
    /// With --tls-creds: the name the receiver's certificate must carry [default: the host of --to].
    #[arg(long, value_name = "NAME", requires = "tls_creds")]
    tls_hostname: Option<String>,
}

#[derive(Args)]
struct RecvArgs {
    /// Address to listen on: PORT (loopback only) or ADDR:PORT, e.g. 0.0.0.0:4444 for every interface (port 0 picks a free port).
    #[arg(long, value_name = "[ADDR:]PORT", required_unless_present = "recover")]
    listen: Option<String>,
    /// Image directory to create.
    #[arg(long, value_name = "DIR", required_unless_present = "recover")]
    out: Option<PathBuf>,
    /// Not a receiver: tell the receiver whose control socket is --qmp, its post-copy paused, to wait for the resuming source on this address too (QMP migrate-recover), and exit.
    #[arg(long, value_name = "[ADDR:]PORT", requires = "qmp", conflicts_with_all = ["listen", "out", "restore"])]
    recover: Option<String>,
    /// Decompression worker threads.
    #[arg(long, value_name = "N", default_value_t = dest::DEFAULT_DECOMPRESS_THREADS)]
    decompress_threads: usize,
    /// Replace the image directory if it exists.
    #[arg(long)]
    force: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Print progress lines on stderr even when it is not a terminal (a bar is shown on a terminal anyway).
    #[arg(long)]
    progress: bool,
    /// Longest wait for a whole frame; a link silent this long is dead (TCP keepalive, TCP_USER_TIMEOUT).
    #[arg(long, value_name = "TIME", default_value = "30s", value_parser = parse_duration)]
    timeout: Duration,
    /// Refuse a migration whose pages would take more than this (K/M/G suffixes); the free space of the image's filesystem is always checked.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    max_image_size: Option<u64>,
    /// Restore the process here as soon as its memory is in; it starts once the source hands it over (needs root).
    #[arg(long)]
    restore: bool,
    /// With --restore: file opened for fds 0-2 that led to a terminal, pipe or socket on the source.
    #[arg(long, value_name = "PATH", default_value = "/dev/null")]
    stdio: PathBuf,
    /// With --restore: keep the process's pid and thread ids (they must be free here); default: new ones.
    #[arg(long)]
    same_pid: bool,
    /// With --restore: when post-copy's link breaks, keep the restored process and wait this long on the listening address for `procmig send --resume` (QEMU: postcopy-paused, migrate-recover); 0: kill it at once.
    #[arg(long, value_name = "TIME", default_value = "120s", value_parser = parse_duration)]
    recover_timeout: Duration,
    /// Serve QMP on this Unix socket while receiving (query-migrate, query-status, migrate_cancel, migrate-pause, migrate-recover, MIGRATION events).
    #[arg(long, value_name = "PATH")]
    qmp: Option<PathBuf>,
    /// TLS 1.3: directory with server-cert.pem, server-key.pem and ca-cert.pem (QEMU's tls-creds-x509 layout); plain clients are refused.
    #[arg(long, value_name = "DIR")]
    tls_creds: Option<PathBuf>,
    /// With --tls-creds: require a client certificate from ca-cert.pem's CA (QEMU's verify-peer).
    #[arg(long, value_name = "on|off", default_value = "on", value_parser = parse_on_off, requires = "tls_creds")]
    tls_verify_peer: bool,
    /// With --tls-creds: let in only clients whose certificate's distinguished name (e.g. CN=host,O=Org) matches a line of FILE; `*` matches anything (QEMU's tls-authz).
    #[arg(long, value_name = "FILE", requires = "tls_creds")]
    tls_authz: Option<PathBuf>,
}

#[derive(Args)]
struct RestoreArgs {
    /// Image directory (written by procmig recv, protocol version 3 or later).
    #[arg(long, value_name = "DIR")]
    image: PathBuf,
    /// File opened for fds 0-2 that led to a terminal, pipe or socket on the source.
    #[arg(long, value_name = "PATH", default_value = "/dev/null")]
    stdio: PathBuf,
    /// Keep the process's pid and thread ids (they must be free here); default: new ones.
    #[arg(long)]
    same_pid: bool,
    /// Run it without first checking the image's files against the digests its manifest recorded (the check reads the whole image once).
    #[arg(long)]
    no_verify: bool,
}

#[derive(Args)]
struct VerifyArgs {
    /// Process to compare with (stopped while compared, then left as found).
    /// Without it, the image's files are checked against the digests its
    /// manifest recorded when it was committed.
    #[arg(long)]
    pid: Option<i32>,
    /// Image directory.
    #[arg(long, value_name = "DIR")]
    image: PathBuf,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// `on`/`off` (also yes/no, true/false), as QEMU's boolean properties.
fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" | "yes" | "true" => Ok(true),
        "off" | "no" | "false" => Ok(false),
        _ => Err(format!("{s:?}: expected on or off")),
    }
}

/// `300ms`, `1.5s`, or a plain number of milliseconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let (num, scale) = if let Some(v) = t.strip_suffix("ms") {
        (v, 1e-3)
    } else if let Some(v) = t.strip_suffix('s') {
        (v, 1.0)
    } else {
        (t, 1e-3)
    };
    match num.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 && v * scale < 1e6 => {
            Ok(Duration::from_secs_f64(v * scale))
        }
        _ => Err(format!(
            "invalid duration {s:?} (expected e.g. 300ms or 2s)"
        )),
    }
}

/// The source process was handed over but the receiver did not confirm:
/// it is left stopped, and a person or orchestrator decides.
const EXIT_IN_DOUBT: u8 = 3;

fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string_pretty(v).expect("report serialises")
}

fn send(a: SendArgs) -> anyhow::Result<ExitCode> {
    let method = a.compress;
    let level = a.compress_level.unwrap_or(method.default_level());
    method.check_level(level).map_err(anyhow::Error::msg)?;
    let threads = a.compress_threads.unwrap_or_else(source::default_threads);
    if threads == 0 || threads > 255 {
        anyhow::bail!("--compress-threads must be 1..=255");
    }
    if a.max_bandwidth == Some(0) {
        anyhow::bail!("--max-bandwidth must be positive");
    }
    if a.resume_source {
        procmig::process::resume_stopped(a.pid)?;
        println!("resumed process {}", a.pid);
        return Ok(ExitCode::SUCCESS);
    }
    let resume = a.resume;
    let json_out = a.json;
    let mut cfg = SendConfig::new(a.pid, a.to.unwrap_or_default());
    cfg.method = method;
    cfg.level = level;
    cfg.compress_threads = threads;
    cfg.max_bandwidth = a.max_bandwidth;
    cfg.on_complete = a.on_complete;
    cfg.regions = a.region;
    cfg.batch_pages = a.batch_pages;
    cfg.mode = a.mode;
    cfg.dirty_tracking = a.dirty_tracking;
    cfg.downtime_limit = a.downtime_limit;
    if let Some(n) = a.max_iterations {
        cfg.max_iterations = n;
        cfg.stop_early = false;
    }
    cfg.auto_converge = a.auto_converge;
    cfg.force_downtime = a.force_downtime;
    cfg.timeout = a.timeout;
    cfg.postcopy_after = a.postcopy_after;
    if let Some(dir) = &a.tls_creds {
        let host = match &a.tls_hostname {
            Some(h) => h.clone(),
            None => host_of(&cfg.to).to_string(),
        };
        cfg.tls = Some(TlsClient::load(dir, &host)?);
    }
    cfg.throttle = ThrottleParams {
        trigger_threshold: a.throttle_trigger_threshold,
        initial: a.cpu_throttle_initial,
        increment: a.cpu_throttle_increment,
        max: a.max_cpu_throttle,
    };
    cfg.progress = Display::choose(std::io::stderr().is_terminal(), a.progress);
    if let Some(token) = resume {
        return send_resume(&cfg, token, json_out);
    }
    let cancel = procmig::cancel::install_signal_flag()?;
    let handle = MigrationHandle::new(&cfg, cancel);
    let events = match &a.events {
        Some(path) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| anyhow::anyhow!("--events {}: {e}", path.display()))?,
        ),
        None => None,
    };
    let qmp = if a.qmp.is_some() || events.is_some() {
        Some(
            procmig::control::qmp::QmpServer::start(
                a.qmp.as_deref(),
                events,
                std::sync::Arc::new(handle.clone()),
            )
            .map_err(|e| {
                anyhow::anyhow!(
                    "--qmp {}: {e}",
                    a.qmp.as_deref().unwrap_or(Path::new("")).display()
                )
            })?,
        )
    } else {
        None
    };
    let result = source::send(&cfg, &handle);
    if let Some(q) = qmp {
        // Clients polling for the end see it before the socket goes.
        q.finish(Duration::from_secs(2));
    }
    let report = match result {
        Ok(r) => r,
        Err(e) => {
            if a.json {
                println!("{}", json(&handle.failure(cfg.pid, &e)));
            }
            if matches!(
                e,
                source::SendError::HandoverInDoubt { .. }
                    | source::SendError::PostcopyBroken { .. }
            ) {
                eprintln!("procmig: error: {e}");
                return Ok(ExitCode::from(EXIT_IN_DOUBT));
            }
            return Err(e.into());
        }
    };
    if a.json {
        println!("{}", json(&report));
    } else {
        println!("{report}");
    }
    Ok(ExitCode::SUCCESS)
}

/// `send --resume`: finish a paused post-copy.
fn send_resume(cfg: &SendConfig, token: u64, json_out: bool) -> anyhow::Result<ExitCode> {
    match source::resume(cfg, token) {
        Ok(r) => {
            if json_out {
                println!("{}", json(&r));
            } else {
                println!("{r}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e @ source::SendError::PostcopyBroken { .. }) => {
            eprintln!("procmig: error: {e}");
            Ok(ExitCode::from(EXIT_IN_DOUBT))
        }
        Err(e) => Err(e.into()),
    }
}

/// A `send --resume` token: 16 hex digits.
fn parse_token(s: &str) -> Result<u64, String> {
    u64::from_str_radix(s.trim(), 16)
        .ok()
        .filter(|&t| t != 0)
        .ok_or_else(|| format!("{s:?}: expected the token a broken post-copy printed (hex)"))
}

fn recv(a: RecvArgs) -> anyhow::Result<ExitCode> {
    if let (Some(addr), Some(qmp)) = (&a.recover, &a.qmp) {
        return control(qmp, |c| {
            let r = c.execute("migrate-recover", serde_json::json!({"uri": addr}))?;
            let at = r["uri"].as_str().unwrap_or(addr);
            println!("the receiver waits for the resuming source on {at} too");
            Ok(())
        });
    }
    let (Some(listen), Some(out)) = (a.listen, a.out) else {
        anyhow::bail!("--listen and --out are needed");
    };
    if a.decompress_threads == 0 || a.decompress_threads > 255 {
        anyhow::bail!("--decompress-threads must be 1..=255");
    }
    let cfg = RecvConfig {
        listen,
        out,
        decompress_threads: a.decompress_threads,
        force: a.force,
        progress: Display::choose(std::io::stderr().is_terminal(), a.progress),
        timeout: a.timeout,
        max_image_size: a.max_image_size,
        restore: a.restore.then_some(procmig::restore::RestoreOptions {
            stdio: a.stdio,
            same_pid: a.same_pid,
        }),
        tls: match &a.tls_creds {
            Some(dir) => Some(TlsServer::load(
                dir,
                a.tls_verify_peer,
                a.tls_authz.as_deref(),
            )?),
            None => None,
        },
        recover_timeout: a.recover_timeout,
    };
    let cancel = procmig::cancel::install_signal_flag()?;
    let listener = dest::Listener::bind(cfg)?;
    let handle = procmig::control::dest::RecvHandle::new(cancel.clone());
    let qmp = match &a.qmp {
        Some(path) => Some(
            procmig::control::qmp::QmpServer::start(Some(path), None, handle.clone())
                .map_err(|e| anyhow::anyhow!("--qmp {}: {e}", path.display()))?,
        ),
        None => None,
    };
    // Scripts wait for this line (and read the port from it with --listen 0).
    eprintln!("procmig recv: listening on {}", listener.local_addr()?);
    let result = listener.run_with(&cancel, Some(handle));
    if let Some(q) = qmp {
        q.finish(Duration::from_secs(2));
    }
    let report = match result {
        Ok(r) => r,
        Err(e) => {
            if a.json {
                let status = match e {
                    dest::RecvError::Cancelled => "cancelled",
                    _ => "failed",
                };
                let v = serde_json::json!({"status": status, "error": e.to_string()});
                println!("{}", json(&v));
            }
            return Err(e.into());
        }
    };
    if a.json {
        println!("{}", json(&report));
    } else {
        println!("{report}");
    }
    Ok(ExitCode::SUCCESS)
}

fn verify(a: VerifyArgs) -> anyhow::Result<ExitCode> {
    let image = Image::open(&a.image)?;
    let Some(pid) = a.pid else {
        return verify_digests(&image, a.json);
    };
    let report = procmig::verify::verify_process(pid, &image, 10)?;
    if a.json {
        println!("{}", json(&report));
    } else if report.identical() {
        println!(
            "verify: identical: {} pages in {} regions",
            report.pages_compared, report.regions
        );
    } else {
        println!(
            "verify: DIFFERENT: {} of {} pages differ",
            report.pages_differing, report.pages_compared
        );
        for d in &report.first_differences {
            println!("  {:#x} {} ({})", d.addr, d.what, d.region);
        }
        if let Some(c) = report.caveat() {
            println!("note: {c}");
        }
    }
    if !a.json {
        for (reason, n, names) in procmig::process::summarize(&report.not_compared) {
            let more = if n > names.len() { ", ..." } else { "" };
            println!(
                "not compared: {n} mappings ({}{more}): {reason}",
                names.join(", ")
            );
        }
    }
    Ok(if report.identical() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// `verify --image` alone: every region against its manifest digest.
fn verify_digests(image: &Image, json_out: bool) -> anyhow::Result<ExitCode> {
    let bad = image.check_digests()?;
    let regions = &image.manifest.regions;
    if json_out {
        let bad: Vec<_> = bad
            .iter()
            .map(|&i| serde_json::json!({"region": i, "start": regions[i].start, "end": regions[i].end}))
            .collect();
        println!(
            "{}",
            serde_json::json!({"regions": regions.len(), "differing": bad})
        );
    } else if bad.is_empty() {
        println!(
            "verify: intact: {} regions match their digests",
            regions.len()
        );
    } else {
        println!(
            "verify: DIFFERENT: {} of {} regions do not match their digests",
            bad.len(),
            regions.len()
        );
        for &i in &bad {
            let r = &regions[i];
            println!("  region {i} {:#x}-{:#x} ({})", r.start, r.end, r.file);
        }
    }
    Ok(if bad.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn restore(a: RestoreArgs) -> anyhow::Result<ExitCode> {
    let opts = procmig::restore::RestoreOptions {
        stdio: a.stdio,
        same_pid: a.same_pid,
    };
    let t = std::time::Instant::now();
    let (r, checked) = procmig::restore::restore_image(&a.image, &opts, !a.no_verify)
        .map_err(|e| anyhow::anyhow!("restore failed: {e}"))?;
    let built = t.elapsed().saturating_sub(checked);
    let notes = r.notes.clone();
    let copy = r.copy_time;
    let pid = r
        .start()
        .map_err(|e| anyhow::anyhow!("restore failed: {e}"))?;
    let check = if a.no_verify {
        "not checked".to_string()
    } else {
        format!("image checked in {:.1} ms", checked.as_secs_f64() * 1000.0)
    };
    println!(
        "restored: pid {pid}, running (built in {:.1} ms, {:.1} ms of it copying memory; {check})",
        built.as_secs_f64() * 1000.0,
        copy.as_secs_f64() * 1000.0
    );
    for n in notes {
        println!("restore note: {n}");
    }
    Ok(ExitCode::SUCCESS)
}

fn check(pid: i32) -> anyhow::Result<ExitCode> {
    let why = procmig::restore::check(pid).map_err(anyhow::Error::msg)?;
    if why.is_empty() {
        println!("check: process {pid} can be restored");
        return Ok(ExitCode::SUCCESS);
    }
    for w in &why {
        println!("check: process {pid} cannot be restored: {w}");
    }
    Ok(ExitCode::from(2))
}

fn man(dir: PathBuf) -> anyhow::Result<ExitCode> {
    let top = Cli::command();
    let mut pages = vec![("procmig".to_string(), top.clone())];
    for sub in top.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = sub.get_name().to_string();
        pages.push((
            name.clone(),
            sub.clone()
                .display_name(format!("procmig-{name}"))
                .bin_name(format!("procmig {name}")),
        ));
    }
    for (name, cmd) in pages {
        let file = match name.as_str() {
            "procmig" => "procmig.1".to_string(),
            n => format!("procmig-{n}.1"),
        };
        let mut out = Vec::new();
        clap_mangen::Man::new(cmd).render(&mut out)?;
        out.extend_from_slice(man_extra(&name).as_bytes());
        std::fs::write(dir.join(file), out)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// EXIT STATUS and EXAMPLES for a man page (roff), the README's table.
fn man_extra(page: &str) -> String {
    type Lines = &'static [(&'static str, &'static str)];
    let (status, examples): (Lines, Lines) = match page {
        "send" => (
            &[
                ("0", "migrated; the process is left as --on-complete says (with a restoring receiver it runs there)"),
                ("2", "failed or cancelled before the handover: the process runs as it was found; or bad usage"),
                ("3", "handover in doubt (Commit sent, no answer) or post-copy broke: the process is left stopped with all of its memory; the message says how to decide (send --resume-source resumes it)"),
            ],
            &[
                ("Live-migrate process 1234:", "procmig send --pid 1234 --to dest.example:4444"),
                ("Over TLS, steerable over QMP:", "procmig send --pid 1234 --to dest.example:4444 --tls-creds /etc/procmig --qmp /run/procmig.sock"),
                ("Switch to post-copy when pre-copy stops converging:", "procmig send --pid 1234 --to dest.example:4444 --postcopy-after auto"),
            ],
        ),
        "recv" => (
            &[
                ("0", "image committed (with --restore, the process runs here)"),
                ("2", "failed or cancelled: nothing committed, nothing restored; or bad usage"),
            ],
            &[
                ("Receive into ./img, from other hosts:", "procmig recv --listen 0.0.0.0:4444 --out ./img"),
                ("Run the process here, TLS clients only:", "procmig recv --listen 0.0.0.0:4444 --out ./img --restore --tls-creds /etc/procmig"),
            ],
        ),
        "verify" => (
            &[("0", "identical (without --pid: every region matches its digest)"), ("1", "pages differ (without --pid: regions differ from their digests)"), ("2", "error")],
            &[
                ("Compare an image with the stopped source:", "procmig verify --pid 1234 --image ./img"),
                ("Check an image against its manifest's digests (after a copy, say):", "procmig verify --image ./img"),
            ],
        ),
        "restore" => (
            &[("0", "the process runs"), ("2", "failed: nothing runs")],
            &[("Run the process an image holds:", "procmig restore --image ./img")],
        ),
        "check" => (
            &[("0", "the process can be restored"), ("2", "it cannot (one line per reason), or error")],
            &[("Before migrating:", "procmig check --pid 1234")],
        ),
        "status" | "cancel" | "set" => (
            &[("0", "done"), ("2", "no such socket, or QMP refused (its error class and text)")],
            &[
                ("How is it doing:", "procmig status --qmp /run/procmig.sock"),
                ("Slow it down:", "procmig set --qmp /run/procmig.sock --max-bandwidth 20M"),
                ("Stop it (the process resumes):", "procmig cancel --qmp /run/procmig.sock"),
            ],
        ),
        "info" => (&[("0", "printed")], &[("What this kernel offers:", "procmig info")]),
        _ => (
            &[
                ("0", "success"),
                ("1", "verify: pages differ"),
                ("2", "failure before the handover (the source runs as it was), or bad usage"),
                ("3", "send: handover in doubt or post-copy broke (the source is left stopped)"),
            ],
            &[
                ("Destination:", "procmig recv --listen 0.0.0.0:4444 --out ./img --restore"),
                ("Source:", "procmig send --pid 1234 --to dest.example:4444"),
            ],
        ),
    };
    let esc = |t: &str| t.replace('\\', "\\\\").replace('-', "\\-");
    let mut r = String::from(".SH \"EXIT STATUS\"\n");
    for (code, text) in status {
        r.push_str(&format!(".TP\n\\fB{code}\\fR\n{}\n", esc(text)));
    }
    r.push_str(".SH EXAMPLES\n");
    for (what, cmd) in examples {
        r.push_str(&format!(
            ".PP\n{}\n.RS 4\n.nf\n{}\n.fi\n.RE\n",
            esc(what),
            esc(cmd)
        ));
    }
    r
}

/// Connect to a migration's QMP socket and run `f` on it.
fn control(
    path: &std::path::Path,
    f: impl FnOnce(
        &mut procmig::control::client::Client,
    ) -> Result<(), procmig::control::client::ClientError>,
) -> anyhow::Result<ExitCode> {
    let mut c = procmig::control::client::Client::connect(path, Duration::from_secs(10))?;
    f(&mut c)?;
    Ok(ExitCode::SUCCESS)
}

fn print_status(r: &serde_json::Value) {
    println!("status: {}", r["status"].as_str().unwrap_or("?"));
    let ram = &r["ram"];
    if ram.is_object() {
        let n = |k: &str| ram[k].as_u64().unwrap_or(0);
        println!(
            "transferred: {} kbytes, remaining {} kbytes of {} kbytes",
            n("transferred") / 1024,
            n("remaining") / 1024,
            n("total") / 1024
        );
        println!(
            "pages: {} normal, {} duplicate; dirty rate {} pages/s; {:.1} mbps; dirty sync count {}",
            n("normal"),
            n("duplicate"),
            n("dirty-pages-rate"),
            ram["mbps"].as_f64().unwrap_or(0.0),
            n("dirty-sync-count")
        );
    }
    for (k, label) in [
        ("total-time", "total time"),
        ("setup-time", "setup"),
        ("expected-downtime", "expected downtime"),
        ("downtime", "downtime"),
    ] {
        if let Some(v) = r[k].as_u64() {
            println!("{label}: {v} ms");
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.command {
        Command::Send(a) => send(a),
        Command::Recv(a) => recv(a),
        Command::Verify(a) => verify(a),
        Command::Restore(a) => restore(a),
        Command::Check { pid } => check(pid),
        Command::Info { json: as_json } => {
            let info = procmig::dirty::probe::info();
            if as_json {
                println!("{}", json(&info));
            } else {
                println!("{info}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Man { dir } => man(dir),
        Command::Status { qmp, json: as_json } => control(&qmp, |c| {
            let r = c.execute("query-migrate", serde_json::json!({}))?;
            if as_json {
                println!("{r}");
            } else {
                print_status(&r);
            }
            Ok(())
        }),
        Command::Pause { qmp } => control(&qmp, |c| {
            c.execute("migrate-pause", serde_json::json!({}))
                .map(|_| ())
        }),
        Command::Cancel { qmp } => control(&qmp, |c| {
            c.execute("migrate_cancel", serde_json::json!({}))
                .map(|_| ())
        }),
        Command::Set {
            qmp,
            max_bandwidth,
            downtime_limit,
        } => control(&qmp, |c| {
            let mut args = serde_json::Map::new();
            if let Some(b) = max_bandwidth {
                args.insert("max-bandwidth".into(), b.into());
            }
            if let Some(d) = downtime_limit {
                args.insert("downtime-limit".into(), (d.as_millis() as u64).into());
            }
            c.execute("migrate-set-parameters", args.into()).map(|_| ())
        }),
    };
    // What TLS connections were last given (an Ack, an Error) is sent
    // before the process goes.
    procmig::protocol::tls::finish(Duration::from_secs(3));
    match r {
        Ok(code) => code,
        Err(e) => {
            // Library errors carry their causes in their own message.
            eprintln!("procmig: error: {e}");
            ExitCode::from(2)
        }
    }
}
