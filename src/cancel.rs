//! Turning SIGINT/SIGTERM into a clean stop: a flag the pipelines poll, and
//! a watcher that shuts a socket down so blocked reads and writes return.

use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

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

/// While alive, shuts `sock` down as soon as `cancel` is set.
pub struct ShutdownOnCancel {
    done: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl ShutdownOnCancel {
    pub fn new(cancel: Arc<AtomicBool>, sock: &TcpStream) -> ShutdownOnCancel {
        let done = Arc::new(AtomicBool::new(false));
        let handle = sock.try_clone().ok().map(|sock| {
            let done = done.clone();
            std::thread::spawn(move || {
                while !done.load(Ordering::Relaxed) {
                    if cancel.load(Ordering::Relaxed) {
                        let _ = sock.shutdown(Shutdown::Both);
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        });
        ShutdownOnCancel { done, handle }
    }
}

impl Drop for ShutdownOnCancel {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
