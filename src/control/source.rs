//! The source side of the control socket: a [`MigrationHandle`] answers
//! QMP with QEMU's member names.

use std::time::Duration;

use serde_json::{json, Map, Value};

use super::Controlled;
use crate::source::{MigrationHandle, Status};
use crate::stats::Counters;

impl Controlled for MigrationHandle {
    fn status(&self) -> &'static str {
        MigrationHandle::status(self).as_str()
    }

    fn pass(&self) -> Option<u32> {
        matches!(
            MigrationHandle::status(self),
            Status::Active | Status::Device
        )
        .then(|| self.round() + 1)
    }

    fn query_status(&self) -> Value {
        query_status(self)
    }

    fn query_migrate(&self) -> Value {
        query_migrate(self)
    }

    fn parameters(&self) -> Value {
        parameters(self)
    }

    fn set_parameters(&self, args: &Map<String, Value>) -> Result<(), String> {
        set_parameters(self, args)
    }

    fn cancel(&self) {
        MigrationHandle::cancel(self)
    }

    fn start_postcopy(&self) -> Result<(), String> {
        MigrationHandle::start_postcopy(self)
    }

    fn pause(&self) -> Result<(), String> {
        MigrationHandle::pause(self)
    }

    fn recover(&self, _uri: &str) -> Result<String, String> {
        Err("migrate-recover is the destination's command (procmig recv --qmp); the source resumes with procmig send --resume".into())
    }
}

fn query_status(handle: &MigrationHandle) -> Value {
    // The migrated process: running on the source until the final stop;
    // stopped there from then on (QEMU: paused, then postmigrate).
    let (status, running) = match handle.status() {
        Status::Setup | Status::Active | Status::Failed | Status::Cancelled => ("running", true),
        Status::Device => ("finish-migrate", false),
        Status::PostcopyActive => ("postmigrate", false),
        Status::Completed => ("postmigrate", false),
    };
    json!({"status": status, "running": running, "singlestep": false})
}

/// `query-migrate`, with QEMU's member names.
fn query_migrate(handle: &MigrationHandle) -> Value {
    let s = handle.status();
    let mut out = json!({"status": s.as_str()});
    if s == Status::Setup {
        return out;
    }
    let c = handle.counters();
    let g = Counters::get;
    let (total_bytes, ps, dirty_rate, expected) = handle.live_figures();
    let ps = ps.max(1);
    let (done, plan) = handle.round_progress();
    let (elapsed, finished) = handle.times();
    let wire = g(&c.wire_bytes);
    let secs = elapsed.as_secs_f64().max(1e-3);
    let normal = g(&c.normal_pages);
    let ram = json!({
        "transferred": wire,
        "remaining": if s == Status::Completed { 0 } else { (plan - done) * ps },
        "total": total_bytes,
        "duplicate": g(&c.zero_pages),
        "skipped": g(&c.skipped_pages),
        "normal": normal,
        "normal-bytes": normal * ps,
        "dirty-pages-rate": dirty_rate as u64,
        "mbps": wire as f64 * 8.0 / 1e6 / secs,
        "dirty-sync-count": handle.round() as u64 + 1,
        "page-size": ps,
        "pages-per-second": (normal as f64 / secs) as u64,
    });
    // QEMU's compression statistics (multi-thread compression).
    let (cpages, csize, batches, busy) = (
        g(&c.compressed_pages),
        g(&c.compressed_bytes),
        g(&c.batches),
        g(&c.busy),
    );
    let compression = json!({
        "pages": cpages,
        "busy": busy,
        "busy-rate": if batches > 0 { busy as f64 / batches as f64 } else { 0.0 },
        "compressed-size": csize,
        "compression-rate": if csize > 0 { (cpages * ps) as f64 / csize as f64 } else { 0.0 },
    });
    let o = out.as_object_mut().expect("an object");
    o.insert("ram".into(), ram);
    o.insert("compression".into(), compression);
    o.insert("total-time".into(), json!(elapsed.as_millis() as u64));
    match finished {
        Some((setup, downtime)) => {
            o.insert("setup-time".into(), json!(setup.as_millis() as u64));
            o.insert("downtime".into(), json!(downtime.as_millis() as u64));
        }
        None => {
            o.insert(
                "expected-downtime".into(),
                json!(expected.as_millis() as u64),
            );
        }
    }
    out
}

fn parameters(handle: &MigrationHandle) -> Value {
    let t = handle.tunables();
    json!({
        "max-bandwidth": t.max_bandwidth().unwrap_or(0),
        "downtime-limit": t.downtime_limit().as_millis() as u64,
    })
}

/// `migrate-set-parameters`: every argument is checked before any is
/// applied.
fn set_parameters(handle: &MigrationHandle, args: &Map<String, Value>) -> Result<(), String> {
    let mut bandwidth = None;
    let mut downtime = None;
    for (k, v) in args {
        match k.as_str() {
            "max-bandwidth" => {
                bandwidth = Some(v.as_u64().ok_or("Parameter 'max-bandwidth' expects a number of bytes per second")?)
            }
            "downtime-limit" => {
                let ms = v.as_u64().ok_or("Parameter 'downtime-limit' expects milliseconds")?;
                if ms > 2_000_000 {
                    return Err("Parameter 'downtime-limit' expects a value between 0 and 2000 seconds".into());
                }
                downtime = Some(Duration::from_millis(ms))
            }
            other => {
                return Err(format!(
                    "Parameter '{other}' cannot be changed while migrating (max-bandwidth and downtime-limit can)"
                ))
            }
        }
    }
    if let Some(b) = bandwidth {
        handle.tunables().set_max_bandwidth((b > 0).then_some(b));
    }
    if let Some(d) = downtime {
        handle.tunables().set_downtime_limit(d);
    }
    Ok(())
}
