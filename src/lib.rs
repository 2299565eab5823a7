//! procmig: live-migrate the memory of a running Linux process.

pub mod image;
pub mod codec;
pub mod protocol;
pub mod units;
pub mod target;
pub mod progress;
pub mod source;
pub mod stats;
pub mod dest;
pub mod verify;
pub mod cancel;
