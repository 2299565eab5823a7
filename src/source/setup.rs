//! Connecting to the receiver and the handshake.

use std::time::Duration;

use super::handle::MigrationHandle;
use super::{SendConfig, SendError};
use crate::protocol::transport::{self, CloseOnCancel, Closer, Reader, Writer};
use crate::protocol::{self, Control, Hello, ReadError};

/// The main connection to the receiver, split: the writer half goes to the
/// pipeline's writer thread (and comes back when it ends), the reader half
/// stays with the state machine for the receiver's answers.
pub struct Link {
    pub to: String,
    pub reader: Reader,
    pub writer: Option<Writer>,
    pub closer: Closer,
    /// The protocol version agreed on.
    pub version: u16,
    /// `--timeout`: the longest wait for an answer.
    pub timeout: Duration,
    /// The receiver restores the process (`recv --restore`).
    pub restore: bool,
    /// The receiver can finish by post-copy.
    pub postcopy: bool,
    /// The receiver takes Discard frames before the final round.
    pub discard_ahead: bool,
    /// The receiver pauses a broken post-copy and waits for `send
    /// --resume` with this token (0: it does not).
    pub resume_token: u64,
    recover: bool,
    /// Over TLS: the name in the receiver's certificate.
    pub tls_peer: Option<String>,
    /// Version 4, post-copy: the preempt channel, a second connection
    /// that carries answers to faults ahead of the background push.
    pub channel: Option<Writer>,
    /// Closes the channel on cancel, like `watch` the main connection.
    channel_watch: Option<CloseOnCancel>,
    /// Shuts the channel (migrate-pause).
    pub channel_closer: Option<Closer>,
    /// The address the main connection reached.
    peer_addr: Option<String>,
    /// Closes the link on cancel; taken away at the handover, after
    /// which a signal no longer interrupts anything.
    watch: Option<CloseOnCancel>,
}

/// Connect to `to` as every connection of a migration is opened: TCP,
/// liveness from `--timeout`, then TLS when `--tls-creds` is given.
pub(super) fn dial(cfg: &SendConfig, to: &str) -> Result<transport::Connection, SendError> {
    let conn = transport::connect(to)?;
    conn.set_liveness(cfg.timeout)
        .map_err(|e| SendError::Connection(e.to_string()))?;
    match &cfg.tls {
        Some(tls) => tls
            .wrap(conn, std::time::Instant::now() + cfg.timeout)
            .map_err(|e| SendError::Handshake {
                to: to.to_string(),
                reason: e.to_string(),
            }),
        None => Ok(conn),
    }
}

impl Link {
    /// Connect and shake hands; cancelling the migration closes the link.
    pub fn open(
        cfg: &SendConfig,
        handle: &MigrationHandle,
        page_size: u64,
    ) -> Result<Link, SendError> {
        let conn = dial(cfg, &cfg.to)?;
        let tls_peer = conn
            .is_tls()
            .then(|| conn.identity().unwrap_or("?").to_string());
        let peer_addr = conn
            .peer()
            .parse::<std::net::SocketAddr>()
            .ok()
            .map(|a| a.to_string());
        let (reader, writer, closer) = conn
            .split()
            .map_err(|e| SendError::Connection(e.to_string()))?;
        let mut link = Link {
            to: cfg.to.clone(),
            reader,
            writer: Some(writer),
            watch: Some(CloseOnCancel::new(
                handle.cancel_flag().clone(),
                closer.clone(),
            )),
            closer,
            version: 0,
            timeout: cfg.timeout,
            restore: false,
            postcopy: false,
            discard_ahead: false,
            resume_token: 0,
            recover: false,
            tls_peer,
            channel: None,
            channel_watch: None,
            channel_closer: None,
            peer_addr,
        };
        let token = link.handshake(cfg, page_size)?;
        if token != 0 && link.recover {
            link.resume_token = token;
        }
        if token != 0 {
            link.open_channel(cfg, handle, token)?;
        }
        Ok(link)
    }

    /// Connect the preempt channel (as the main connection: liveness,
    /// TLS) and present `token`.
    fn open_channel(
        &mut self,
        cfg: &SendConfig,
        handle: &MigrationHandle,
        token: u64,
    ) -> Result<(), SendError> {
        let fail = |reason: String| SendError::Handshake {
            to: cfg.to.clone(),
            reason: format!("preempt channel: {reason}"),
        };
        // The address the main connection reached, not `--to` resolved
        // again (a name with several addresses could lead elsewhere).
        let to = self.peer_addr.clone().unwrap_or_else(|| cfg.to.clone());
        let conn = dial(cfg, &to).map_err(|e| match e {
            SendError::Handshake { reason, .. } | SendError::Connection(reason) => fail(reason),
            e => fail(e.to_string()),
        })?;
        let (_reader, mut writer, closer) = conn.split().map_err(|e| fail(e.to_string()))?;
        protocol::write_control(&mut writer, &Control::Channel { token })
            .map_err(|e| fail(e.to_string()))?;
        self.channel_closer = Some(closer.clone());
        self.channel_watch = Some(CloseOnCancel::new(handle.cancel_flag().clone(), closer));
        self.channel = Some(writer);
        Ok(())
    }

    /// Hello and Welcome; returns the preempt channel's token (0: none).
    fn handshake(&mut self, cfg: &SendConfig, page_size: u64) -> Result<u64, SendError> {
        let fail = |reason: String| SendError::Handshake {
            to: self.to.clone(),
            reason,
        };
        let hello = Control::Hello(Hello {
            version: protocol::VERSION,
            min_version: protocol::MIN_VERSION,
            page_size: page_size as u32,
            // Post-copy may follow: ask for a preempt channel.
            capabilities: protocol::CAPABILITIES
                | if cfg.postcopy_after.is_some() {
                    protocol::CAP_PREEMPT
                } else {
                    0
                },
            codec: cfg.method.wire() as u8,
            level: cfg.level,
            compress_threads: cfg.compress_threads as u16,
            pid: cfg.pid as u32,
            comm: comm(cfg.pid),
        });
        let writer = self.writer.as_mut().expect("handshake comes first");
        protocol::write_control(writer, &hello).map_err(|e| fail(e.to_string()))?;
        self.reader.set_timeout(Some(self.timeout)).ok();
        match protocol::read_control(&mut self.reader) {
            Ok(Control::Welcome(w)) => {
                if let Err(e) = protocol::negotiate(w.version, w.version) {
                    return Err(fail(format!(
                        "receiver speaks protocol version {} ({e})",
                        w.version
                    )));
                }
                if w.capabilities & cfg.method.capability() != cfg.method.capability() {
                    return Err(fail(format!("receiver cannot decode {}", cfg.method)));
                }
                self.version = w.version;
                self.restore = w.capabilities & protocol::CAP_RESTORE != 0;
                self.postcopy = w.capabilities & protocol::CAP_POSTCOPY != 0;
                self.discard_ahead = w.capabilities & protocol::CAP_DISCARD_AHEAD != 0;
                self.recover = w.capabilities & protocol::CAP_RECOVER != 0;
                let preempt = w.version >= protocol::CHANNEL_VERSION
                    && w.capabilities & protocol::CAP_PREEMPT != 0;
                Ok(if preempt { w.channel_token } else { 0 })
            }
            Ok(Control::Error { message, .. }) => Err(SendError::Remote(message)),
            Ok(other) => Err(fail(format!("unexpected {:?} frame", other.kind()))),
            Err(ReadError::Decode(protocol::DecodeError::BadMagic(m)))
                if protocol::looks_like_tls(m) =>
            {
                Err(fail(
                    "the receiver answered in TLS: it expects --tls-creds".into(),
                ))
            }
            Err(ReadError::Decode(e)) => Err(fail(format!("not a procmig receiver ({e})"))),
            Err(e) => Err(fail(describe(e, self.timeout))),
        }
    }

    /// Version 2: wait until the receiver has applied `round` (the rate
    /// measured then is the rate pages really land at). An older receiver
    /// does not say: return at once.
    pub fn await_round_applied(&mut self, round: u32) -> Result<(), SendError> {
        if self.version < protocol::ROUND_APPLIED_VERSION {
            return Ok(());
        }
        match self.read_answer(self.timeout)? {
            Control::RoundApplied(r) if r == round => Ok(()),
            other => Err(SendError::BadAck(format!(
                "{:?} (waiting for round {round} to be applied)",
                other.kind()
            ))),
        }
    }

    /// From the handover on, cancelling no longer closes the link: the
    /// answer to Commit is worth waiting for (within its deadline).
    pub fn disarm_cancel(&mut self) {
        self.watch = None;
        self.channel_watch = None;
    }

    /// The receiver's next answer, within `timeout`; an Error frame is
    /// `SendError::Remote`.
    pub fn read_answer(&mut self, timeout: Duration) -> Result<Control, SendError> {
        self.reader.set_timeout(Some(timeout)).ok();
        match protocol::read_control(&mut self.reader) {
            Ok(Control::Error { message, .. }) => Err(SendError::Remote(message)),
            Ok(c) => Ok(c),
            Err(e) => Err(SendError::Connection(format!(
                "waiting for the receiver's answer: {}",
                describe(e, timeout)
            ))),
        }
    }

    /// After a write failed: did the receiver explain why in an Error frame?
    pub fn remote_reason(&mut self) -> Option<SendError> {
        self.reader.set_timeout(Some(Duration::from_secs(2))).ok();
        // The receiver only ever sends Welcome, Applied, Ack or Error, and
        // Welcome was read during the handshake.
        match protocol::read_control(&mut self.reader) {
            Ok(Control::Error { message, .. }) => Some(SendError::Remote(message)),
            _ => None,
        }
    }
}

/// A read error in words; a timeout says which one.
fn describe(e: ReadError, timeout: Duration) -> String {
    match e {
        ReadError::Io(io)
            if matches!(
                io.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            format!(
                "no answer within --timeout {}",
                crate::units::human_duration(timeout)
            )
        }
        e => e.to_string(),
    }
}

pub fn comm(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}
