//! Finishing a post-copy that broke (QEMU's migrate with resume=true).
//!
//! When post-copy's link breaks, the sender exits 3 and the process stays
//! stopped here with all of its memory, while a receiver that says so
//! (capability bit 7) keeps the restored process running, paused, and
//! waits on its listening address. `procmig send --resume TOKEN --pid PID
//! --to HOST:PORT` opens a new connection, shows the token (Resume), reads
//! what the destination still lacks (its region table, Discard frames of
//! the missing pages, RoundEnd(0xFFFFFFFF)), and serves those pages as the
//! first sender did: answers to faults first, the rest in the background,
//! then PostcopyDone, and the receiver's Ack.

use std::time::Instant;

use super::postcopy::{Missing, Served, Server};
use super::{setup, OnComplete, SendConfig, SendError};
use crate::pages::Run;
use crate::process::{self, MemReader};
use crate::protocol::{self, Control, RegionEntry, POSTCOPY_ROUND};

/// What the sender prints after a broken post-copy: how to go on.
pub fn next_steps(pid: i32, token: u64, to: &str) -> String {
    if token == 0 {
        return format!(
            "The destination kills its copy when post-copy breaks: `procmig send --resume-source --pid {pid}` resumes the process here"
        );
    }
    format!(
        "The destination keeps its copy running, paused, for its --recover-timeout: finish the migration with `procmig send --resume {token:016x} --pid {pid} --to {to}`. Only once the destination has given up (its copy killed) may `procmig send --resume-source --pid {pid}` resume the process here"
    )
}

/// The outcome of `send --resume`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ResumeReport {
    pub status: String,
    pub pid: i32,
    /// The restored process on the destination, now with all of its memory.
    pub restored_pid: u32,
    /// Pages the destination still lacked when it resumed.
    pub missing_pages: u64,
    #[serde(flatten)]
    pub served: Served,
    pub total_time_ms: f64,
    /// What became of the process here (`--on-complete`).
    pub process: String,
}

impl std::fmt::Display for ResumeReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "Migration status: {}", self.status)?;
        writeln!(
            f,
            "resumed post-copy: the destination lacked {} pages; {} sent ({} asked for), in {:.0} ms",
            self.missing_pages, self.served.pages, self.served.requests, self.total_time_ms
        )?;
        writeln!(
            f,
            "restored on the destination: pid {}, with all of its memory",
            self.restored_pid
        )?;
        writeln!(f, "process {} here: {}", self.pid, self.process)
    }
}

/// Serve the missing pages of the stopped process `cfg.pid` to the paused
/// receiver at `cfg.to` that knows `token`.
pub fn resume(cfg: &SendConfig, token: u64) -> Result<ResumeReport, SendError> {
    let t0 = Instant::now();
    let pid = cfg.pid;
    match process::process_state(pid) {
        Ok('T') => {}
        Ok(state) => {
            return Err(SendError::Remote(format!(
                "process {pid} is not stopped (state {state}): it is not a source left by a broken post-copy"
            )))
        }
        Err(e) => return Err(e.into()),
    }
    let mem = MemReader::open(pid)?;
    let conn = setup::dial(cfg, &cfg.to)?;
    let (mut reader, mut writer, _closer) = conn
        .split()
        .map_err(|e| SendError::Connection(e.to_string()))?;
    let fail = |e: String| SendError::Handshake {
        to: cfg.to.clone(),
        reason: e,
    };
    let resume = Control::Resume {
        token,
        pid: pid as u32,
    };
    protocol::write_control(&mut writer, &resume).map_err(|e| fail(e.to_string()))?;
    reader.set_deadline(Some(Instant::now() + cfg.timeout));
    let missing = read_missing(&mut reader).map_err(fail)?;
    reader.set_deadline(None);
    let missing_pages: u64 = missing
        .iter()
        .flat_map(|m| &m.runs)
        .map(|r| r.count as u64)
        .sum();
    let server = Server {
        mem: &mem,
        page_size: process::page_size(),
        missing,
        method: cfg.method,
        level: cfg.level,
        max_bandwidth: cfg.max_bandwidth,
        threads: cfg.compress_threads,
    };
    let broken = |reason: String| SendError::PostcopyBroken {
        pid,
        reason,
        next: next_steps(pid, token, &cfg.to),
    };
    let (answer, served, _) = server
        .run(reader, writer, None, cfg.timeout)
        .map_err(|e| broken(e.to_string()))?;
    let restored_pid = match answer {
        Control::Ack(a) => a.restored_pid,
        other => return Err(broken(format!("{:?} instead of Ack", other.kind()))),
    };
    let process = match cfg.on_complete {
        OnComplete::Kill => {
            // SAFETY: plain kill of the process we were asked to migrate.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            "killed"
        }
        _ => "left stopped",
    };
    Ok(ResumeReport {
        status: "completed".into(),
        pid,
        restored_pid,
        missing_pages,
        served,
        total_time_ms: t0.elapsed().as_secs_f64() * 1000.0,
        process: process.into(),
    })
}

/// The paused receiver's answer to Resume: its region table, Discard
/// frames, RoundEnd(0xFFFFFFFF); or an Error.
fn read_missing(reader: &mut crate::protocol::transport::Reader) -> Result<Vec<Missing>, String> {
    let table: Vec<RegionEntry> = match protocol::read_control(reader) {
        Ok(Control::Regions(t)) => t,
        Ok(Control::Error { message, .. }) => return Err(message),
        Ok(other) => return Err(format!("unexpected {:?} frame", other.kind())),
        Err(e) => return Err(e.to_string()),
    };
    let mut runs: Vec<Vec<Run>> = vec![Vec::new(); table.len()];
    loop {
        match protocol::read_control(reader).map_err(|e| e.to_string())? {
            Control::Discard { region, runs: r } => {
                let Some(list) = runs.get_mut(region as usize) else {
                    return Err(format!("Discard names region {region}"));
                };
                list.extend(r);
            }
            Control::RoundEnd(POSTCOPY_ROUND) => break,
            Control::Error { message, .. } => return Err(message),
            other => return Err(format!("unexpected {:?} frame", other.kind())),
        }
    }
    Ok(table
        .iter()
        .zip(runs)
        .enumerate()
        .filter(|(_, (_, r))| !r.is_empty())
        .map(|(i, (e, runs))| Missing {
            index: i as u32,
            start: e.start,
            end: e.end,
            runs,
        })
        .collect())
}
