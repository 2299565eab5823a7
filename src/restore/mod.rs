//! Restore: the destination recreates the migrated process from its memory
//! (the image) and its state (registers, mappings, descriptors, ...), and
//! it carries on.
//!
//! - [`capture`] reads the state from the stopped source during the final
//!   stop; [`check`] says up front whether a process can be restored.
//! - [`restore`] rebuilds it in a child of this process and leaves it
//!   stopped; [`Restored::start`] lets it run (after the handover).

mod build;
mod capture;
mod check;
mod child;
mod descriptors;
mod fds;
mod memory;
mod shell;
pub mod state;
mod sys;

pub use build::{clear_parent_death_signal, restore, Memory, RestoreOptions, Restored};
pub use capture::capture;
pub use check::{check, privileges};
pub use shell::{wants as shell_wants, Mirror, Shell};
pub use state::{ProcessState, STATE_NAME};

/// Restore from an image directory holding `state.json`; with `check`,
/// only once every region matches the digest its manifest recorded (an
/// image damaged on disk would otherwise run with wrong memory). Returns
/// the process and how long the check took.
pub fn restore_image(
    dir: &std::path::Path,
    opts: &RestoreOptions,
    check: bool,
) -> Result<(Restored, std::time::Duration), String> {
    privileges()?;
    let image = crate::image::Image::open(dir).map_err(|e| e.to_string())?;
    let path = dir.join(STATE_NAME);
    let bytes = std::fs::read(&path).map_err(|e| {
        format!(
            "{}: {e} (images from procmig before protocol version 3 hold no process state)",
            path.display()
        )
    })?;
    let st = ProcessState::from_bytes(&bytes)?;
    let t = std::time::Instant::now();
    if check {
        check_digests(&image)?;
    }
    let checked = t.elapsed();
    let files: Vec<(u64, u64, std::fs::File)> = image
        .manifest
        .regions
        .iter()
        .map(|r| {
            std::fs::File::open(dir.join(&r.file))
                .map(|f| (r.start, r.end, f))
                .map_err(|e| format!("{}: {e}", r.file))
        })
        .collect::<Result<_, _>>()?;
    let mem = Memory {
        regions: files.iter().map(|(s, e, f)| (*s, *e, f)).collect(),
    };
    Ok((restore(&st, &mem, opts, None, None)?, checked))
}

/// Every region against its manifest digest, or one line naming those
/// that differ.
fn check_digests(image: &crate::image::Image) -> Result<(), String> {
    let bad = image.check_digests().map_err(|e| e.to_string())?;
    if bad.is_empty() {
        return Ok(());
    }
    let regions = &image.manifest.regions;
    let named: Vec<String> = bad
        .iter()
        .take(4)
        .map(|&i| {
            let r = &regions[i];
            format!("{} ({:#x}-{:#x})", r.file, r.start, r.end)
        })
        .collect();
    let more = match bad.len() - named.len() {
        0 => String::new(),
        n => format!(" and {n} more"),
    };
    Err(format!(
        "the image is damaged: {} of {} regions do not match the digests its manifest recorded: {}{more}; nothing was run (--no-verify runs it anyway)",
        bad.len(),
        regions.len(),
        named.join(", "),
    ))
}
