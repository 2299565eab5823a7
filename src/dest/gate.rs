//! Admission: the listener accepts connections and reads each one's Hello
//! on a thread of its own, within `--timeout`, with at most
//! [`MAX_PENDING`] waiting at once. A client that sends garbage, speaks
//! another version, trickles bytes or says nothing is rejected with one
//! line on stderr and the receiver keeps listening, so nobody can lock the
//! real sender out. The first valid Hello gets the session; a later Hello
//! still in flight is told "busy". The session keeps the listener only
//! until the source's preempt channel (post-copy) has come in.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{unbounded, Sender};

use super::session::check_hello;
use super::{RecvConfig, RecvError, StreamError};
use crate::protocol::tls::TlsServer;
use crate::protocol::transport::{self, Closer, Connection, Reader, Writer};
use crate::protocol::{self, error_code, Control, DecodeError, Hello, ReadError};

/// Clients waiting for their Hello to be read, at most.
pub const MAX_PENDING: usize = 8;

/// How long admission waits for a connection before it looks again for
/// the Hellos being read (a new connection wakes it at once)...
const HELLO_POLL: Duration = Duration::from_millis(2);
/// ... for this long after the last connection (a TLS handshake included).
const HELLO_SOON: Duration = Duration::from_secs(1);

/// A client whose Hello checked out.
pub struct Admitted {
    pub peer: String,
    pub reader: Reader,
    pub writer: Writer,
    pub closer: Closer,
    pub hello: Hello,
}

/// Accept until one client sends a valid Hello (or `cancel` is set).
pub fn admit(
    listener: &transport::Listener,
    cfg: &RecvConfig,
    cancel: &AtomicBool,
) -> Result<Admitted, RecvError> {
    let (tx, rx) = unbounded::<Admitted>();
    let pending = Arc::new(AtomicUsize::new(0));
    let mut last = Instant::now();
    loop {
        if let Ok(a) = rx.try_recv() {
            return Ok(a);
        }
        // Just after a connection, look for its Hello often, so that a
        // sender (which says Hello at once) is taken up at once; a client
        // that stays silent does not keep it up.
        let wait = if pending.load(Ordering::Relaxed) > 0 && last.elapsed() < HELLO_SOON {
            HELLO_POLL
        } else {
            Duration::from_millis(50)
        };
        let deadline = Instant::now() + wait;
        let conn = match listener.accept(cancel, Some(deadline)) {
            Ok(Some(c)) => c,
            Ok(None) => return Err(RecvError::Cancelled),
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => continue,
            Err(e) => return Err(RecvError::Accept(e)),
        };
        if pending.load(Ordering::Relaxed) >= MAX_PENDING {
            eprintln!(
                "procmig recv: rejected {}: {MAX_PENDING} clients are already being heard",
                conn.peer()
            );
            continue;
        }
        pending.fetch_add(1, Ordering::Relaxed);
        last = Instant::now();
        let (tx, pending, timeout) = (tx.clone(), pending.clone(), cfg.timeout);
        let tls = cfg.tls.clone();
        std::thread::Builder::new()
            .name("hello".into())
            .spawn(move || {
                hear(conn, timeout, tls.as_ref(), &tx);
                pending.fetch_sub(1, Ordering::Relaxed);
            })
            .map_err(RecvError::Accept)?;
    }
}

/// Shake hands (TLS) and read one client's Hello within `timeout`;
/// `Err` says why the client is turned away (it was told when it could
/// be). Over a Unix socket (fuzzing, tests) there is no TCP liveness.
pub fn hear_one(
    conn: Connection,
    timeout: Duration,
    tls: Option<&TlsServer>,
) -> Result<Admitted, String> {
    let peer = conn.peer().to_string();
    let reject = |why: &dyn std::fmt::Display| Err(format!("rejected {peer}: {why}"));
    let deadline = Instant::now() + timeout;
    let conn = match open(conn, timeout, tls, deadline) {
        Ok(c) => c,
        Err(e) => return reject(&e),
    };
    let refused = tls.map_or(Ok(()), |t| t.authorise(conn.identity()));
    let peer = match (conn.is_tls(), conn.identity()) {
        (false, _) => peer,
        (true, Some(id)) => format!("{peer} over TLS 1.3 as {id}"),
        (true, None) => format!("{peer} over TLS 1.3, anonymous"),
    };
    let reject = |why: &dyn std::fmt::Display| Err(format!("rejected {peer}: {why}"));
    let (mut reader, mut writer, closer) = match conn.split() {
        Ok(parts) => parts,
        Err(e) => return reject(&e),
    };
    if let Err(why) = refused {
        let message = format!("not authorised: {why}");
        let _ = protocol::write_control(
            &mut writer,
            &Control::Error {
                code: error_code::FAILED,
                message: message.clone(),
            },
        );
        return reject(&message);
    }
    reader.set_deadline(Some(deadline));
    let hello = match protocol::read_control(&mut reader) {
        Ok(Control::Hello(h)) => h,
        Ok(other) => {
            return reject(&StreamError::Expected {
                expected: protocol::Kind::Hello,
                got: other.kind(),
            })
        }
        Err(ReadError::Decode(DecodeError::BadMagic(m))) if protocol::looks_like_tls(m) => {
            return reject(&"a TLS client, and this receiver has no --tls-creds")
        }
        Err(ReadError::Decode(e)) => return reject(&StreamError::NotProcmig(e)),
        Err(e) => return reject(&StreamError::from(e)),
    };
    if let Err(e) = check_hello(&hello) {
        let code = match e {
            StreamError::Version(_) => error_code::VERSION,
            _ => error_code::FAILED,
        };
        let message = e.to_string();
        let _ = protocol::write_control(&mut writer, &Control::Error { code, message });
        return reject(&e);
    }
    reader.set_deadline(None);
    Ok(Admitted {
        peer,
        reader,
        writer,
        closer,
        hello,
    })
}

/// An accepted connection as every connection of a session is opened:
/// liveness from `--timeout` (TCP only: fuzzing uses a Unix socket pair),
/// then the TLS handshake by `deadline` when `--tls-creds` is given.
fn open(
    conn: Connection,
    timeout: Duration,
    tls: Option<&TlsServer>,
    deadline: Instant,
) -> std::io::Result<Connection> {
    if conn.is_tcp() {
        conn.set_liveness(timeout)?;
    }
    match tls {
        Some(t) => t.wrap(conn, deadline),
        None => Ok(conn),
    }
}

/// [`hear_one`], then pass the client on, or say why it was rejected.
fn hear(conn: Connection, timeout: Duration, tls: Option<&TlsServer>, tx: &Sender<Admitted>) {
    let admitted = match hear_one(conn, timeout, tls) {
        Ok(a) => a,
        Err(why) => return eprintln!("procmig recv: {why}"),
    };
    if let Err(back) = tx.send(admitted) {
        // Another client got the session first.
        let mut a = back.into_inner();
        let _ = protocol::write_control(
            &mut a.writer,
            &Control::Error {
                code: error_code::FAILED,
                message: "busy: another migration is being received".into(),
            },
        );
        eprintln!(
            "procmig recv: rejected {}: busy with another migration",
            a.peer
        );
    }
}

/// Longest one would-be preempt channel may take to show its token.
const CANDIDATE_TIME: Duration = Duration::from_secs(5);

/// The preempt channel: the connection a source opens right after
/// Welcome to carry post-copy answers, recognised by the `token` Welcome
/// gave it. Other clients arriving meanwhile are told "busy". Within
/// `timeout` (the source connects at once), or the migration fails at
/// setup, before anything was stopped.
pub fn accept_channel(
    listener: &transport::Listener,
    token: u64,
    timeout: Duration,
    tls: Option<&TlsServer>,
    cancel: &AtomicBool,
) -> Result<(Reader, Closer), String> {
    let deadline = Instant::now() + timeout;
    let is_it = |c: &Control| matches!(c, Control::Channel { token: t } if *t == token);
    accept_tagged((listener, None), deadline, timeout, tls, cancel, is_it)
        .map(|(reader, _, closer, _)| (reader, closer))
        .map_err(|e| match e {
            Tagged::Cancelled => "cancelled by signal".into(),
            Tagged::Failed(e) => format!("the source's preempt channel did not come: {e}"),
        })
}

/// Why [`accept_tagged`] returned without a connection.
pub enum Tagged {
    Cancelled,
    Failed(std::io::Error),
}

/// The first connection before `deadline` whose first frame `is_it`
/// accepts (a preempt channel, a resuming source), with that frame;
/// `timeout` for its liveness and TLS. Other clients arriving meanwhile
/// are told "busy". Connections come on `listeners.0`, and on those
/// `listeners.1` holds (migrate-recover adds them while this waits).
pub fn accept_tagged(
    listeners: (
        &transport::Listener,
        Option<&std::sync::Mutex<Vec<transport::Listener>>>,
    ),
    deadline: Instant,
    timeout: Duration,
    tls: Option<&TlsServer>,
    cancel: &AtomicBool,
    is_it: impl Fn(&Control) -> bool,
) -> Result<(Reader, Writer, Closer, Control), Tagged> {
    loop {
        let accepted = transport::accept_any(&[listeners.0], listeners.1, cancel, Some(deadline));
        let conn = match accepted {
            Ok(Some(c)) => c,
            Ok(None) => return Err(Tagged::Cancelled),
            Err(e) => return Err(Tagged::Failed(e)),
        };
        let peer = conn.peer().to_string();
        // Each candidate gets a few seconds, not the whole time: the
        // source connects at once, and a silent stranger must not keep
        // it waiting in the backlog.
        let own = deadline.min(Instant::now() + CANDIDATE_TIME);
        let opened = open(conn, timeout, tls, own);
        let (mut reader, mut writer, closer) = match opened.and_then(|c| c.split()) {
            Ok(parts) => parts,
            Err(e) => {
                eprintln!("procmig recv: rejected {peer}: {e}");
                continue;
            }
        };
        reader.set_deadline(Some(own));
        match protocol::read_control(&mut reader) {
            Ok(c) if is_it(&c) => {
                reader.set_deadline(None);
                return Ok((reader, writer, closer, c));
            }
            other => {
                let why = match other {
                    Ok(Control::Resume { .. }) => "no paused migration with that token here",
                    _ => "busy: another migration is being received",
                };
                let _ = protocol::write_control(
                    &mut writer,
                    &Control::Error {
                        code: error_code::FAILED,
                        message: why.into(),
                    },
                );
                eprintln!("procmig recv: rejected {peer}: {why}");
            }
        }
    }
}
