//! Compression methods, with one reusable context per worker thread.
//!
//! A batch is compressed into the spare room of an output buffer no larger
//! than the input; if the result would not be smaller, the caller sends the
//! batch raw ([`WireCodec::Raw`]). That keeps incompressible data at
//! memcpy cost and bounds every frame by its raw size.

use crate::protocol::{WireCodec, CAP_LZ4, CAP_ZLIB, CAP_ZSTD};

/// A compression method as the user names it (`--compress`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// Pages as they are.
    None,
    /// zlib (deflate), levels 0-9.
    Zlib,
    /// zstd, levels 1-19.
    Zstd,
    /// lz4, no levels.
    Lz4,
    /// Method and level picked per batch from the measured link and data.
    Auto,
}

impl Compression {
    /// The level used when none is given: QEMU's multifd defaults (1).
    pub fn default_level(self) -> i32 {
        match self {
            Compression::None | Compression::Lz4 | Compression::Auto => 0,
            Compression::Zlib | Compression::Zstd => 1,
        }
    }

    /// Check a `--compress-level` for this method.
    pub fn check_level(self, level: i32) -> Result<(), String> {
        let (lo, hi) = match self {
            Compression::Zlib => (0, 9),
            Compression::Zstd => (1, 19),
            Compression::None | Compression::Lz4 | Compression::Auto => {
                return if level == 0 {
                    Ok(())
                } else {
                    Err(format!("--compress-level does not apply to {self}"))
                }
            }
        };
        if (lo..=hi).contains(&level) {
            Ok(())
        } else {
            Err(format!(
                "--compress-level {level} is out of range for {self} ({lo}..={hi})"
            ))
        }
    }

    pub fn wire(self) -> WireCodec {
        match self {
            Compression::None => WireCodec::Raw,
            Compression::Zlib => WireCodec::Zlib,
            Compression::Zstd => WireCodec::Zstd,
            Compression::Lz4 => WireCodec::Lz4,
            // Nominal: each frame names its own codec.
            Compression::Auto => WireCodec::Zstd,
        }
    }

    /// Capability bit a receiver must offer to decode this method.
    pub fn capability(self) -> u64 {
        match self {
            Compression::None => 0,
            Compression::Zlib => CAP_ZLIB,
            Compression::Zstd => CAP_ZSTD,
            Compression::Lz4 => CAP_LZ4,
            Compression::Auto => CAP_ZSTD | CAP_LZ4,
        }
    }
}

crate::value_enum_text!(Compression, "compression method");

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The compressor library refused to start.
    #[error("cannot create {method} context at level {level}: {reason}")]
    Init {
        method: Compression,
        level: i32,
        reason: String,
    },
    /// Data did not decompress to the expected size.
    #[error("{codec:?} data is corrupt: {reason}")]
    Corrupt { codec: WireCodec, reason: String },
}

/// A per-worker compression context.
pub struct Compressor {
    inner: Inner,
}

enum Inner {
    None,
    Zlib(flate2::Compress),
    Zstd(Box<zstd::bulk::Compressor<'static>>),
    Lz4,
}

impl Compressor {
    pub fn new(method: Compression, level: i32) -> Result<Compressor, CodecError> {
        let init = |reason: String| CodecError::Init {
            method,
            level,
            reason,
        };
        let inner = match method {
            Compression::None | Compression::Auto => Inner::None,
            Compression::Zlib => Inner::Zlib(flate2::Compress::new(
                flate2::Compression::new(level as u32),
                true,
            )),
            Compression::Zstd => Inner::Zstd(Box::new(
                zstd::bulk::Compressor::new(level).map_err(|e| init(e.to_string()))?,
            )),
            Compression::Lz4 => Inner::Lz4,
        };
        Ok(Compressor { inner })
    }

    /// Compress `input`, appending to `out`. Returns the codec written, or
    /// `None` (nothing appended) if the data would not shrink.
    pub fn compress(&mut self, input: &[u8], out: &mut Vec<u8>) -> Option<WireCodec> {
        let start = out.len();
        // Room for strictly less than the input: a result that does not fit
        // is one that did not shrink.
        let room = input.len().saturating_sub(1);
        out.reserve(room);
        let codec = match &mut self.inner {
            Inner::None => return None,
            Inner::Zlib(c) => {
                c.reset();
                if !compress_zlib(c, input, out, start + room) {
                    out.truncate(start);
                    return None;
                }
                WireCodec::Zlib
            }
            Inner::Zstd(c) => {
                let mut window = Limited {
                    v: out,
                    start,
                    limit: start + room,
                };
                match c.compress_to_buffer(input, &mut window) {
                    Ok(_) => WireCodec::Zstd,
                    Err(_) => {
                        out.truncate(start);
                        return None;
                    }
                }
            }
            Inner::Lz4 => {
                // lz4_flex wants room for the worst case up front.
                out.resize(
                    start + lz4_flex::block::get_maximum_output_size(input.len()),
                    0,
                );
                match lz4_flex::block::compress_into(input, &mut out[start..]) {
                    Ok(n) if n <= room => {
                        out.truncate(start + n);
                        WireCodec::Lz4
                    }
                    _ => {
                        out.truncate(start);
                        return None;
                    }
                }
            }
        };
        Some(codec)
    }
}

/// zlib into `out` up to `limit` total bytes; false if it did not fit.
fn compress_zlib(c: &mut flate2::Compress, input: &[u8], out: &mut Vec<u8>, limit: usize) -> bool {
    let start = out.len();
    out.resize(limit, 0);
    let before_out = c.total_out();
    let status = c.compress(input, &mut out[start..], flate2::FlushCompress::Finish);
    let written = (c.total_out() - before_out) as usize;
    out.truncate(start + written);
    matches!(status, Ok(flate2::Status::StreamEnd))
}

/// The spare room of a `Vec` from `start` up to `limit`, seen by zstd as
/// an empty output buffer.
struct Limited<'a> {
    v: &'a mut Vec<u8>,
    start: usize,
    limit: usize,
}

// SAFETY: as_mut_ptr/capacity describe the room between `start` (the
// vector's length) and `limit`, which `reserve` made sure is allocated;
// filled_until only ever receives a length zstd wrote, which is at most
// capacity().
unsafe impl zstd::stream::raw::WriteBuf for Limited<'_> {
    fn as_slice(&self) -> &[u8] {
        &self.v[self.start..]
    }
    fn capacity(&self) -> usize {
        self.limit.min(self.v.capacity()) - self.start
    }
    fn as_mut_ptr(&mut self) -> *mut u8 {
        // SAFETY: start == len <= capacity, so the pointer stays within (or
        // one past) the allocation.
        unsafe { self.v.as_mut_ptr().add(self.start) }
    }
    unsafe fn filled_until(&mut self, n: usize) {
        // SAFETY: zstd initialised n <= capacity() bytes after start, all
        // within the vector's allocation.
        unsafe { self.v.set_len(self.start + n) }
    }
}

/// A per-worker decompression context.
pub struct Decompressor {
    zlib: flate2::Decompress,
    zstd: zstd::bulk::Decompressor<'static>,
}

impl Decompressor {
    pub fn new() -> Result<Decompressor, CodecError> {
        Ok(Decompressor {
            zlib: flate2::Decompress::new(true),
            zstd: zstd::bulk::Decompressor::new().map_err(|e| CodecError::Init {
                method: Compression::Zstd,
                level: 0,
                reason: e.to_string(),
            })?,
        })
    }

    /// Decompress `input` of `codec` into `out`, which must come out exactly
    /// `out.len()` bytes long.
    pub fn decompress(
        &mut self,
        codec: WireCodec,
        input: &[u8],
        out: &mut [u8],
    ) -> Result<(), CodecError> {
        let corrupt = |reason: String| CodecError::Corrupt { codec, reason };
        let n = match codec {
            WireCodec::Raw => {
                if input.len() != out.len() {
                    return Err(corrupt(format!(
                        "stored {} bytes, expected {}",
                        input.len(),
                        out.len()
                    )));
                }
                out.copy_from_slice(input);
                input.len()
            }
            WireCodec::Zlib => {
                self.zlib.reset(true);
                let status = self
                    .zlib
                    .decompress(input, out, flate2::FlushDecompress::Finish)
                    .map_err(|e| corrupt(e.to_string()))?;
                if status != flate2::Status::StreamEnd
                    || self.zlib.total_in() as usize != input.len()
                {
                    return Err(corrupt("stream does not end where the frame does".into()));
                }
                self.zlib.total_out() as usize
            }
            WireCodec::Zstd => self
                .zstd
                .decompress_to_buffer(input, out)
                .map_err(|e| corrupt(e.to_string()))?,
            WireCodec::Lz4 => {
                lz4_flex::block::decompress_into(input, out).map_err(|e| corrupt(e.to_string()))?
            }
        };
        if n != out.len() {
            return Err(corrupt(format!("{n} bytes, expected {}", out.len())));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let mut v = Vec::new();
        let mut i = 0u32;
        while v.len() < 64 * 4096 {
            v.extend_from_slice(format!("id={i:08} name=user{} ok\n", i % 97).as_bytes());
            i += 1;
        }
        v.truncate(64 * 4096);
        v
    }

    fn noise(n: usize) -> Vec<u8> {
        let mut x = 0x9e3779b97f4a7c15u64;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn roundtrip_every_method() {
        let data = sample();
        let mut d = Decompressor::new().unwrap();
        for (m, level) in [
            (Compression::Zlib, 1),
            (Compression::Zlib, 9),
            (Compression::Zstd, 1),
            (Compression::Zstd, 19),
            (Compression::Lz4, 0),
        ] {
            let mut c = Compressor::new(m, level).unwrap();
            // Twice, to exercise context reuse; with a prefix in `out`.
            for _ in 0..2 {
                let mut out = vec![1, 2, 3];
                let codec = c
                    .compress(&data, &mut out)
                    .unwrap_or_else(|| panic!("{m} {level} did not shrink"));
                assert_eq!(codec, m.wire());
                assert_eq!(&out[..3], &[1, 2, 3]);
                assert!(out.len() - 3 < data.len() / 2, "{m} ratio");
                let mut back = vec![0u8; data.len()];
                d.decompress(codec, &out[3..], &mut back).unwrap();
                assert_eq!(back, data, "{m} level {level}");
            }
        }
    }

    #[test]
    fn incompressible_is_refused() {
        let data = noise(64 * 4096);
        for m in [
            Compression::Zlib,
            Compression::Zstd,
            Compression::Lz4,
            Compression::None,
        ] {
            let mut c = Compressor::new(m, m.default_level()).unwrap();
            let mut out = Vec::new();
            assert_eq!(c.compress(&data, &mut out), None, "{m}");
            assert!(out.is_empty());
        }
        // zlib level 0 stores, which never shrinks.
        let mut c = Compressor::new(Compression::Zlib, 0).unwrap();
        assert_eq!(c.compress(&sample(), &mut Vec::new()), None);
    }

    #[test]
    fn corrupt_input_is_an_error_not_a_panic() {
        let data = sample();
        let mut d = Decompressor::new().unwrap();
        for m in [Compression::Zlib, Compression::Zstd, Compression::Lz4] {
            let mut c = Compressor::new(m, m.default_level()).unwrap();
            let mut out = Vec::new();
            let codec = c.compress(&data, &mut out).unwrap();
            let mut back = vec![0u8; data.len()];
            // Truncated, garbage, and wrong expected size.
            assert!(d
                .decompress(codec, &out[..out.len() / 2], &mut back)
                .is_err());
            assert!(d.decompress(codec, &noise(300), &mut back).is_err());
            let mut short = vec![0u8; data.len() - 4096];
            assert!(d.decompress(codec, &out, &mut short).is_err());
        }
    }

    #[test]
    fn levels() {
        assert!(Compression::Zlib.check_level(0).is_ok());
        assert!(Compression::Zlib.check_level(10).is_err());
        assert!(Compression::Zstd.check_level(0).is_err());
        assert!(Compression::Zstd.check_level(19).is_ok());
        assert!(Compression::Lz4.check_level(3).is_err());
        assert_eq!("zstd".parse::<Compression>().unwrap(), Compression::Zstd);
        assert!("gzip".parse::<Compression>().is_err());
    }
}
