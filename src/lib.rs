//! procmig: live-migrate the memory of a running Linux process.

pub mod cancel;
pub mod choice;
pub mod codec;
pub mod control;
pub mod dest;
pub mod dirty;
pub mod image;
pub mod pages;
pub mod process;
pub mod progress;
pub mod protocol;
pub mod restore;
pub mod source;
pub mod stats;
pub mod units;
pub mod userfault;
pub mod verify;
