//! Connecting to the receiver and the handshake.

use std::io;
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use super::{SendConfig, SendError};
use crate::protocol::{self, Control, Hello, ReadError};

pub fn connect(to: &str) -> Result<TcpStream, SendError> {
    let addrs: Vec<_> = to
        .to_socket_addrs()
        .map_err(|e| SendError::Resolve {
            to: to.into(),
            reason: e.to_string(),
        })?
        .collect();
    let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
    for a in addrs {
        match TcpStream::connect_timeout(&a, Duration::from_secs(10)) {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Err(e) => last = e,
        }
    }
    Err(SendError::Connect {
        to: to.into(),
        source: last,
    })
}

pub fn comm(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

pub fn handshake(sock: &mut TcpStream, cfg: &SendConfig, page_size: u64) -> Result<(), SendError> {
    let fail = |reason: String| SendError::Handshake {
        to: cfg.to.clone(),
        reason,
    };
    let hello = Control::Hello(Hello {
        version: protocol::VERSION,
        min_version: protocol::MIN_VERSION,
        page_size: page_size as u32,
        capabilities: protocol::CAPABILITIES,
        codec: cfg.method.wire() as u8,
        level: cfg.level,
        compress_threads: cfg.compress_threads as u16,
        pid: cfg.pid as u32,
        comm: comm(cfg.pid),
    });
    protocol::write_control(sock, &hello).map_err(|e| fail(e.to_string()))?;
    sock.set_read_timeout(Some(Duration::from_secs(30))).ok();
    match protocol::read_control(sock) {
        Ok(Control::Welcome(w)) => {
            if !(protocol::MIN_VERSION..=protocol::VERSION).contains(&w.version) {
                return Err(fail(format!(
                    "receiver speaks protocol version {}",
                    w.version
                )));
            }
            if w.capabilities & cfg.method.capability() != cfg.method.capability() {
                return Err(fail(format!("receiver cannot decode {}", cfg.method)));
            }
            Ok(())
        }
        Ok(Control::Error { message, .. }) => Err(SendError::Remote(message)),
        Ok(other) => Err(fail(format!("unexpected {:?} frame", other.kind()))),
        Err(ReadError::Decode(e)) => Err(fail(format!("not a procmig receiver ({e})"))),
        Err(e) => Err(fail(e.to_string())),
    }
}

/// After a write failed: did the receiver explain why in an Error frame?
pub fn remote_reason(sock: &mut TcpStream) -> Option<SendError> {
    sock.set_read_timeout(Some(Duration::from_secs(2))).ok();
    let mut payload = Vec::new();
    // Skip nothing: the receiver only ever sends Welcome, Ack or Error, and
    // Welcome was read during the handshake.
    match protocol::read_frame(sock, &mut payload) {
        Ok(kind) => match Control::decode(kind, &payload) {
            Ok(Control::Error { message, .. }) => Some(SendError::Remote(message)),
            _ => None,
        },
        Err(_) => None,
    }
}
