//! A QMP server for one migration (`send --qmp PATH`, and the same
//! events as JSON lines with `--events FILE`): enough of QEMU's
//! machine protocol for its real clients (the `qemu.qmp` Python package,
//! scripts that speak JSON over the socket) to follow and steer a running
//! migration with QEMU's command names and reply shapes.
//!
//! - A greeting with a version and (no) capabilities; nothing but
//!   `qmp_capabilities` is accepted before it, as in QEMU.
//! - Commands: `qmp_capabilities`, `query-status`, `query-migrate`,
//!   `query-migrate-parameters`, `migrate-set-parameters` (`max-bandwidth`
//!   and `downtime-limit`, which take effect within one batch),
//!   `migrate_cancel`, `migrate-start-postcopy`, `query-commands`. Ids are
//!   echoed; failures are
//!   `{"error": {"class", "desc"}}`.
//! - Events, with timestamps: `MIGRATION` on every status change and
//!   `MIGRATION_PASS` on every round.
//!
//! Every client has a thread; a client that sends garbage gets an error
//! and may go on, one that stops reading is dropped (writes have a
//! deadline), and none of this can disturb the migration, which only
//! shares the [`MigrationHandle`] with it.

use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

use super::Controlled;

/// Longest a write to a client may block (a client that stops reading).
const WRITE_DEADLINE: Duration = Duration::from_secs(1);
/// A client's buffered, unparsed input, at most.
const MAX_INPUT: usize = 1 << 20;

type Clients = Arc<Mutex<Vec<Client>>>;

/// A client's write side, shared by its command thread and the events.
#[derive(Clone)]
struct Client {
    out: Arc<Mutex<UnixStream>>,
    /// Past `qmp_capabilities`: events are sent to it.
    ready: Arc<AtomicBool>,
}

impl Client {
    fn send(&self, v: &Value) -> io::Result<()> {
        let mut line = v.to_string();
        line.push_str("\r\n");
        let mut s = self.out.lock().unwrap_or_else(|p| p.into_inner());
        s.write_all(line.as_bytes())
    }
}

/// The running server; [`QmpServer::finish`] ends it.
pub struct QmpServer {
    path: Option<PathBuf>,
    stop: Arc<AtomicBool>,
    clients: Clients,
    threads: Vec<JoinHandle<()>>,
}

impl QmpServer {
    /// Listen on the Unix socket `path` (a stale socket file left by a
    /// dead process is replaced; a live one is an error), and/or append
    /// the events as JSON lines to `events` (`--events FILE`).
    pub fn start(
        path: Option<&Path>,
        events: Option<std::fs::File>,
        handle: Arc<dyn Controlled>,
    ) -> io::Result<QmpServer> {
        let stop = Arc::new(AtomicBool::new(false));
        let clients: Clients = Arc::default();
        let mut threads = Vec::new();
        if let Some(path) = path {
            if path.exists() {
                if UnixStream::connect(path).is_ok() {
                    return Err(io::Error::new(
                        io::ErrorKind::AddrInUse,
                        format!("{} is in use by another process", path.display()),
                    ));
                }
                std::fs::remove_file(path)?;
            }
            let listener = UnixListener::bind(path)?;
            listener.set_nonblocking(true)?;
            let (stop, clients, handle) = (stop.clone(), clients.clone(), handle.clone());
            threads.push(
                std::thread::Builder::new()
                    .name("qmp".into())
                    .spawn(move || accept_loop(&listener, &handle, &clients, &stop))?,
            );
        }
        {
            let (stop, clients) = (stop.clone(), clients.clone());
            threads.push(
                std::thread::Builder::new()
                    .name("qmp-events".into())
                    .spawn(move || events_loop(handle.as_ref(), &clients, events, &stop))?,
            );
        }
        Ok(QmpServer {
            path: path.map(Path::to_path_buf),
            stop,
            clients,
            threads,
        })
    }

    /// The migration ended: send the last events, let connected clients
    /// ask once more and leave (up to `linger`), then close everything and
    /// remove the socket.
    pub fn finish(mut self, linger: Duration) {
        let t = std::time::Instant::now();
        // The events thread sends the final status within its period.
        std::thread::sleep(Duration::from_millis(30));
        while t.elapsed() < linger && self.connected() > 0 {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.stop.store(true, Ordering::Relaxed);
        for c in self
            .clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = c
                .out
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .shutdown(std::net::Shutdown::Both);
        }
        for h in self.threads.drain(..) {
            let _ = h.join();
        }
        if let Some(p) = &self.path {
            let _ = std::fs::remove_file(p);
        }
    }

    fn connected(&self) -> usize {
        self.clients.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

fn accept_loop(
    listener: &UnixListener,
    handle: &Arc<dyn Controlled>,
    clients: &Clients,
    stop: &AtomicBool,
) {
    let mut workers: Vec<JoinHandle<()>> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((s, _)) => {
                let Ok(out) = s.try_clone() else { continue };
                let _ = s.set_nonblocking(false);
                let _ = out.set_write_timeout(Some(WRITE_DEADLINE));
                let client = Client {
                    out: Arc::new(Mutex::new(out)),
                    ready: Arc::new(AtomicBool::new(false)),
                };
                clients
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(client.clone());
                let (handle, clients) = (handle.clone(), clients.clone());
                if let Ok(h) =
                    std::thread::Builder::new()
                        .name("qmp-client".into())
                        .spawn(move || {
                            serve_client(s, &client, handle.as_ref());
                            clients
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .retain(|c| !Arc::ptr_eq(&c.out, &client.out));
                        })
                {
                    workers.push(h);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
        workers.retain(|h| !h.is_finished());
    }
    for h in workers {
        let _ = h.join();
    }
}

fn timestamp() -> Value {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    json!({"seconds": now.as_secs(), "microseconds": now.subsec_micros()})
}

fn event(name: &str, data: Value) -> Value {
    json!({"event": name, "data": data, "timestamp": timestamp()})
}

/// Watch the handle and tell every negotiated client of changes, and the
/// events file.
fn events_loop(
    handle: &dyn Controlled,
    clients: &Clients,
    mut file: Option<std::fs::File>,
    stop: &AtomicBool,
) {
    let mut status = None;
    let mut pass = None;
    loop {
        let done = stop.load(Ordering::Relaxed);
        let s = handle.status();
        let mut out = Vec::new();
        if status != Some(s) {
            status = Some(s);
            out.push(event("MIGRATION", json!({"status": s})));
        }
        if let Some(r) = handle.pass().filter(|&r| pass != Some(r)) {
            pass = Some(r);
            out.push(event("MIGRATION_PASS", json!({"pass": r})));
        }
        if let (Some(f), false) = (file.as_mut(), out.is_empty()) {
            let mut lines = String::new();
            for e in &out {
                lines.push_str(&e.to_string());
                lines.push('\n');
            }
            if f.write_all(lines.as_bytes()).is_err() {
                file = None; // a full disk or a closed pipe: stop writing
            }
        }
        if !out.is_empty() {
            let list = clients.lock().unwrap_or_else(|p| p.into_inner()).clone();
            for c in list.iter().filter(|c| c.ready.load(Ordering::Relaxed)) {
                for e in &out {
                    let _ = c.send(e);
                }
            }
        }
        if done {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn greeting() -> Value {
    json!({"QMP": {
        "version": {
            "qemu": {"major": 7, "minor": 2, "micro": 0},
            "package": concat!("procmig ", env!("CARGO_PKG_VERSION")),
        },
        "capabilities": [],
    }})
}

fn error(class: &str, desc: impl Into<String>) -> Value {
    json!({"error": {"class": class, "desc": desc.into()}})
}

/// Read a client's commands until it leaves.
fn serve_client(mut s: UnixStream, client: &Client, handle: &dyn Controlled) {
    if client.send(&greeting()).is_err() {
        return;
    }
    let mut pending: Vec<u8> = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        pending.extend_from_slice(&buf[..n]);
        while let Some((item, used)) = next_item(&pending) {
            let reply = match item {
                Item::Garbage => error("GenericError", "JSON parse error: expected an object"),
                Item::Object(bytes) => match serde_json::from_slice::<Value>(bytes) {
                    Ok(v) => command(&v, client, handle),
                    Err(e) => error("GenericError", format!("JSON parse error, {e}")),
                },
            };
            pending.drain(..used);
            if client.send(&reply).is_err() {
                return;
            }
        }
        if pending.len() > MAX_INPUT {
            let _ = client.send(&error("GenericError", "JSON parse error: input too long"));
            return;
        }
    }
}

enum Item<'a> {
    Object(&'a [u8]),
    Garbage,
}

/// The next complete top-level item in `b`, and the bytes it spans:
/// a `{...}` object (strings and escapes respected), or a run of stray
/// bytes up to a newline or the next `{`.
fn next_item(b: &[u8]) -> Option<(Item<'_>, usize)> {
    let start = b.iter().position(|c| !c.is_ascii_whitespace())?;
    if b[start] != b'{' {
        let end = b[start..]
            .iter()
            .position(|&c| c == b'\n' || c == b'{')
            .map(|e| start + e)?;
        return Some((Item::Garbage, end.max(start + 1)));
    }
    let (mut depth, mut in_str, mut esc) = (0usize, false, false);
    for (i, &c) in b.iter().enumerate().skip(start) {
        if in_str {
            match (esc, c) {
                (true, _) => esc = false,
                (false, b'\\') => esc = true,
                (false, b'"') => in_str = false,
                _ => {}
            }
            continue;
        }
        match c {
            b'"' => in_str = true,
            b'{' | b'[' => depth += 1,
            b'}' | b']' => {
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    return Some((Item::Object(&b[start..=i]), i + 1));
                }
            }
            _ => {}
        }
    }
    None
}

fn with_id(mut reply: Value, id: Option<&Value>) -> Value {
    if let (Some(id), Some(o)) = (id, reply.as_object_mut()) {
        o.insert("id".into(), id.clone());
    }
    reply
}

const COMMANDS: &[&str] = &[
    "qmp_capabilities",
    "query-commands",
    "query-status",
    "query-migrate",
    "query-migrate-parameters",
    "migrate-set-parameters",
    "migrate_cancel",
    "migrate-start-postcopy",
    "migrate-pause",
    "migrate-recover",
];

fn command(v: &Value, client: &Client, handle: &dyn Controlled) -> Value {
    let id = v.get("id");
    let Some(name) = v.get("execute").and_then(Value::as_str) else {
        return with_id(
            error("GenericError", "QMP input lacks member 'execute'"),
            id,
        );
    };
    let empty = Map::new();
    let args = match v.get("arguments") {
        None => &empty,
        Some(Value::Object(m)) => m,
        Some(_) => {
            return with_id(
                error(
                    "GenericError",
                    "QMP input member 'arguments' must be an object",
                ),
                id,
            )
        }
    };
    let ready = client.ready.load(Ordering::Relaxed);
    let reply = match (name, ready) {
        ("qmp_capabilities", false) => {
            client.ready.store(true, Ordering::Relaxed);
            json!({"return": {}})
        }
        ("qmp_capabilities", true) => error(
            "CommandNotFound",
            "Capabilities negotiation is already complete, command ignored",
        ),
        (_, false) => error(
            "CommandNotFound",
            "Expecting capabilities negotiation with 'qmp_capabilities'",
        ),
        ("query-commands", true) => {
            json!({"return": COMMANDS.iter().map(|c| json!({"name": c})).collect::<Vec<_>>()})
        }
        ("query-status", true) => json!({"return": handle.query_status()}),
        ("query-migrate", true) => json!({"return": handle.query_migrate()}),
        ("query-migrate-parameters", true) => json!({"return": handle.parameters()}),
        ("migrate-set-parameters", true) => match handle.set_parameters(args) {
            Ok(()) => json!({"return": {}}),
            Err(e) => error("GenericError", e),
        },
        ("migrate_cancel", true) => {
            handle.cancel();
            json!({"return": {}})
        }
        ("migrate-start-postcopy", true) => match handle.start_postcopy() {
            Ok(()) => json!({"return": {}}),
            Err(e) => error("GenericError", e),
        },
        ("migrate-pause", true) => match handle.pause() {
            Ok(()) => json!({"return": {}}),
            Err(e) => error("GenericError", e),
        },
        ("migrate-recover", true) => match args.get("uri").and_then(Value::as_str) {
            None => error("GenericError", "Parameter 'uri' is missing"),
            // QEMU returns {}; the address bound is added (port 0 picks one).
            Some(uri) => match handle.recover(uri) {
                Ok(addr) => json!({"return": {"uri": format!("tcp:{addr}")}}),
                Err(e) => error("GenericError", e),
            },
        },
        (other, true) => error(
            "CommandNotFound",
            format!("The command {other} has not been found"),
        ),
    };
    with_id(reply, id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_split_objects_and_garbage() {
        let b = br#" {"execute":"a","arguments":{"s":"}{\""}}{"execute":"b"} junk
{"x":[1,{"y":2}]}"#;
        let (i, n) = next_item(b).unwrap();
        assert!(matches!(i, Item::Object(o) if o.ends_with(br#""}}"#)));
        let rest = &b[n..];
        let (i, n2) = next_item(rest).unwrap();
        assert!(matches!(i, Item::Object(o) if o == br#"{"execute":"b"}"#));
        let rest = &rest[n2..];
        let (i, n3) = next_item(rest).unwrap();
        assert!(matches!(i, Item::Garbage));
        let (i, _) = next_item(&rest[n3..]).unwrap();
        assert!(matches!(i, Item::Object(o) if o == br#"{"x":[1,{"y":2}]}"#));
        assert!(next_item(br#"{"unfinished": "#).is_none());
    }

    #[test]
    fn commands_before_and_after_negotiation() {
        let cfg = crate::source::SendConfig::new(1, "x:1".into());
        let h = crate::source::MigrationHandle::new(&cfg, Arc::new(AtomicBool::new(false)));
        let (a, _b) = UnixStream::pair().unwrap();
        let c = Client {
            out: Arc::new(Mutex::new(a)),
            ready: Arc::new(AtomicBool::new(false)),
        };
        let run = |v: Value| command(&v, &c, &h as &dyn Controlled);
        let r = run(json!({"execute": "query-migrate", "id": 1}));
        assert_eq!(r["error"]["class"], "CommandNotFound");
        assert_eq!(r["id"], 1);
        assert_eq!(
            run(json!({"execute": "qmp_capabilities"}))["return"],
            json!({})
        );
        assert_eq!(
            run(json!({"execute": "query-migrate"}))["return"]["status"],
            "setup"
        );
        assert_eq!(
            run(json!({"execute": "nope"}))["error"]["class"],
            "CommandNotFound"
        );
        let r = run(
            json!({"execute": "migrate-set-parameters", "arguments": {"max-bandwidth": 1000, "downtime-limit": 50}}),
        );
        assert_eq!(r["return"], json!({}));
        assert_eq!(h.tunables().max_bandwidth(), Some(1000));
        assert_eq!(h.tunables().downtime_limit(), Duration::from_millis(50));
        let r = run(
            json!({"execute": "migrate-set-parameters", "arguments": {"max-bandwidth": 5, "compress-level": 3}}),
        );
        assert!(r["error"]["desc"]
            .as_str()
            .unwrap()
            .contains("compress-level"));
        // Nothing applied from a refused set.
        assert_eq!(h.tunables().max_bandwidth(), Some(1000));
        assert_eq!(
            run(json!({"execute": "migrate_cancel", "id": "x"}))["id"],
            "x"
        );
        assert!(h.is_cancelled());
    }
}
