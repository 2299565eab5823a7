//! Frame kinds, their payloads, and reading/writing them.

use std::io::{self, Read, Write};

use super::wire::{Get, Put};
use super::*;

/// Frame kinds. 0 is reserved so that a zeroed header means nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Kind {
    Hello = 1,
    Welcome = 2,
    Regions = 3,
    Pages = 4,
    Zero = 5,
    RoundEnd = 6,
    End = 7,
    Ack = 8,
    Error = 9,
    Applied = 10,
    /// Version 2: the receiver has applied every page of a round.
    RoundApplied = 11,
    /// Version 2: the source hands the process over; commit.
    Commit = 12,
    /// Version 3: the process state restore needs (JSON), before End.
    State = 13,
    /// Version 3, post-copy: pages of a region the destination must not
    /// take from the image; the restored process gets them on demand.
    Discard = 14,
    /// Version 3, post-copy, destination to source: send these pages now
    /// (the restored process is waiting on them).
    PageRequest = 15,
    /// Version 3, post-copy: every missing page was sent.
    PostcopyDone = 16,
    /// Version 4: the first frame on a second connection (the preempt
    /// channel that carries answers to faults during post-copy), with the
    /// token the receiver gave in Welcome.
    Channel = 17,
    /// Post-copy recovery: the first frame of a new connection from a
    /// source resuming a paused post-copy (`send --resume`), with the
    /// token of the migration (capability bit 7 in Welcome).
    Resume = 18,
}

impl Kind {
    pub fn from_u16(v: u16) -> Result<Kind, DecodeError> {
        Ok(match v {
            1 => Kind::Hello,
            2 => Kind::Welcome,
            3 => Kind::Regions,
            4 => Kind::Pages,
            5 => Kind::Zero,
            6 => Kind::RoundEnd,
            7 => Kind::End,
            8 => Kind::Ack,
            9 => Kind::Error,
            10 => Kind::Applied,
            11 => Kind::RoundApplied,
            12 => Kind::Commit,
            13 => Kind::State,
            14 => Kind::Discard,
            15 => Kind::PageRequest,
            16 => Kind::PostcopyDone,
            17 => Kind::Channel,
            18 => Kind::Resume,
            _ => return Err(DecodeError::BadKind(v)),
        })
    }

    /// Largest payload a frame of this kind may have.
    pub fn max_payload(self) -> u32 {
        match self {
            Kind::Hello
            | Kind::Welcome
            | Kind::RoundEnd
            | Kind::End
            | Kind::Ack
            | Kind::Applied
            | Kind::RoundApplied
            | Kind::Commit
            | Kind::PageRequest
            | Kind::PostcopyDone
            | Kind::Channel
            | Kind::Resume => 4096,
            Kind::Discard => 12 + MAX_ZERO_RUNS * RUN_LEN as u32,
            Kind::Error => 8 + MAX_MESSAGE as u32,
            Kind::State => crate::restore::state::MAX_STATE as u32,
            Kind::Regions => 4 + MAX_REGIONS * (8 + 8 + 4 + 2 + MAX_NAME as u32),
            Kind::Pages => PAGES_FIXED as u32 + MAX_BATCH_PAGES * (RUN_LEN as u32 + MAX_PAGE_SIZE),
            Kind::Zero => 12 + MAX_ZERO_RUNS * RUN_LEN as u32,
        }
    }
}

/// Codec of one Pages frame's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum WireCodec {
    /// Stored: the raw pages.
    Raw = 1,
    Zlib = 2,
    Zstd = 3,
    Lz4 = 4,
}

impl WireCodec {
    pub fn from_u8(v: u8) -> Result<WireCodec, DecodeError> {
        Ok(match v {
            1 => WireCodec::Raw,
            2 => WireCodec::Zlib,
            3 => WireCodec::Zstd,
            4 => WireCodec::Lz4,
            _ => return Err(DecodeError::Invalid(format!("unknown codec {v}"))),
        })
    }
}

/// Capability bits exchanged in Hello/Welcome: the codecs each side can decode.
pub const CAP_ZLIB: u64 = 1 << 0;
pub const CAP_ZSTD: u64 = 1 << 1;
pub const CAP_LZ4: u64 = 1 << 2;
/// Welcome only: the receiver restores the process (`recv --restore`), so
/// the source checks it can be restored before stopping anything.
pub const CAP_RESTORE: u64 = 1 << 3;
/// Welcome only: the receiver restores and can finish by post-copy.
pub const CAP_POSTCOPY: u64 = 1 << 4;
/// Version 4: post-copy answers may come on a channel of their own (the
/// source says it can in Hello, the receiver gives a token in Welcome).
pub const CAP_PREEMPT: u64 = 1 << 5;
/// Welcome only: the receiver takes Discard frames ahead of the final
/// round (they let it drop stale copies early; a RoundEnd ends their effect
/// on the missing set). Without it a source sends Discard only after the
/// final round.
pub const CAP_DISCARD_AHEAD: u64 = 1 << 6;
/// Welcome only: when post-copy breaks, the receiver keeps the restored
/// process paused and waits on its listening address for the source to
/// resume (a Resume frame with the preempt channel's token); see
/// docs/protocol.md.
pub const CAP_RECOVER: u64 = 1 << 7;
/// The round number of pages sent after the handover (post-copy).
pub const POSTCOPY_ROUND: u32 = u32::MAX;
/// What this build supports.
pub const CAPABILITIES: u64 = CAP_ZLIB | CAP_ZSTD | CAP_LZ4;

/// First message of the source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub version: u16,
    pub min_version: u16,
    pub page_size: u32,
    pub capabilities: u64,
    /// Codec the source intends to use (a [`WireCodec`] value).
    pub codec: u8,
    pub level: i32,
    pub compress_threads: u16,
    pub pid: u32,
    pub comm: String,
}

/// The receiver's answer to [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    pub version: u16,
    pub capabilities: u64,
    pub decompress_threads: u16,
    /// Version 4 with [`CAP_PREEMPT`]: the token a preempt channel shows
    /// in its Channel frame (0: no channel; not encoded then).
    pub channel_token: u64,
}

/// One region of the table. Region ids are indexes into the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionEntry {
    pub start: u64,
    pub end: u64,
    /// Bit 0 r, 1 w, 2 x, 3 shared.
    pub prot: u32,
    pub name: String,
}

pub const PROT_R: u32 = 1;
pub const PROT_W: u32 = 2;
pub const PROT_X: u32 = 4;
pub const PROT_SHARED: u32 = 8;

impl RegionEntry {
    /// Permissions in /proc/PID/maps notation.
    pub fn perms(&self) -> String {
        let f = |bit, c| if self.prot & bit != 0 { c } else { '-' };
        [
            f(PROT_R, 'r'),
            f(PROT_W, 'w'),
            f(PROT_X, 'x'),
            if self.prot & PROT_SHARED != 0 {
                's'
            } else {
                'p'
            },
        ]
        .iter()
        .collect()
    }
}

pub use crate::pages::Run;

const RUN_LEN: usize = 12;
/// round, region, codec + 3 pad, raw_len, n_runs, raw_xxh3.
const PAGES_FIXED: usize = 4 + 4 + 4 + 4 + 4 + 8;

/// Fixed part of a Pages frame, decoded and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PagesHeader {
    pub round: u32,
    pub region: u32,
    pub codec: WireCodec,
    pub raw_len: u32,
    pub raw_xxh3: u64,
    pub runs: Vec<Run>,
    /// Offset of the (compressed) data inside the payload.
    pub data_offset: usize,
}

/// Totals the source sends last; the receiver checks them against what it got.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Totals {
    pub rounds: u32,
    pub normal_pages: u64,
    pub zero_pages: u64,
    pub page_frames: u64,
    pub zero_frames: u64,
}

/// The receiver's final answer after committing the image.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AckInfo {
    pub normal_pages: u64,
    pub zero_pages: u64,
    /// Nanoseconds the decompression workers were busy, summed.
    pub decompress_busy_ns: u64,
    /// Nanoseconds spent committing the image (digests, sync, rename).
    pub commit_ns: u64,
    /// Version 3: pid of the process restored on the destination (0: none).
    pub restored_pid: u32,
}

/// A decoded control frame (everything but Pages, which is decoded in
/// place by [`decode_pages_header`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    Hello(Hello),
    Welcome(Welcome),
    Regions(Vec<RegionEntry>),
    Zero {
        round: u32,
        region: u32,
        runs: Vec<Run>,
    },
    RoundEnd(u32),
    /// The receiver applied round N (version 2 and later).
    RoundApplied(u32),
    /// The source hands over: the receiver owns the process from here
    /// (version 2 and later).
    Commit,
    End(Totals),
    /// The process state (JSON of `restore::ProcessState`), version 3.
    State(Vec<u8>),
    /// Post-copy: these pages of `region` are missing at the destination.
    Discard {
        region: u32,
        runs: Vec<Run>,
    },
    /// Post-copy: the destination needs `pages` pages at `addr` (a source
    /// address) now.
    PageRequest {
        addr: u64,
        pages: u32,
    },
    /// Post-copy: all missing pages were sent (`pages` of them).
    PostcopyDone {
        pages: u64,
    },
    /// Version 4: a preempt channel's first frame (see [`Kind::Channel`]).
    Channel {
        token: u64,
    },
    /// Post-copy recovery: a resuming source's first frame (see
    /// [`Kind::Resume`]).
    Resume {
        token: u64,
        /// The stopped source process the resuming sender serves.
        pid: u32,
    },
    /// Every page is applied and the totals match; the image is being
    /// committed. Ends the downtime.
    Applied,
    Ack(AckInfo),
    Error {
        code: u16,
        message: String,
    },
}

/// Error codes carried by Error frames.
pub mod error_code {
    /// Generic failure; the message says what.
    pub const FAILED: u16 = 1;
    /// Protocol version not supported.
    pub const VERSION: u16 = 2;
    /// The sender cancelled the migration.
    pub const CANCELLED: u16 = 3;
}

/// Start a frame in `buf`: writes a header with placeholders and returns
/// the offset to pass to [`end_frame`].
pub fn begin_frame(buf: &mut Vec<u8>, kind: Kind) -> usize {
    let start = buf.len();
    Put(buf).u32(MAGIC).u16(kind as u16).u16(0).u32(0).u32(0);
    start
}

/// Finish the frame begun at `start`: fills in length and checksum.
pub fn end_frame(buf: &mut [u8], start: usize) {
    let payload = &buf[start + HEADER_LEN..];
    let len = payload.len() as u32;
    let check = xxhash_rust::xxh3::xxh3_64(payload) as u32;
    buf[start + 8..start + 12].copy_from_slice(&len.to_le_bytes());
    buf[start + 12..start + 16].copy_from_slice(&check.to_le_bytes());
}

fn put_runs(p: &mut Put, runs: &[Run]) {
    for r in runs {
        p.u64(r.first).u32(r.count);
    }
}

impl Control {
    /// Append this frame, header included, to `buf`.
    pub fn encode(&self, buf: &mut Vec<u8>) {
        let start = begin_frame(buf, self.kind());
        let mut p = Put(buf);
        match self {
            Control::Hello(h) => {
                p.u16(h.version)
                    .u16(h.min_version)
                    .u32(h.page_size)
                    .u64(h.capabilities)
                    .u8(h.codec)
                    .i32(h.level)
                    .u16(h.compress_threads)
                    .u32(h.pid)
                    .str(&h.comm, 64);
            }
            Control::Welcome(w) => {
                p.u16(w.version)
                    .u64(w.capabilities)
                    .u16(w.decompress_threads);
                if w.channel_token != 0 {
                    p.u64(w.channel_token);
                }
            }
            Control::Regions(regions) => {
                p.u32(regions.len() as u32);
                for r in regions {
                    p.u64(r.start).u64(r.end).u32(r.prot).str(&r.name, MAX_NAME);
                }
            }
            Control::Zero {
                round,
                region,
                runs,
            } => {
                p.u32(*round).u32(*region).u32(runs.len() as u32);
                put_runs(&mut p, runs);
            }
            Control::RoundEnd(round) | Control::RoundApplied(round) => {
                p.u32(*round);
            }
            Control::End(t) => {
                p.u32(t.rounds)
                    .u64(t.normal_pages)
                    .u64(t.zero_pages)
                    .u64(t.page_frames)
                    .u64(t.zero_frames);
            }
            Control::Applied | Control::Commit => {}
            Control::State(b) => {
                p.bytes(b);
            }
            Control::Discard { region, runs } => {
                p.u32(*region).u32(runs.len() as u32);
                put_runs(&mut p, runs);
            }
            Control::PageRequest { addr, pages } => {
                p.u64(*addr).u32(*pages);
            }
            Control::PostcopyDone { pages } => {
                p.u64(*pages);
            }
            Control::Channel { token } => {
                p.u64(*token);
            }
            Control::Resume { token, pid } => {
                p.u64(*token).u32(*pid);
            }
            Control::Ack(a) => {
                p.u64(a.normal_pages)
                    .u64(a.zero_pages)
                    .u64(a.decompress_busy_ns)
                    .u64(a.commit_ns);
                if a.restored_pid != 0 {
                    p.u32(a.restored_pid);
                }
            }
            Control::Error { code, message } => {
                p.u16(*code).str(message, MAX_MESSAGE);
            }
        }
        end_frame(buf, start);
    }

    pub fn kind(&self) -> Kind {
        match self {
            Control::Hello(_) => Kind::Hello,
            Control::Welcome(_) => Kind::Welcome,
            Control::Regions(_) => Kind::Regions,
            Control::Zero { .. } => Kind::Zero,
            Control::RoundEnd(_) => Kind::RoundEnd,
            Control::RoundApplied(_) => Kind::RoundApplied,
            Control::Commit => Kind::Commit,
            Control::State(_) => Kind::State,
            Control::Discard { .. } => Kind::Discard,
            Control::PageRequest { .. } => Kind::PageRequest,
            Control::PostcopyDone { .. } => Kind::PostcopyDone,
            Control::Channel { .. } => Kind::Channel,
            Control::Resume { .. } => Kind::Resume,
            Control::End(_) => Kind::End,
            Control::Applied => Kind::Applied,
            Control::Ack(_) => Kind::Ack,
            Control::Error { .. } => Kind::Error,
        }
    }

    /// Decode the payload of a control frame of `kind`.
    pub fn decode(kind: Kind, payload: &[u8]) -> Result<Control, DecodeError> {
        let mut g = Get::new(payload);
        let c = match kind {
            Kind::Hello => Control::Hello(Hello {
                version: g.u16()?,
                min_version: g.u16()?,
                page_size: g.u32()?,
                capabilities: g.u64()?,
                codec: g.u8()?,
                level: g.i32()?,
                compress_threads: g.u16()?,
                pid: g.u32()?,
                comm: g.str(64)?,
            }),
            Kind::Welcome => Control::Welcome(Welcome {
                version: g.u16()?,
                capabilities: g.u64()?,
                decompress_threads: g.u16()?,
                channel_token: if g.rest_len() >= 8 { g.u64()? } else { 0 },
            }),
            Kind::Regions => {
                let n = g.u32()?;
                if n > MAX_REGIONS {
                    return Err(DecodeError::TooLong {
                        what: "region count",
                        len: n as u64,
                        max: MAX_REGIONS as u64,
                    });
                }
                let mut regions = Vec::with_capacity(n.min(1024) as usize);
                for _ in 0..n {
                    regions.push(RegionEntry {
                        start: g.u64()?,
                        end: g.u64()?,
                        prot: g.u32()?,
                        name: g.str(MAX_NAME)?,
                    });
                }
                Control::Regions(regions)
            }
            Kind::Zero => {
                let round = g.u32()?;
                let region = g.u32()?;
                let runs = get_run_list(&mut g, "zero run count")?;
                Control::Zero {
                    round,
                    region,
                    runs,
                }
            }
            Kind::RoundEnd => Control::RoundEnd(g.u32()?),
            Kind::RoundApplied => Control::RoundApplied(g.u32()?),
            Kind::End => Control::End(Totals {
                rounds: g.u32()?,
                normal_pages: g.u64()?,
                zero_pages: g.u64()?,
                page_frames: g.u64()?,
                zero_frames: g.u64()?,
            }),
            Kind::Applied => Control::Applied,
            Kind::Commit => Control::Commit,
            Kind::State => Control::State(g.rest().to_vec()),
            Kind::Discard => {
                let region = g.u32()?;
                let runs = get_run_list(&mut g, "discard run count")?;
                Control::Discard { region, runs }
            }
            Kind::PageRequest => Control::PageRequest {
                addr: g.u64()?,
                pages: g.u32()?,
            },
            Kind::PostcopyDone => Control::PostcopyDone { pages: g.u64()? },
            Kind::Channel => Control::Channel { token: g.u64()? },
            Kind::Resume => Control::Resume {
                token: g.u64()?,
                pid: g.u32()?,
            },
            Kind::Ack => Control::Ack(AckInfo {
                normal_pages: g.u64()?,
                zero_pages: g.u64()?,
                decompress_busy_ns: g.u64()?,
                commit_ns: g.u64()?,
                // Version 3: the pid of the restored process, when it is.
                restored_pid: if g.rest_len() >= 4 { g.u32()? } else { 0 },
            }),
            Kind::Error => Control::Error {
                code: g.u16()?,
                message: g.str(MAX_MESSAGE)?,
            },
            Kind::Pages => {
                return Err(DecodeError::Invalid(
                    "Pages frame decoded as a control frame".into(),
                ))
            }
        };
        g.finish()?;
        Ok(c)
    }
}

/// A run count (1..=MAX_ZERO_RUNS) and that many runs.
fn get_run_list(g: &mut Get, what: &'static str) -> Result<Vec<Run>, DecodeError> {
    let n = g.u32()?;
    if n == 0 || n > MAX_ZERO_RUNS {
        return Err(DecodeError::TooLong {
            what,
            len: n as u64,
            max: MAX_ZERO_RUNS as u64,
        });
    }
    get_runs(g, n)
}

fn get_runs(g: &mut Get, n: u32) -> Result<Vec<Run>, DecodeError> {
    let mut runs = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let first = g.u64()?;
        let count = g.u32()?;
        if count == 0 {
            return Err(DecodeError::Invalid("empty page run".into()));
        }
        runs.push(Run { first, count });
    }
    Ok(runs)
}

/// Write the fixed part and the run list of a Pages frame into `buf`
/// (after [`begin_frame`]); the caller appends the data and calls
/// [`end_frame`].
pub fn put_pages_header(
    buf: &mut Vec<u8>,
    round: u32,
    region: u32,
    codec: WireCodec,
    raw_len: u32,
    raw_xxh3: u64,
    runs: &[Run],
) {
    let mut p = Put(buf);
    p.u32(round)
        .u32(region)
        .u8(codec as u8)
        .u8(0)
        .u8(0)
        .u8(0)
        .u32(raw_len)
        .u32(runs.len() as u32)
        .u64(raw_xxh3);
    put_runs(&mut p, runs);
}

/// Offset of the codec byte in a Pages payload (after round and region).
const PAGES_CODEC_AT: usize = 8;

/// What [`encode_pages`] put on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagesEncoded {
    pub codec: WireCodec,
    /// Bytes of page data in the frame (compressed, or raw).
    pub data_len: usize,
}

/// Append a whole Pages frame for the pages of `runs`, whose contents are
/// `raw`, back to back. `compress` appends the encoded data to the buffer
/// and names its codec, or returns `None` when the data does not shrink:
/// the frame then carries `raw` as it is.
pub fn encode_pages(
    buf: &mut Vec<u8>,
    round: u32,
    region: u32,
    runs: &[Run],
    raw: &[u8],
    compress: impl FnOnce(&[u8], &mut Vec<u8>) -> Option<WireCodec>,
) -> PagesEncoded {
    let start = begin_frame(buf, Kind::Pages);
    let raw_xxh3 = xxhash_rust::xxh3::xxh3_64(raw);
    put_pages_header(
        buf,
        round,
        region,
        WireCodec::Raw,
        raw.len() as u32,
        raw_xxh3,
        runs,
    );
    let data_at = buf.len();
    let codec = match compress(raw, buf) {
        Some(codec) => codec,
        None => {
            buf.truncate(data_at);
            buf.extend_from_slice(raw);
            WireCodec::Raw
        }
    };
    buf[start + HEADER_LEN + PAGES_CODEC_AT] = codec as u8;
    let data_len = buf.len() - data_at;
    end_frame(buf, start);
    PagesEncoded { codec, data_len }
}

/// Decode and check the fixed part of a Pages payload: codec known, run
/// count within [`MAX_BATCH_PAGES`], and the runs' page total times
/// `page_size` equal to `raw_len`. Region bounds are checked by the caller,
/// which knows the region table.
pub fn decode_pages_header(payload: &[u8], page_size: u32) -> Result<PagesHeader, DecodeError> {
    let mut g = Get::new(payload);
    let round = g.u32()?;
    let region = g.u32()?;
    let codec = WireCodec::from_u8(g.u8()?)?;
    if g.bytes(3)? != [0, 0, 0] {
        return Err(DecodeError::Invalid(
            "nonzero padding in Pages frame".into(),
        ));
    }
    let raw_len = g.u32()?;
    let n = g.u32()?;
    let raw_xxh3 = g.u64()?;
    if n == 0 || n > MAX_BATCH_PAGES {
        return Err(DecodeError::TooLong {
            what: "page run count",
            len: n as u64,
            max: MAX_BATCH_PAGES as u64,
        });
    }
    let runs = get_runs(&mut g, n)?;
    let pages: u64 = runs.iter().map(|r| r.count as u64).sum();
    if pages > MAX_BATCH_PAGES as u64 || pages * page_size as u64 != raw_len as u64 {
        return Err(DecodeError::Invalid(format!(
            "Pages frame: {pages} pages do not make {raw_len} bytes"
        )));
    }
    let data_offset = payload.len() - g.rest().len();
    if codec == WireCodec::Raw && payload.len() - data_offset != raw_len as usize {
        return Err(DecodeError::Invalid(
            "Pages frame: stored data length differs from raw length".into(),
        ));
    }
    Ok(PagesHeader {
        round,
        region,
        codec,
        raw_len,
        raw_xxh3,
        runs,
        data_offset,
    })
}

/// Why a frame could not be read from a stream.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The peer closed the connection between frames.
    #[error("connection closed by peer")]
    Closed,
    /// The peer closed the connection in the middle of a frame.
    #[error("connection closed in the middle of a frame (stream truncated)")]
    Truncated,
    /// A socket error.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The bytes are not a valid frame.
    #[error("{0}")]
    Decode(#[from] DecodeError),
}

/// Read one frame: its kind, and its payload into `payload` (resized).
/// The header is checked (magic, kind, flags, length cap) before the payload
/// is allocated, and the payload checksum before it is returned.
pub fn read_frame<R: Read>(r: &mut R, payload: &mut Vec<u8>) -> Result<Kind, ReadError> {
    let mut header = [0u8; HEADER_LEN];
    // The magic first: a short stream that is not procmig's (a TLS alert)
    // is named as such, not as a truncated frame.
    read_full(r, &mut header[..4], true)?;
    let magic = Get::new(&header[..4]).u32()?;
    if magic != MAGIC {
        return Err(DecodeError::BadMagic(magic).into());
    }
    read_full(r, &mut header[4..], false)?;
    let mut g = Get::new(&header);
    g.u32()?;
    let kind = Kind::from_u16(g.u16()?)?;
    let flags = g.u16()?;
    if flags != 0 {
        return Err(DecodeError::BadFlags(flags).into());
    }
    let len = g.u32()?;
    let check = g.u32()?;
    if len > kind.max_payload() {
        return Err(DecodeError::TooLong {
            what: "frame payload",
            len: len as u64,
            max: kind.max_payload() as u64,
        }
        .into());
    }
    payload.clear();
    payload.resize(len as usize, 0);
    read_full(r, payload, false)?;
    if xxhash_rust::xxh3::xxh3_64(payload) as u32 != check {
        return Err(DecodeError::BadChecksum.into());
    }
    Ok(kind)
}

fn read_full<R: Read>(r: &mut R, buf: &mut [u8], at_boundary: bool) -> Result<(), ReadError> {
    let mut done = 0;
    while done < buf.len() {
        match r.read(&mut buf[done..]) {
            Ok(0) if done == 0 && at_boundary => return Err(ReadError::Closed),
            Ok(0) => return Err(ReadError::Truncated),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Encode and write one control frame.
pub fn write_control<W: Write>(w: &mut W, c: &Control) -> io::Result<()> {
    let mut buf = Vec::new();
    c.encode(&mut buf);
    w.write_all(&buf)?;
    w.flush()
}

/// Read one frame that must be a control frame.
pub fn read_control<R: Read>(r: &mut R) -> Result<Control, ReadError> {
    let mut payload = Vec::new();
    let kind = read_frame(r, &mut payload)?;
    Ok(Control::decode(kind, &payload)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn encode_pages_names_its_codec() {
        let runs = [Run { first: 3, count: 2 }];
        let raw = vec![7u8; 2 * 4096];
        for (codec, out) in [(Some(WireCodec::Zstd), 10), (None, raw.len())] {
            let mut buf = Vec::new();
            let e = encode_pages(&mut buf, 4, 1, &runs, &raw, |_, b| {
                b.extend_from_slice(&[1; 10]);
                codec
            });
            assert_eq!(e.data_len, out);
            let mut payload = Vec::new();
            let kind = read_frame(&mut &buf[..], &mut payload).unwrap();
            assert_eq!(kind, Kind::Pages);
            let h = decode_pages_header(&payload, 4096).unwrap();
            assert_eq!(h.codec, codec.unwrap_or(WireCodec::Raw));
            assert_eq!((h.round, h.region, h.raw_len), (4, 1, raw.len() as u32));
            assert_eq!(h.raw_xxh3, xxhash_rust::xxh3::xxh3_64(&raw));
        }
    }

    fn roundtrip(c: Control) {
        let mut buf = Vec::new();
        c.encode(&mut buf);
        let back = read_control(&mut &buf[..]).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn control_frames_roundtrip() {
        roundtrip(Control::Hello(Hello {
            version: VERSION,
            min_version: MIN_VERSION,
            page_size: 4096,
            capabilities: CAPABILITIES,
            codec: WireCodec::Zstd as u8,
            level: -3,
            compress_threads: 8,
            pid: 1234,
            comm: "python3".into(),
        }));
        roundtrip(Control::Welcome(Welcome {
            version: 1,
            capabilities: CAP_ZSTD,
            decompress_threads: 2,
            channel_token: 0,
        }));
        roundtrip(Control::Regions(vec![
            RegionEntry {
                start: 0x1000,
                end: 0x5000,
                prot: PROT_R | PROT_W,
                name: "[heap]".into(),
            },
            RegionEntry {
                start: 0x7000,
                end: 0x8000,
                prot: PROT_R | PROT_W | PROT_SHARED,
                name: String::new(),
            },
        ]));
        roundtrip(Control::Zero {
            round: 3,
            region: 1,
            runs: vec![Run { first: 5, count: 7 }],
        });
        roundtrip(Control::RoundEnd(9));
        roundtrip(Control::RoundApplied(9));
        roundtrip(Control::Commit);
        roundtrip(Control::Applied);
        roundtrip(Control::End(Totals {
            rounds: 1,
            normal_pages: 10,
            zero_pages: 20,
            page_frames: 3,
            zero_frames: 4,
        }));
        roundtrip(Control::Ack(AckInfo {
            normal_pages: 1,
            zero_pages: 2,
            decompress_busy_ns: 3,
            commit_ns: 4,
            restored_pid: 0,
        }));
        roundtrip(Control::Ack(AckInfo {
            normal_pages: 1,
            zero_pages: 2,
            decompress_busy_ns: 3,
            commit_ns: 4,
            restored_pid: 4242,
        }));
        roundtrip(Control::State(b"{\"version\":1}".to_vec()));
        roundtrip(Control::Discard {
            region: 3,
            runs: vec![Run { first: 5, count: 2 }],
        });
        roundtrip(Control::PageRequest {
            addr: 0x7f00_0000_1000,
            pages: 8,
        });
        roundtrip(Control::PostcopyDone { pages: 99 });
        roundtrip(Control::Channel { token: 0xfeed });
        roundtrip(Control::Resume {
            token: 0xbeef,
            pid: 1234,
        });
        // Welcome: the token is there in version 4, absent before.
        for token in [0, 7] {
            roundtrip(Control::Welcome(Welcome {
                version: 4,
                capabilities: CAP_PREEMPT,
                decompress_threads: 2,
                channel_token: token,
            }));
        }
        roundtrip(Control::Error {
            code: error_code::FAILED,
            message: "disk full".into(),
        });
    }

    fn pages_frame(runs: &[Run], data: &[u8], raw_len: u32) -> Vec<u8> {
        let mut buf = Vec::new();
        let start = begin_frame(&mut buf, Kind::Pages);
        put_pages_header(&mut buf, 0, 2, WireCodec::Raw, raw_len, 77, runs);
        buf.extend_from_slice(data);
        end_frame(&mut buf, start);
        buf
    }

    #[test]
    fn pages_header_roundtrip_and_checks() {
        let runs = [Run { first: 0, count: 1 }, Run { first: 9, count: 1 }];
        let data = vec![7u8; 8192];
        let buf = pages_frame(&runs, &data, 8192);
        let mut payload = Vec::new();
        assert_eq!(
            read_frame(&mut &buf[..], &mut payload).unwrap(),
            Kind::Pages
        );
        let h = decode_pages_header(&payload, 4096).unwrap();
        assert_eq!(h.runs, runs);
        assert_eq!(h.region, 2);
        assert_eq!(&payload[h.data_offset..], &data[..]);

        // raw_len that does not match the runs
        let buf = pages_frame(&runs, &data[..4096], 4096);
        read_frame(&mut &buf[..], &mut payload).unwrap();
        assert!(decode_pages_header(&payload, 4096).is_err());
    }

    #[test]
    fn header_errors() {
        let mut buf = Vec::new();
        Control::RoundEnd(1).encode(&mut buf);
        let mut payload = Vec::new();

        let mut bad = buf.clone();
        bad[0] ^= 1;
        assert!(matches!(
            read_frame(&mut &bad[..], &mut payload),
            Err(ReadError::Decode(DecodeError::BadMagic(_)))
        ));
        let mut bad = buf.clone();
        bad[HEADER_LEN] ^= 1;
        assert!(matches!(
            read_frame(&mut &bad[..], &mut payload),
            Err(ReadError::Decode(DecodeError::BadChecksum))
        ));
        let mut bad = buf.clone();
        bad[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            read_frame(&mut &bad[..], &mut payload),
            Err(ReadError::Decode(DecodeError::TooLong { .. }))
        ));
        assert!(matches!(
            read_frame(&mut &buf[..buf.len() - 1], &mut payload),
            Err(ReadError::Truncated)
        ));
        assert!(matches!(
            read_frame(&mut &buf[..0], &mut payload),
            Err(ReadError::Closed)
        ));
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut payload = Vec::new();
            let _ = read_frame(&mut &bytes[..], &mut payload);
            for k in 1..=10u16 {
                let kind = Kind::from_u16(k).unwrap();
                let _ = Control::decode(kind, &bytes);
            }
            let _ = decode_pages_header(&bytes, 4096);
        }

        #[test]
        fn valid_header_random_payload_never_panics(
            kind in 1u16..=10,
            payload in proptest::collection::vec(any::<u8>(), 0..512),
        ) {
            let mut buf = Vec::new();
            let start = begin_frame(&mut buf, Kind::from_u16(kind).unwrap());
            buf.extend_from_slice(&payload);
            end_frame(&mut buf, start);
            let mut out = Vec::new();
            let k = read_frame(&mut &buf[..], &mut out).unwrap();
            if k == Kind::Pages {
                let _ = decode_pages_header(&out, 4096);
            } else {
                let _ = Control::decode(k, &out);
            }
        }

        #[test]
        fn truncations_are_errors(cut in 0usize..64) {
            let mut buf = Vec::new();
            Control::Regions(vec![RegionEntry { start: 0, end: 4096, prot: 3, name: "x".into() }]).encode(&mut buf);
            let cut = cut.min(buf.len() - 1);
            let mut out = Vec::new();
            prop_assert!(read_frame(&mut &buf[..cut], &mut out).is_err());
        }
    }
}
