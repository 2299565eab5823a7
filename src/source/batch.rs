//! What flows through the sending pipeline: a [`Batch`] of pages read from
//! the process, the [`Job`] a compression worker takes, the [`Encoded`]
//! frames it hands on, and the [`Out`] messages the writer puts on the
//! wire in order. Kept apart so that the workers and the writer depend on
//! these types, not on each other.

use crate::pages::Run;
use crate::protocol::Control;

/// Where a batch of pages belongs: its round and region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batch {
    pub round: u32,
    /// Index in the region table the receiver holds.
    pub region: u32,
}

/// A batch of populated pages of one region, read back to back into `data`.
pub struct Job {
    pub batch: Batch,
    pub runs: Vec<Run>,
    pub data: Vec<u8>,
}

/// What a batch turned into.
#[derive(Debug, Default, Clone, Copy)]
pub struct JobTotals {
    pub normal_pages: u64,
    pub zero_pages: u64,
    pub page_frames: u64,
    pub zero_frames: u64,
}

/// Encoded frames of one job, for the writer.
pub struct Encoded {
    pub bytes: Vec<u8>,
    pub totals: JobTotals,
    /// Pages moved (normal + zero), in bytes.
    pub raw_bytes: u64,
    /// With `--compress auto`: the candidate used.
    pub candidate: Option<usize>,
}

/// Messages for the writer.
pub enum Out {
    /// A worker's frames for one job.
    Frames(Encoded),
    /// A control frame, written once `after_jobs` jobs have been written.
    Control { after_jobs: u64, frame: Control },
    /// The End frame, with totals the writer counted, after `after_jobs` jobs.
    End { after_jobs: u64, rounds: u32 },
}
