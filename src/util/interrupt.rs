//! Interrupts of commands that write one file for a while (`predict
//! --output`, `sample --out`): SIGINT, SIGTERM and SIGHUP set a flag instead
//! of ending the process at once, the writer stops at its next batch
//! ([`check`]), its temporary file is removed as the error unwinds (nothing
//! half-written, no plaintext left behind) and dagrun exits 130.
//!
//! Rules: the handler only stores to an atomic, or — on a second signal, for
//! a writer that is stuck — restores the default action and raises the signal
//! again (both async-signal-safe). A signal the process was started with
//! ignored (`nohup`) stays ignored. `run` and `serve` have their own handling
//! (`engine::scheduler`, `commands::serve`).

use std::sync::atomic::{AtomicBool, Ordering};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(sig: libc::c_int) {
    if INTERRUPTED.swap(true, Ordering::SeqCst) {
        // SAFETY: signal() and raise() are async-signal-safe; SIG_DFL is a valid disposition.
        unsafe {
            libc::signal(sig, libc::SIG_DFL);
            libc::raise(sig);
        }
    }
}

/// From now on, SIGINT, SIGTERM and SIGHUP interrupt at the next [`check`].
pub fn catch() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: sigaction with zeroed structs plus a handler that only
        // touches an atomic (or re-raises); the old disposition is read first.
        unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(sig, std::ptr::null(), &mut old) != 0 || old.sa_sigaction == libc::SIG_IGN {
                continue;
            }
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            act.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut act.sa_mask);
            libc::sigaction(sig, &act, std::ptr::null_mut());
        }
    }
}

/// `Err(Interrupted)` (exit 130) once a caught signal arrived.
pub fn check() -> anyhow::Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) { Err(crate::error::Failure::Interrupted(String::new()).into()) } else { Ok(()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_caught_signal_is_an_interrupt_at_the_next_check() {
        assert!(check().is_ok());
        on_signal(libc::SIGINT);
        let e = check().unwrap_err();
        assert_eq!(crate::error::exit_code_of(&e), crate::error::exit::INTERRUPTED);
        INTERRUPTED.store(false, Ordering::SeqCst);
    }
}
