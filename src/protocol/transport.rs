//! Connections that carry a migration stream, independent of what is under
//! them.
//!
//! A [`Connection`] is split once into a [`Reader`], a [`Writer`] and a
//! [`Closer`]: the receiver reads on one thread while answering on another,
//! the sender's writer thread owns the write half while the state machine
//! reads acknowledgements. The closer ends both directions from any thread,
//! so a blocked read or write returns at once; that is how cancellation
//! works, for every kind of connection (see [`CloseOnCancel`]).
//!
//! A connection is plain TCP, or a TLS session (see [`super::tls`]) whose
//! plaintext reaches the halves through a Unix socket pair; the state
//! machines cannot tell them apart. A migration may hold several connections (the
//! main stream now; a return path, a fault channel or parallel channels
//! later): each is its own `Connection`, opened with [`connect`] or taken
//! from the same [`Listener`].

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long a connect may take before the next address is tried.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The address does not resolve.
    #[error("cannot resolve receiver address {to:?}: {source}")]
    Resolve { to: String, source: io::Error },
    /// Every address refused or timed out.
    #[error("cannot connect to receiver {to}: {source}")]
    Connect { to: String, source: io::Error },
}

/// The socket the halves read and write: the TCP connection itself, or
/// the plaintext end of a TLS pump.
enum Sock {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Sock {
    fn try_clone(&self) -> io::Result<Sock> {
        Ok(match self {
            Sock::Tcp(s) => Sock::Tcp(s.try_clone()?),
            Sock::Unix(s) => Sock::Unix(s.try_clone()?),
        })
    }
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Sock::Tcp(s) => s.set_read_timeout(t),
            Sock::Unix(s) => s.set_read_timeout(t),
        }
    }
    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Sock::Tcp(s) => s.set_write_timeout(t),
            Sock::Unix(s) => s.set_write_timeout(t),
        }
    }
    fn shutdown(&self) {
        let _ = match self {
            Sock::Tcp(s) => s.shutdown(Shutdown::Both),
            Sock::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }
    fn fd(&self) -> RawFd {
        match self {
            Sock::Tcp(s) => s.as_raw_fd(),
            Sock::Unix(s) => s.as_raw_fd(),
        }
    }
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Sock::Tcp(s) => s.read(buf),
            Sock::Unix(s) => s.read(buf),
        }
    }
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Sock::Tcp(s) => s.write(buf),
            Sock::Unix(s) => s.write(buf),
        }
    }
}

/// Why a TLS pump gave up, for the halves to report instead of a bare
/// end of stream.
type TlsFailure = Arc<Mutex<Option<String>>>;

/// Turn an end of stream or an error on a TLS connection into the TLS
/// failure behind it, when there is one.
fn tls_cause<T>(
    failed: &Option<TlsFailure>,
    r: io::Result<T>,
    eof: impl Fn(&T) -> bool,
) -> io::Result<T> {
    let broke = match &r {
        Ok(v) => eof(v),
        Err(e) => !matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
        ),
    };
    if broke {
        if let Some(why) = failed
            .as_ref()
            .and_then(|f| f.lock().unwrap_or_else(|p| p.into_inner()).clone())
        {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                format!("TLS: {why}"),
            ));
        }
    }
    r
}

/// One open connection, not yet split.
pub struct Connection {
    sock: Sock,
    /// The TCP connection under a TLS session.
    under: Option<TcpStream>,
    failed: Option<TlsFailure>,
    peer: String,
    identity: Option<String>,
}

impl Connection {
    /// Wrap a connected TCP stream (Nagle off: frames are written whole).
    pub fn from_tcp(tcp: TcpStream) -> io::Result<Connection> {
        tcp.set_nonblocking(false)?;
        let _ = tcp.set_nodelay(true);
        let peer = tcp
            .peer_addr()
            .map_or_else(|_| "unknown peer".to_string(), |a| a.to_string());
        Ok(Connection {
            sock: Sock::Tcp(tcp),
            under: None,
            failed: None,
            peer,
            identity: None,
        })
    }

    /// One end of a Unix stream socket pair (fuzzing and tests drive a
    /// receiver through one).
    pub fn from_unix(sock: UnixStream, peer: &str) -> Connection {
        Connection {
            sock: Sock::Unix(sock),
            under: None,
            failed: None,
            peer: peer.to_string(),
            identity: None,
        }
    }

    /// Whether the connection is TCP (plain or under TLS).
    pub fn is_tcp(&self) -> bool {
        self.under.is_some() || matches!(self.sock, Sock::Tcp(_))
    }

    /// The plain TCP stream, for a TLS handshake.
    pub(super) fn into_tcp(self) -> io::Result<(TcpStream, String)> {
        match self.sock {
            Sock::Tcp(tcp) if self.under.is_none() => Ok((tcp, self.peer)),
            _ => Err(io::Error::other(
                "TLS needs a plain TCP connection under it",
            )),
        }
    }

    /// The plaintext end of a TLS pump over `under`.
    pub(super) fn from_pump(
        app: UnixStream,
        under: TcpStream,
        peer: String,
        failed: TlsFailure,
        identity: Option<String>,
    ) -> Connection {
        Connection {
            sock: Sock::Unix(app),
            under: Some(under),
            failed: Some(failed),
            peer,
            identity,
        }
    }

    /// The other end, for messages.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// Over TLS, the distinguished name of the peer's certificate.
    pub fn identity(&self) -> Option<&str> {
        self.identity.as_deref()
    }

    /// Whether the connection is a TLS session.
    pub fn is_tls(&self) -> bool {
        self.under.is_some()
    }

    fn tcp_fd(&self) -> RawFd {
        self.under
            .as_ref()
            .map_or(self.sock.fd(), |t| t.as_raw_fd())
    }

    /// Bound how long the peer may stay silent: TCP keepalive probes
    /// after `timeout / 3` of silence (3 of them, `timeout / 6` apart), and
    /// TCP_USER_TIMEOUT: data unacknowledged for `timeout` (a dead link,
    /// a peer that stopped reading) fails the connection instead of
    /// leaving a writer blocked forever.
    pub fn set_liveness(&self, timeout: Duration) -> io::Result<()> {
        let fd = self.tcp_fd();
        let secs = |d: Duration| d.as_secs().clamp(1, i32::MAX as u64) as libc::c_int;
        let ms = timeout.as_millis().clamp(1, u32::MAX as u128) as libc::c_uint;
        setsockopt(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1)?;
        setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, secs(timeout / 3))?;
        setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_KEEPINTVL,
            secs(timeout / 6),
        )?;
        setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 3)?;
        setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_USER_TIMEOUT,
            ms as libc::c_int,
        )
    }

    /// Split into independent halves and a closer.
    pub fn split(self) -> io::Result<(Reader, Writer, Closer)> {
        let read = self.sock.try_clone()?;
        let close = self.sock.try_clone()?;
        let under = match &self.under {
            Some(t) => Some(Arc::new(t.try_clone()?)),
            None => None,
        };
        Ok((
            Reader {
                tcp: read,
                failed: self.failed.clone(),
                deadline: None,
                timeout: None,
            },
            Writer {
                tcp: self.sock,
                under: under.clone(),
                failed: self.failed,
            },
            Closer {
                tcp: Arc::new(close),
            },
        ))
    }
}

/// The read half.
pub struct Reader {
    tcp: Sock,
    failed: Option<TlsFailure>,
    /// No read may end after this (a whole frame's deadline: a peer that
    /// sends a byte now and then cannot hold the connection).
    deadline: Option<Instant>,
    /// The per-read timeout asked for with `set_timeout`.
    timeout: Option<Duration>,
}

impl Reader {
    /// Another read half on the same connection (for a thread that reads
    /// while this one is not used).
    pub fn try_clone(&self) -> io::Result<Reader> {
        Ok(Reader {
            tcp: self.tcp.try_clone()?,
            failed: self.failed.clone(),
            deadline: None,
            timeout: self.timeout,
        })
    }

    /// Reads fail with `TimedOut` once `deadline` has passed, however
    /// the bytes trickle in (`None`: only the per-read timeout counts).
    pub fn set_deadline(&mut self, deadline: Option<Instant>) {
        self.deadline = deadline;
        if deadline.is_none() {
            let _ = self.tcp.set_read_timeout(self.timeout);
        }
    }

    /// Longest a single read may block (`None`: no limit). A read that
    /// times out fails with `WouldBlock` or `TimedOut`.
    pub fn set_timeout(&mut self, t: Option<Duration>) -> io::Result<()> {
        self.timeout = t;
        self.tcp.set_read_timeout(t)
    }
}

impl Read for Reader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let r = self.read_inner(buf);
        tls_cause(&self.failed, r, |&n| n == 0 && !buf.is_empty())
    }
}

impl Reader {
    fn read_inner(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(d) = self.deadline {
            let left = d.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the peer did not send a whole frame in time",
                ));
            }
            self.tcp.set_read_timeout(Some(left))?;
            return match self.tcp.read(buf) {
                // The socket timeout that ran out was set to the time
                // left: the deadline passed.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the peer did not send a whole frame in time",
                )),
                r => r,
            };
        }
        self.tcp.read(buf)
    }
}

fn setsockopt(fd: i32, level: i32, name: i32, value: libc::c_int) -> io::Result<()> {
    // SAFETY: the option value is a c_int that lives across the call, and
    // its size is passed with it.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The write half.
pub struct Writer {
    tcp: Sock,
    under: Option<Arc<TcpStream>>,
    failed: Option<TlsFailure>,
}

impl Writer {
    /// Longest a single write may block (`None`: no limit).
    pub fn set_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.tcp.set_write_timeout(t)
    }

    /// Another write half on the same connection (for a thread that
    /// writes while this one is not used).
    pub fn try_clone(&self) -> io::Result<Writer> {
        Ok(Writer {
            tcp: self.tcp.try_clone()?,
            under: self.under.clone(),
            failed: self.failed.clone(),
        })
    }

    /// Cap the kernel's send buffer: what is queued there delays a frame
    /// written after it (post-copy answers to page faults).
    pub fn set_send_buffer(&self, bytes: i32) -> io::Result<()> {
        setsockopt(self.tcp.fd(), libc::SOL_SOCKET, libc::SO_SNDBUF, bytes)?;
        match &self.under {
            Some(t) => setsockopt(t.as_raw_fd(), libc::SOL_SOCKET, libc::SO_SNDBUF, bytes),
            None => Ok(()),
        }
    }
}

impl Write for Writer {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let r = self.tcp.write(buf);
        tls_cause(&self.failed, r, |_| false)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Ends a connection in both directions from any thread.
#[derive(Clone)]
pub struct Closer {
    tcp: Arc<Sock>,
}

impl Closer {
    /// Blocked and later reads and writes on either half return. Over
    /// TLS only the plaintext side is shut: the pump still encrypts and
    /// sends what was written before (a last Error frame), says
    /// close_notify and ends within its linger time.
    pub fn close(&self) {
        self.tcp.shutdown();
    }
}

/// While alive, closes a connection as soon as `cancel` is set, so that a
/// thread blocked on it returns and sees the flag.
pub struct CloseOnCancel {
    done: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl CloseOnCancel {
    pub fn new(cancel: Arc<AtomicBool>, closer: Closer) -> CloseOnCancel {
        let done = Arc::new(AtomicBool::new(false));
        let seen = done.clone();
        let handle = std::thread::Builder::new()
            .name("cancel-watch".into())
            .spawn(move || {
                while !seen.load(Ordering::Relaxed) {
                    if cancel.load(Ordering::Relaxed) {
                        closer.close();
                        return;
                    }
                    // Woken at once when dropped (no 20 ms wait to end).
                    std::thread::park_timeout(Duration::from_millis(20));
                }
            })
            .ok();
        CloseOnCancel { done, handle }
    }
}

impl Drop for CloseOnCancel {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            h.thread().unpark();
            let _ = h.join();
        }
    }
}

/// Connect to `to` (`host:port`), trying each address it resolves to.
pub fn connect(to: &str) -> Result<Connection, ConnectError> {
    let addrs: Vec<SocketAddr> = to
        .to_socket_addrs()
        .map_err(|source| ConnectError::Resolve {
            to: to.into(),
            source,
        })?
        .collect();
    let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
    for a in addrs {
        match TcpStream::connect_timeout(&a, CONNECT_TIMEOUT).and_then(Connection::from_tcp) {
            Ok(c) => return Ok(c),
            Err(e) => last = e,
        }
    }
    Err(ConnectError::Connect {
        to: to.into(),
        source: last,
    })
}

/// A bound listening socket.
pub struct Listener {
    tcp: TcpListener,
}

impl Listener {
    pub fn bind(addr: &str) -> io::Result<Listener> {
        let tcp = TcpListener::bind(addr)?;
        tcp.set_nonblocking(true)?;
        Ok(Listener { tcp })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.tcp.local_addr()
    }

    /// Wait for a connection until `cancel` is set (`Ok(None)`) or
    /// `deadline` passes (`TimedOut`).
    pub fn accept(
        &self,
        cancel: &AtomicBool,
        deadline: Option<Instant>,
    ) -> io::Result<Option<Connection>> {
        accept_any(&[self], None, cancel, deadline)
    }

    /// A connection waiting in the backlog, if any (never blocks).
    pub fn try_accept(&self) -> io::Result<Option<Connection>> {
        loop {
            match self.tcp.accept() {
                Ok((tcp, _)) => return Connection::from_tcp(tcp).map(Some),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// [`Listener::accept`] on several listeners: `fixed`, and those `more`
/// holds when looked at (listeners may be added while this waits).
pub fn accept_any(
    fixed: &[&Listener],
    more: Option<&std::sync::Mutex<Vec<Listener>>>,
    cancel: &AtomicBool,
    deadline: Option<Instant>,
) -> io::Result<Option<Connection>> {
    loop {
        if cancel.load(Ordering::Relaxed) {
            return Ok(None);
        }
        for l in fixed {
            if let Some(c) = l.try_accept()? {
                return Ok(Some(c));
            }
        }
        if let Some(more) = more {
            for l in more.lock().expect("not poisoned").iter() {
                if let Some(c) = l.try_accept()? {
                    return Ok(Some(c));
                }
            }
        }
        let now = Instant::now();
        if deadline.is_some_and(|d| now >= d) {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no connection before the deadline",
            ));
        }
        // Sleep until a listener has a connection (at once, not at the
        // next tick), the deadline, or a tick to look at `cancel` and
        // `more` again.
        let wait = deadline.map_or(ACCEPT_TICK, |d| (d - now).min(ACCEPT_TICK));
        let mut fds: Vec<libc::pollfd> = fixed
            .iter()
            .map(|l| l.tcp.as_raw_fd())
            .chain(more.into_iter().flat_map(|m| {
                let ls = m.lock().expect("not poisoned");
                ls.iter().map(|l| l.tcp.as_raw_fd()).collect::<Vec<_>>()
            }))
            .map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: `fds` is a valid array of its length; the descriptors
        // stay open while we wait (the listeners outlive this call, and a
        // closed one only makes poll report POLLNVAL).
        unsafe {
            libc::poll(
                fds.as_mut_ptr(),
                fds.len() as libc::nfds_t,
                wait.as_millis().max(1) as libc::c_int,
            )
        };
    }
}

/// How often [`accept_any`] looks at `cancel` and `more` while waiting.
const ACCEPT_TICK: Duration = Duration::from_millis(20);

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Connection, Connection) {
        let l = Listener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let c = connect(&addr).unwrap();
        let s = l
            .accept(&AtomicBool::new(false), None)
            .unwrap()
            .expect("a connection");
        (c, s)
    }

    #[test]
    fn halves_carry_bytes_both_ways() {
        let (c, s) = pair();
        let (mut cr, mut cw, _) = c.split().unwrap();
        let (mut sr, mut sw, _) = s.split().unwrap();
        cw.write_all(b"hello").unwrap();
        let mut b = [0u8; 5];
        sr.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"hello");
        sw.write_all(b"back").unwrap();
        let mut b = [0u8; 4];
        cr.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"back");
    }

    #[test]
    fn cancel_unblocks_a_reader() {
        let (c, _s) = pair();
        let (mut r, _w, closer) = c.split().unwrap();
        let cancel = Arc::new(AtomicBool::new(false));
        let _watch = CloseOnCancel::new(cancel.clone(), closer);
        let flag = cancel.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            flag.store(true, Ordering::Relaxed);
        });
        let mut b = [0u8; 1];
        // Returns (EOF or an error) instead of blocking forever.
        let n = r.read(&mut b).unwrap_or(0);
        assert_eq!(n, 0);
        t.join().unwrap();
    }

    #[test]
    fn accept_honours_cancel_and_deadline() {
        let l = Listener::bind("127.0.0.1:0").unwrap();
        assert!(l.accept(&AtomicBool::new(true), None).unwrap().is_none());
        let e = l
            .accept(
                &AtomicBool::new(false),
                Some(Instant::now() + Duration::from_millis(30)),
            )
            .err()
            .expect("timed out");
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
    }

    #[test]
    fn connect_errors_name_the_address() {
        let e = connect("no-such-host.invalid:1").err().unwrap();
        assert!(e.to_string().contains("no-such-host.invalid"), "{e}");
    }

    #[test]
    fn a_trickling_peer_misses_the_frame_deadline() {
        let (c, s) = pair();
        c.set_liveness(Duration::from_secs(6)).unwrap();
        let (mut r, _w, _) = c.split().unwrap();
        let (_sr, mut sw, _) = s.split().unwrap();
        let t = std::thread::spawn(move || {
            for _ in 0..20 {
                if sw.write_all(b"x").is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        r.set_deadline(Some(Instant::now() + Duration::from_millis(100)));
        let mut buf = [0u8; 64];
        let e = r.read_exact(&mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        t.join().unwrap();
    }
}
