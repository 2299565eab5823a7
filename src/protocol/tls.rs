//! TLS 1.3 with mutual authentication under a migration connection.
//!
//! Credentials are laid out as QEMU's `tls-creds-x509` object reads them
//! from its directory:
//!
//! | file | who needs it |
//! |---|---|
//! | `ca-cert.pem` | both: the CA the peer's certificate must chain to |
//! | `server-cert.pem`, `server-key.pem` | the receiver |
//! | `client-cert.pem`, `client-key.pem` | the sender (when the receiver verifies peers, the default) |
//!
//! The sender checks the receiver's certificate against `ca-cert.pem` and
//! the name it connects to (`--tls-hostname`, else the host of `--to`).
//! The receiver, with verify-peer on (the default, as in QEMU), requires a
//! client certificate from the same CA, and with `--tls-authz FILE` only
//! lets in clients whose distinguished name matches a line of that file
//! (QEMU's `tls-authz` with an `authz-list-file`).
//!
//! rustls cannot be split into a read and a write half, and the migration
//! code reads and writes a connection from different threads. So once the
//! handshake is done, a pump thread owns the TLS session and the TCP
//! socket and relays plaintext to a Unix socket pair whose other end
//! becomes the connection: timeouts, deadlines, shutdown and cancellation
//! then work exactly as on plain TCP (see [`super::transport`]).

use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use super::transport::Connection;

/// What went wrong loading credentials.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS credentials: cannot read {}: {reason}", path.display())]
    Read { path: PathBuf, reason: String },
    #[error("TLS credentials in {}: {reason}", dir.display())]
    Config { dir: PathBuf, reason: String },
    #[error("invalid TLS host name {0:?}")]
    Name(String),
    #[error("--tls-authz needs the receiver to verify its peers (--tls-verify-peer on)")]
    AuthzWithoutVerify,
}

/// The sender's side: whom it trusts, what it shows, whom it expects.
#[derive(Debug, Clone)]
pub struct TlsClient {
    config: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
}

/// The receiver's side.
#[derive(Debug, Clone)]
pub struct TlsServer {
    config: Arc<rustls::ServerConfig>,
    /// Distinguished names (globs with `*`) let in; `None`: any client
    /// the CA vouches for.
    authz: Option<Vec<String>>,
}

/// ring, with AES-128-GCM first: as safe here as AES-256 and cheaper per
/// byte, which is what a migration stream spends.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::ring::cipher_suite as cs;
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites = vec![
        cs::TLS13_AES_128_GCM_SHA256,
        cs::TLS13_AES_256_GCM_SHA384,
        cs::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(p)
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let read = |reason: String| TlsError::Read {
        path: path.to_path_buf(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| read(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| read(e.to_string()))?;
    if certs.is_empty() {
        return Err(read("no certificate in it".into()));
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::Read {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

fn roots(dir: &Path) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(&dir.join("ca-cert.pem"))? {
        roots.add(c).map_err(|e| TlsError::Config {
            dir: dir.to_path_buf(),
            reason: format!("ca-cert.pem: {e}"),
        })?;
    }
    Ok(roots)
}

impl TlsClient {
    /// Credentials from `dir`; `hostname` is the name the receiver's
    /// certificate must carry (a DNS name or an IP address).
    pub fn load(dir: &Path, hostname: &str) -> Result<TlsClient, TlsError> {
        let bad = |reason: String| TlsError::Config {
            dir: dir.to_path_buf(),
            reason,
        };
        let name = match hostname.parse::<IpAddr>() {
            Ok(ip) => ServerName::IpAddress(ip.into()),
            Err(_) => ServerName::try_from(hostname.to_string())
                .map_err(|_| TlsError::Name(hostname.into()))?,
        };
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| bad(e.to_string()))?
            .with_root_certificates(roots(dir)?);
        // Without a client certificate the sender is anonymous: enough
        // for a receiver that does not verify peers.
        let cert = dir.join("client-cert.pem");
        let config = if cert.exists() {
            builder
                .with_client_auth_cert(certs(&cert)?, key(&dir.join("client-key.pem"))?)
                .map_err(|e| bad(format!("client-cert.pem/client-key.pem: {e}")))?
        } else {
            builder.with_no_client_auth()
        };
        Ok(TlsClient {
            config: Arc::new(config),
            name,
        })
    }

    /// Shake hands over `conn` (plain TCP) within `deadline`.
    pub fn wrap(&self, conn: Connection, deadline: Instant) -> io::Result<Connection> {
        let session = rustls::ClientConnection::new(self.config.clone(), self.name.clone())
            .map_err(io::Error::other)?;
        over_tls(conn, session.into(), deadline, "receiver")
    }
}

impl TlsServer {
    /// Credentials from `dir`. With `verify_peer`, a client must show a
    /// certificate from `ca-cert.pem`'s CA; `authz` names a file of
    /// distinguished names let in (one per line, `*` matches any run of
    /// characters, `#` starts a comment).
    pub fn load(
        dir: &Path,
        verify_peer: bool,
        authz: Option<&Path>,
    ) -> Result<TlsServer, TlsError> {
        let bad = |reason: String| TlsError::Config {
            dir: dir.to_path_buf(),
            reason,
        };
        if authz.is_some() && !verify_peer {
            return Err(TlsError::AuthzWithoutVerify);
        }
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| bad(e.to_string()))?;
        let builder = if verify_peer {
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots(dir)?),
                provider(),
            )
            .build()
            .map_err(|e| bad(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let mut config = builder
            .with_single_cert(
                certs(&dir.join("server-cert.pem"))?,
                key(&dir.join("server-key.pem"))?,
            )
            .map_err(|e| bad(format!("server-cert.pem/server-key.pem: {e}")))?;
        // One connection per migration: nothing to resume.
        config.send_tls13_tickets = 0;
        let authz = match authz {
            None => None,
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .map_err(|e| TlsError::Read {
                        path: path.to_path_buf(),
                        reason: e.to_string(),
                    })?
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(String::from)
                    .collect(),
            ),
        };
        Ok(TlsServer {
            config: Arc::new(config),
            authz,
        })
    }

    /// Shake hands over `conn` (plain TCP) within `deadline`; the
    /// connection then knows the client's identity (its certificate's
    /// distinguished name) when it showed one.
    pub fn wrap(&self, conn: Connection, deadline: Instant) -> io::Result<Connection> {
        let session =
            rustls::ServerConnection::new(self.config.clone()).map_err(io::Error::other)?;
        over_tls(conn, session.into(), deadline, "sender")
    }

    /// Whether the client `identity` (from [`Connection::identity`]) may
    /// send a migration here.
    pub fn authorise(&self, identity: Option<&str>) -> Result<(), String> {
        let Some(list) = &self.authz else {
            return Ok(());
        };
        match identity {
            Some(id) if list.iter().any(|p| glob(p, id)) => Ok(()),
            Some(id) => Err(format!("client {id:?} is not in the --tls-authz list")),
            None => Err("the client showed no certificate, and --tls-authz needs one".into()),
        }
    }
}

fn over_tls(
    conn: Connection,
    mut session: rustls::Connection,
    deadline: Instant,
    peer_is: &str,
) -> io::Result<Connection> {
    let (mut tcp, peer) = conn.into_tcp()?;
    handshake(&mut session, &mut tcp, deadline).map_err(|e| {
        let hint = if e.kind() == io::ErrorKind::UnexpectedEof {
            format!(" (the {peer_is} closed the connection: does it use --tls-creds?)")
        } else if e.to_string().contains("corrupt message") {
            format!(" (the {peer_is} does not speak TLS: does it use --tls-creds?)")
        } else {
            String::new()
        };
        io::Error::new(e.kind(), format!("TLS handshake failed: {e}{hint}"))
    })?;
    let identity = session
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|c| subject_dn(c));
    let (app, ours) = UnixStream::pair()?;
    let failed = Arc::new(Mutex::new(None));
    let under = tcp.try_clone()?;
    let note = failed.clone();
    tcp.set_nonblocking(true)?;
    ours.set_nonblocking(true)?;
    let h = std::thread::Builder::new()
        .name("tls".into())
        .spawn(move || {
            if let Err(e) = pump(session, &tcp, &ours) {
                *note.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
            }
            let _ = tcp.shutdown(Shutdown::Both);
            let _ = ours.shutdown(Shutdown::Both);
        })?;
    let mut pumps = PUMPS.lock().unwrap_or_else(|p| p.into_inner());
    pumps.retain(|h| !h.is_finished());
    pumps.push(h);
    Ok(Connection::from_pump(app, under, peer, failed, identity))
}

/// Every pump thread still running, so that the process does not exit
/// before the last frame it wrote (an Ack, an Error) is encrypted and
/// sent: see [`finish`].
static PUMPS: Mutex<Vec<std::thread::JoinHandle<()>>> = Mutex::new(Vec::new());

/// How long a pump may go on once its application side is closed: to
/// flush what was written and say close_notify, not to wait for a peer
/// that never closes.
const LINGER: std::time::Duration = std::time::Duration::from_secs(3);

/// Wait (at most `limit`) until every TLS connection has sent what was
/// written to it. Call before the process exits, once the connections
/// are dropped.
pub fn finish(limit: std::time::Duration) {
    let deadline = Instant::now() + limit;
    let pumps: Vec<_> = PUMPS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .drain(..)
        .collect();
    for h in pumps {
        while !h.is_finished() && Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        if h.is_finished() {
            let _ = h.join();
        }
    }
}

fn handshake(
    session: &mut rustls::Connection,
    tcp: &mut TcpStream,
    deadline: Instant,
) -> io::Result<()> {
    let timed_out = || io::Error::new(io::ErrorKind::TimedOut, "did not finish within --timeout");
    while session.is_handshaking() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(timed_out());
        }
        tcp.set_read_timeout(Some(left))?;
        tcp.set_write_timeout(Some(left))?;
        match session.complete_io(tcp) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Err(timed_out()),
            Err(e) => return Err(e),
        }
    }
    while session.wants_write() {
        session.write_tls(tcp)?;
    }
    tcp.set_read_timeout(None)?;
    tcp.set_write_timeout(None)
}

/// Relay between the TLS session on `tcp` and the plaintext socket `app`
/// until both directions have ended. Backpressure both ways: nothing more
/// is read from `app` while records wait for the network, nothing more
/// from the network while plaintext waits for `app`.
fn pump(
    mut tls: rustls::Connection,
    mut tcp: &TcpStream,
    mut app: &UnixStream,
) -> Result<(), String> {
    use io::ErrorKind::{Interrupted, WouldBlock};
    let mut buf = vec![0u8; 64 * 1024];
    let mut out: Vec<u8> = Vec::new();
    let mut out_at = 0;
    // app_done: the application wrote its last byte (or is gone);
    // peer_done: the peer's last byte was delivered (or nobody reads);
    // tcp_eof: the network said end of stream.
    let (mut app_done, mut peer_done, mut tcp_eof) = (false, false, false);
    let (mut app_shut, mut tcp_shut) = (false, false);
    // Set when the application side ended: the pump then has LINGER to
    // flush and hear the peer's end.
    let mut ended: Option<Instant> = None;
    loop {
        if app_done && ended.is_none() {
            ended = Some(Instant::now());
        }
        if ended.is_some_and(|t| t.elapsed() > LINGER) {
            return Ok(());
        }
        let mut progress = false;
        // Plaintext from the peer to the application.
        while out_at < out.len() {
            match app.write(&out[out_at..]) {
                Ok(n) => {
                    out_at += n;
                    progress = true;
                }
                Err(e) if e.kind() == WouldBlock => break,
                Err(e) if e.kind() == Interrupted => {}
                Err(_) => {
                    // Nobody reads any more: drop it and stop reading
                    // the peer; what the application wrote before it
                    // closed is still read and sent.
                    out.clear();
                    out_at = 0;
                    peer_done = true;
                }
            }
        }
        if out_at == out.len() {
            out.clear();
            out_at = 0;
            if !peer_done {
                match tls.reader().read(&mut buf) {
                    Ok(0) => peer_done = true,
                    Ok(n) => {
                        out.extend_from_slice(&buf[..n]);
                        continue;
                    }
                    Err(e) if e.kind() == WouldBlock => {}
                    // The peer closed without close_notify: its last
                    // byte has been delivered all the same.
                    Err(_) => peer_done = true,
                }
            }
        }
        if peer_done && out.is_empty() && !app_shut {
            let _ = app.shutdown(Shutdown::Write);
            app_shut = true;
        }
        // Plaintext from the application into records.
        if !app_done && !tls.wants_write() {
            match app.read(&mut buf) {
                Ok(0) => {
                    app_done = true;
                    tls.send_close_notify();
                    progress = true;
                }
                Ok(n) => {
                    tls.writer()
                        .write_all(&buf[..n])
                        .map_err(|e| e.to_string())?;
                    progress = true;
                }
                Err(e) if e.kind() == WouldBlock || e.kind() == Interrupted => {}
                Err(_) => {
                    app_done = true;
                    tls.send_close_notify();
                }
            }
        }
        while tls.wants_write() {
            match tls.write_tls(&mut tcp) {
                Ok(_) => progress = true,
                Err(e) if e.kind() == WouldBlock => break,
                Err(e) if e.kind() == Interrupted => {}
                Err(e) => return Err(e.to_string()),
            }
        }
        if app_done && !tls.wants_write() && !tcp_shut {
            let _ = tcp.shutdown(Shutdown::Write);
            tcp_shut = true;
        }
        // Records from the network, once what came before is delivered.
        if out.is_empty() && !peer_done && !tcp_eof && tls.wants_read() {
            match tls.read_tls(&mut tcp) {
                Ok(n) => {
                    tcp_eof = n == 0;
                    progress = true;
                    if let Err(e) = tls.process_new_packets() {
                        // Tell the peer why (an alert), then give up.
                        let _ = tls.write_tls(&mut tcp);
                        return Err(e.to_string());
                    }
                }
                Err(e) if e.kind() == WouldBlock || e.kind() == Interrupted => {}
                Err(e) => return Err(e.to_string()),
            }
        }
        if app_done && peer_done && out.is_empty() && !tls.wants_write() {
            return Ok(());
        }
        if progress {
            continue;
        }
        // Wait for what the steps above could not do now: a descriptor
        // with nothing asked of it is left out (fd -1), so a hung-up
        // socket cannot wake the loop for nothing.
        let want = |fd: i32, read: bool, write: bool| {
            let events =
                if read { libc::POLLIN } else { 0 } | if write { libc::POLLOUT } else { 0 };
            libc::pollfd {
                fd: if events != 0 { fd } else { -1 },
                events,
                revents: 0,
            }
        };
        let mut fds = [
            want(
                tcp.as_raw_fd(),
                !tcp_eof && !peer_done && out.is_empty(),
                tls.wants_write(),
            ),
            want(
                app.as_raw_fd(),
                !app_done && !tls.wants_write(),
                !out.is_empty(),
            ),
        ];
        // SAFETY: `fds` is a valid array of pollfd for the call's length.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, if ended.is_some() { 50 } else { 1000 }) };
        if r < 0 && io::Error::last_os_error().kind() != Interrupted {
            return Err(io::Error::last_os_error().to_string());
        }
    }
}

/// The host part of `HOST:PORT` (`[V6]:PORT` too): the name a receiver's
/// certificate is checked against by default.
pub fn host_of(to: &str) -> &str {
    if let Some(rest) = to.strip_prefix('[') {
        if let Some((host, _)) = rest.split_once(']') {
            return host;
        }
    }
    to.rsplit_once(':').map_or(to, |(h, _)| h)
}

/// The subject of a DER certificate as an RFC 4514 string, most specific
/// part first, as QEMU (GnuTLS) prints it: `CN=client,O=Example,C=GB`.
pub fn subject_dn(cert: &[u8]) -> Option<String> {
    let (0x30, cert, _) = der(cert)? else {
        return None;
    };
    let (0x30, mut tbs, _) = der(cert)? else {
        return None;
    };
    // [0] version (optional), serial, signature, issuer, validity, subject.
    let mut fields = Vec::new();
    while !tbs.is_empty() && fields.len() < 6 {
        let (tag, body, rest) = der(tbs)?;
        fields.push((tag, body));
        tbs = rest;
    }
    let skip = usize::from(fields.first()?.0 == 0xa0);
    let &(0x30, mut name) = fields.get(skip + 4)? else {
        return None;
    };
    let mut rdns = Vec::new();
    while !name.is_empty() {
        let (0x31, mut set, rest) = der(name)? else {
            return None;
        };
        name = rest;
        let mut parts = Vec::new();
        while !set.is_empty() {
            let (0x30, atv, rest) = der(set)? else {
                return None;
            };
            set = rest;
            let (0x06, oid, value) = der(atv)? else {
                return None;
            };
            let (_, value, _) = der(value)?;
            parts.push(format!(
                "{}={}",
                attribute(oid),
                escape(&String::from_utf8_lossy(value))
            ));
        }
        rdns.push(parts.join("+"));
    }
    rdns.reverse();
    Some(rdns.join(","))
}

/// One DER element: (tag, contents, what follows).
fn der(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |l, &b| l << 8 | usize::from(b));
        rest = &rest[n..];
        len
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

fn attribute(oid: &[u8]) -> String {
    match oid {
        [0x55, 0x04, 0x03] => "CN".into(),
        [0x55, 0x04, 0x06] => "C".into(),
        [0x55, 0x04, 0x07] => "L".into(),
        [0x55, 0x04, 0x08] => "ST".into(),
        [0x55, 0x04, 0x0a] => "O".into(),
        [0x55, 0x04, 0x0b] => "OU".into(),
        [0x09, 0x92, 0x26, 0x89, 0x93, 0xf2, 0x2c, 0x64, 0x01, 0x19] => "DC".into(),
        [0x09, 0x92, 0x26, 0x89, 0x93, 0xf2, 0x2c, 0x64, 0x01, 0x01] => "UID".into(),
        _ => dotted(oid),
    }
}

fn dotted(oid: &[u8]) -> String {
    let mut arcs: Vec<u64> = Vec::new();
    let mut v = 0u64;
    for &b in oid {
        v = v << 7 | u64::from(b & 0x7f);
        if b & 0x80 == 0 {
            if arcs.is_empty() {
                let first = (v / 40).min(2);
                arcs.push(first);
                arcs.push(v - first * 40);
            } else {
                arcs.push(v);
            }
            v = 0;
        }
    }
    arcs.iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(".")
}

fn escape(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for (i, c) in v.chars().enumerate() {
        let edge = i == 0 && (c == '#' || c == ' ') || i + 1 == v.chars().count() && c == ' ';
        if edge || matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';') {
            s.push('\\');
        }
        s.push(c);
    }
    s
}

/// `*` matches any run of characters; everything else itself.
fn glob(pattern: &str, s: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == s,
        Some((head, tail)) => {
            let Some(rest) = s.strip_prefix(head) else {
                return false;
            };
            (0..=rest.len())
                .filter(|&i| rest.is_char_boundary(i))
                .any(|i| glob(tail, &rest[i..]))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A certificate whose subject is C=GB, O=Example Org, CN=client.example
    /// (made once with openssl).
    const CLIENT: &str = include_str!("testdata/dn-cert.pem");

    #[test]
    fn subject_is_printed_most_specific_first() {
        let der = CertificateDer::from_pem_slice(CLIENT.as_bytes()).unwrap();
        assert_eq!(
            subject_dn(&der).as_deref(),
            Some("CN=client.example,O=Example Org\\, Ltd,C=GB")
        );
        assert_eq!(subject_dn(&der[..40]), None);
        assert_eq!(subject_dn(b"\x30\x84\xff\xff\xff\xff"), None);
    }

    #[test]
    fn oids_and_escapes() {
        assert_eq!(
            dotted(&[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d]),
            "1.2.840.113549"
        );
        assert_eq!(escape("#a,b "), "\\#a\\,b\\ ");
    }

    fn testdata() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("src/protocol/testdata")
    }

    /// A TLS connection pair over loopback: (client side, server side).
    fn tls_pair(
        client: &TlsClient,
        server: &TlsServer,
    ) -> (io::Result<Connection>, io::Result<Connection>) {
        use std::sync::atomic::AtomicBool;
        let l = super::super::transport::Listener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let deadline = Instant::now() + std::time::Duration::from_secs(20);
        let server = server.clone();
        let s = std::thread::spawn(move || {
            let c = l
                .accept(&AtomicBool::new(false), Some(deadline))
                .unwrap()
                .unwrap();
            server.wrap(c, deadline)
        });
        let c = super::super::transport::connect(&addr).unwrap();
        let c = client.wrap(c, deadline);
        (c, s.join().unwrap())
    }

    fn both() -> (TlsClient, TlsServer) {
        let dir = testdata();
        (
            TlsClient::load(&dir, "localhost").unwrap(),
            TlsServer::load(&dir, true, None).unwrap(),
        )
    }

    #[test]
    fn large_streams_cross_both_ways_at_once_and_end_cleanly() {
        let (client, server) = both();
        let (c, s) = tls_pair(&client, &server);
        let (c, s) = (c.unwrap(), s.unwrap());
        assert!(c.is_tls() && s.is_tls());
        assert_eq!(s.identity(), Some("CN=client,O=procmig"));
        assert_eq!(c.identity(), Some("CN=localhost,O=procmig"));
        let data: Vec<u8> = (0..24u32 << 20)
            .map(|i| (i * 7 + (i >> 13)) as u8)
            .collect();
        let (mut cr, cw, _) = c.split().unwrap();
        let (mut sr, sw, _) = s.split().unwrap();
        let send = |mut w: super::super::transport::Writer, d: Vec<u8>| {
            std::thread::spawn(move || {
                for chunk in d.chunks(100_003) {
                    w.write_all(chunk).unwrap();
                }
                // Dropping the last write half ends the stream.
            })
        };
        let a = send(cw.try_clone().unwrap(), data.clone());
        let b = send(sw.try_clone().unwrap(), data.iter().map(|b| !b).collect());
        let n = data.len();
        let r = std::thread::spawn(move || {
            let mut got = vec![0u8; n];
            sr.read_exact(&mut got).unwrap();
            (got, sr)
        });
        let mut got_c = vec![0u8; n];
        cr.read_exact(&mut got_c).unwrap();
        let (got_s, mut sr) = r.join().unwrap();
        a.join().unwrap();
        b.join().unwrap();
        assert!(got_s == data, "the server got other bytes");
        assert!(got_c.iter().zip(&data).all(|(x, y)| *x == !y));
        // The client closes (every half gone): the server reads the end.
        drop((cr, cw));
        let mut rest = Vec::new();
        sr.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        drop(sw);
    }

    #[test]
    fn closing_unblocks_a_tls_reader() {
        let (client, server) = both();
        let (c, _s) = tls_pair(&client, &server);
        let (mut r, _w, closer) = c.unwrap().split().unwrap();
        let t = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(50));
            closer.close();
        });
        let mut b = [0u8; 1];
        assert_eq!(r.read(&mut b).unwrap_or(0), 0);
        t.join().unwrap();
    }

    #[test]
    fn an_anonymous_client_is_refused_and_told_why() {
        let anon = std::env::temp_dir().join(format!("procmig-tls-anon-{}", std::process::id()));
        std::fs::create_dir_all(&anon).unwrap();
        std::fs::copy(testdata().join("ca-cert.pem"), anon.join("ca-cert.pem")).unwrap();
        let client = TlsClient::load(&anon, "localhost").unwrap();
        std::fs::remove_dir_all(&anon).unwrap();
        let (_, server) = both();
        let (c, s) = tls_pair(&client, &server);
        let e = s.err().expect("the server refuses");
        assert!(e.to_string().contains("TLS handshake failed"), "{e}");
        // TLS 1.3: the client finished its side; its first read says why.
        let (mut r, _w, _) = c.unwrap().split().unwrap();
        let e = r.read(&mut [0u8; 8]).unwrap_err();
        assert!(e.to_string().contains("alert"), "{e}");
    }

    #[test]
    fn the_receivers_name_is_checked() {
        let (_, server) = both();
        let client = TlsClient::load(&testdata(), "wrong.example").unwrap();
        let (c, _s) = tls_pair(&client, &server);
        let e = c.err().expect("the client refuses");
        assert!(e.to_string().contains("not valid for name"), "{e}");
        // By IP address too (the test certificate is valid for 127.0.0.1).
        let client = TlsClient::load(&testdata(), "127.0.0.1").unwrap();
        assert!(tls_pair(&client, &server).0.is_ok());
    }

    #[test]
    fn authz_needs_verify_peer_and_matches_identities() {
        let list = std::env::temp_dir().join(format!("procmig-authz-{}", std::process::id()));
        std::fs::write(&list, "# ops\nCN=client,O=procmig\n\nCN=*.example,O=ops\n").unwrap();
        let e = TlsServer::load(&testdata(), false, Some(&list)).unwrap_err();
        assert!(matches!(e, TlsError::AuthzWithoutVerify));
        let s = TlsServer::load(&testdata(), true, Some(&list)).unwrap();
        std::fs::remove_file(&list).unwrap();
        assert!(s.authorise(Some("CN=client,O=procmig")).is_ok());
        assert!(s.authorise(Some("CN=a.example,O=ops")).is_ok());
        assert!(s.authorise(Some("CN=client,O=other")).is_err());
        assert!(s.authorise(None).is_err());
        let e = TlsClient::load(Path::new("/nonexistent"), "x").unwrap_err();
        assert!(e.to_string().contains("/nonexistent/ca-cert.pem"), "{e}");
    }

    #[test]
    fn host_of_to() {
        assert_eq!(host_of("dest.example:4444"), "dest.example");
        assert_eq!(host_of("127.0.0.1:1"), "127.0.0.1");
        assert_eq!(host_of("[::1]:4444"), "::1");
    }

    #[test]
    fn authz_globs() {
        assert!(glob(
            "CN=client.example,O=*",
            "CN=client.example,O=Example,C=GB"
        ));
        assert!(glob("*", ""));
        assert!(!glob("CN=client", "CN=client2"));
        assert!(glob("CN=*.example,*", "CN=a.example,C=GB"));
        assert!(!glob("CN=*.example", "CN=a.example,C=GB"));
    }
}
