//! The frame decoder on its own: the input is a kind (2 bytes) and a
//! payload, decoded as that kind with no checksum in the way; then the
//! same bytes as a raw stream through `read_frame`. Whatever decodes must
//! encode back to the same frame, and a Pages batch must decompress
//! within its declared size or fail cleanly.
#![no_main]

use libfuzzer_sys::fuzz_target;
use procmig::codec::Decompressor;
use procmig::protocol::{self, Control, Kind};

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let (k, payload) = data.split_at(2);
    if let Ok(kind) = Kind::from_u16(u16::from_le_bytes([k[0], k[1]])) {
        decode(kind, payload);
    }
    // The same bytes as a stream: read frames until the first error.
    let mut r = data;
    let mut buf = Vec::new();
    for _ in 0..16 {
        match protocol::read_frame(&mut r, &mut buf) {
            Ok(kind) => decode(kind, &buf),
            Err(_) => break,
        }
    }
});

fn decode(kind: Kind, payload: &[u8]) {
    if kind == Kind::Pages {
        let Ok(h) = protocol::decode_pages_header(payload, 4096) else {
            return;
        };
        // The header bounds the output: at most MAX_BATCH_PAGES pages.
        assert!(h.raw_len as usize <= protocol::MAX_BATCH_PAGES as usize * 4096);
        let mut out = vec![0u8; h.raw_len as usize];
        let mut d = Decompressor::new().unwrap();
        let _ = d.decompress(h.codec, &payload[h.data_offset..], &mut out);
        return;
    }
    let Ok(c) = Control::decode(kind, payload) else {
        return;
    };
    // Round trip: what decodes encodes to a frame that decodes the same.
    let mut buf = Vec::new();
    c.encode(&mut buf);
    let mut r = &buf[..];
    let mut back = Vec::new();
    let k = protocol::read_frame(&mut r, &mut back).expect("an encoded frame reads back");
    assert_eq!(k, kind);
    assert_eq!(Control::decode(k, &back).expect("and decodes"), c);
}
