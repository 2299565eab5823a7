//! Turning SIGINT/SIGTERM into a clean stop: a flag the migrations poll
//! (and that `transport::CloseOnCancel` watches to close connections, so
//! blocked reads and writes return).

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// Set the returned flag on SIGINT and SIGTERM instead of dying, so that
/// the source process is resumed and the staging image removed. A second
/// signal ends procmig at once (the kernel then detaches ptrace itself).
pub fn install_signal_flag() -> std::io::Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(sig, 130, flag.clone())?;
        signal_hook::flag::register(sig, flag.clone())?;
    }
    Ok(flag)
}
