//! The migration stream: framing, messages and their checks.
//!
//! ```text
//!  source (procmig send)                      destination (procmig recv)
//!    | ---- Hello {version, page size, codec, pid} --> |
//!    | <--- Welcome {version, decompress threads} ---- |   or Error
//!    | ---- Regions {table} -------------------------> |   creates sparse files
//!    | ---- Pages / Zero ... (any order in a round) --> |   decompressed by N workers
//!    | ---- RoundEnd {round} -------------------------> |   barrier: all of the round applied
//!    | <--- RoundApplied {round} (version 2) ---------- |
//!    |          ... more rounds (live pre-copy) ...     |
//!    | ---- End {totals} -----------------------------> |   totals checked
//!    | <--- Applied ----------------------------------- |   the receiver holds every page
//!    | ---- Commit (version 2) -----------------------> |   handover: the receiver owns it
//!    | <--- Ack {stats} ------------------------------- |   image committed, or Error
//! ```
//!
//! Every frame is a 16-byte header followed by a payload:
//!
//! | offset | size | field                                     |
//! |--------|------|-------------------------------------------|
//! | 0      | 4    | magic `PMIG`                              |
//! | 4      | 2    | kind ([`Kind`]; 0 is invalid)             |
//! | 6      | 2    | flags, must be 0                          |
//! | 8      | 4    | payload length (capped per kind)          |
//! | 12     | 4    | low 32 bits of XXH3-64 of the payload     |
//!
//! All integers are little-endian. The decoder trusts nothing: the payload
//! length is checked against the kind's cap before anything is allocated,
//! every count and offset inside a payload is bounded, and unknown kinds,
//! codecs or flags are errors. Pages frames also carry the XXH3-64 of the
//! raw (decompressed) pages.
//!
//! Compatibility: a receiver accepts protocol versions
//! [`MIN_VERSION`]..=[`VERSION`] and answers with the version it will speak;
//! a source refuses a receiver that answers with a version it does not
//! know. docs/protocol.md has the full byte layout.

mod frame;
pub mod tls;
pub mod transport;
mod wire;

pub use frame::*;

/// Version spoken by this build. Version 2 added RoundApplied (the
/// receiver confirms each round once applied, so the source measures the
/// rate pages really arrive at and enters the downtime with no backlog)
/// and the handover: after Applied the receiver commits only on the
/// source's Commit, so exactly one side owns the process at every instant.
pub const VERSION: u16 = 4;
/// Oldest version this build accepts.
pub const MIN_VERSION: u16 = 1;
/// The first version with RoundApplied and Commit.
pub const ROUND_APPLIED_VERSION: u16 = 2;
pub const HANDOVER_VERSION: u16 = 2;
/// Version 3: the State frame (restore) and the restored pid in Ack.
pub const STATE_VERSION: u16 = 3;
/// Version 4: the preempt channel for post-copy answers (Channel frame,
/// the token in Welcome).
pub const CHANNEL_VERSION: u16 = 4;
/// `PMIG` as a little-endian u32.
pub const MAGIC: u32 = u32::from_le_bytes(*b"PMIG");
/// Size of the frame header.
pub const HEADER_LEN: usize = 16;

/// Most pages one Pages frame may carry.
pub const MAX_BATCH_PAGES: u32 = 1024;
/// Largest page size accepted (the source's page size is sent in Hello).
pub const MAX_PAGE_SIZE: u32 = 64 << 10;
/// Most regions in a table.
pub const MAX_REGIONS: u32 = 1 << 16;
/// Longest region name kept (longer names are cut by the source).
pub const MAX_NAME: usize = 1024;
/// Longest error message carried.
pub const MAX_MESSAGE: usize = 4096;
/// Most runs in one Zero frame.
pub const MAX_ZERO_RUNS: u32 = 1 << 16;

/// Whether a bad frame magic is the start of a TLS record (a handshake
/// or an alert): a peer that speaks TLS where plain procmig was expected.
pub fn looks_like_tls(magic: u32) -> bool {
    let [kind, major, ..] = magic.to_le_bytes();
    (kind == 0x15 || kind == 0x16) && major == 0x03
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// The payload ended before a field.
    #[error("frame is truncated")]
    Truncated,
    /// Bytes were left over after the last field.
    #[error("frame has {0} unexpected trailing bytes")]
    TrailingBytes(usize),
    /// The header does not start with the magic number.
    #[error("bad frame magic {0:#010x} (not a procmig stream?)")]
    BadMagic(u32),
    /// Unknown frame kind.
    #[error("unknown frame kind {0}")]
    BadKind(u16),
    /// Flags that this version does not define.
    #[error("frame has unknown flags {0:#x}")]
    BadFlags(u16),
    /// A length or count above its cap.
    #[error("{what} of {len} exceeds the limit of {max}")]
    TooLong {
        what: &'static str,
        len: u64,
        max: u64,
    },
    /// Payload checksum mismatch.
    #[error("frame checksum mismatch (stream corrupted)")]
    BadChecksum,
    /// A string is not UTF-8.
    #[error("string field is not UTF-8")]
    BadUtf8,
    /// Some field has a value that makes no sense.
    #[error("{0}")]
    Invalid(String),
}

/// The peer's protocol versions and ours do not overlap.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "peer speaks protocol versions {peer_min}..={peer_max}, this build {MIN_VERSION}..={VERSION}"
)]
pub struct VersionMismatch {
    pub peer_min: u16,
    pub peer_max: u16,
}

/// The version both sides speak: the highest in both ranges. The receiver
/// calls it with the range in Hello, the sender with the single version
/// the receiver chose in Welcome (so a receiver that answers with a
/// version this build does not know is refused).
pub fn negotiate(peer_min: u16, peer_max: u16) -> Result<u16, VersionMismatch> {
    let v = VERSION.min(peer_max);
    if peer_min > peer_max || v < MIN_VERSION.max(peer_min) {
        return Err(VersionMismatch { peer_min, peer_max });
    }
    Ok(v)
}

#[cfg(test)]
mod negotiate_tests {
    use super::*;

    #[test]
    fn highest_common_version() {
        assert_eq!(negotiate(MIN_VERSION, VERSION), Ok(VERSION));
        assert_eq!(negotiate(MIN_VERSION, VERSION + 5), Ok(VERSION));
        assert_eq!(negotiate(VERSION, VERSION), Ok(VERSION));
        assert!(negotiate(VERSION + 1, VERSION + 2).is_err());
        assert!(negotiate(0, MIN_VERSION.saturating_sub(1)).is_err());
        assert!(negotiate(3, 2).is_err());
    }
}
