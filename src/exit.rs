//! Leaving the process without waiting for threads stuck in the dynamic loader.
//!
//! `exit` (what returning from `main` calls) runs the loader's destructors, and glibc's
//! `_dl_fini` takes the loader lock first. A `dlopen` stuck reading its library from a mount
//! that stopped answering (`inventory.nvml_library` there) holds that lock for ever, so `exit`
//! would wait for ever after SIGTERM. The agent registers no `atexit` work of its own: it
//! flushes stdout and leaves with `_exit`, which ends every thread at once.

// unsafe: `_exit` has no safe wrapper in std (`std::process::exit` is `exit`).
#![allow(unsafe_code)]

use std::io::Write;

/// Flushes stdout and ends the process with `code`.
pub fn now(code: u8) -> ! {
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // SAFETY: `_exit` has no preconditions; it never returns, and nothing in this process
    // depends on destructors or `atexit` handlers running.
    unsafe { libc::_exit(i32::from(code)) }
}
