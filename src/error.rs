//! Errors that decide dagrun's exit code. Everything else is an `anyhow`
//! error (exit 1). Messages never contain key bytes or plaintext PII.

/// Exit codes (documented in the README; scripts and cron rely on them).
pub mod exit {
    /// Everything asked for is done and up to date.
    pub const OK: i32 = 0;
    /// A stage failed (or a command failed at run time).
    pub const FAILED: i32 = 1;
    /// Bad command line, pipeline file, tenant config or input: nothing ran.
    pub const CONFIG: i32 = 2;
    /// `dagrun verify` found corrupted or missing artifacts, or `dagrun pull`
    /// refused data the remote holds.
    pub const INTEGRITY: i32 = 4;
    /// Another dagrun run holds the workspace lock, or Slurm did not answer
    /// about an earlier run's jobs (EX_TEMPFAIL: nothing ran, try again).
    pub const LOCKED: i32 = 75;
    /// Interrupted by SIGINT/SIGTERM/SIGHUP.
    pub const INTERRUPTED: i32 = 130;
}

/// An error with a definite exit code.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// Bad pipeline, config, arguments or input data (exit 2).
    #[error("{0}")]
    Config(String),
    /// Workspace locked by another run (exit 75).
    #[error("{0}")]
    Locked(String),
    /// One or more stages failed (exit 1).
    #[error("{0}")]
    Stages(String),
    /// Integrity check failed (exit 4).
    #[error("{0}")]
    Integrity(String),
    /// Interrupted (exit 130); what follows the word (a run's tally).
    #[error("interrupted{0}")]
    Interrupted(String),
}

impl Failure {
    pub fn exit_code(&self) -> i32 {
        match self {
            Failure::Config(_) => exit::CONFIG,
            Failure::Locked(_) => exit::LOCKED,
            Failure::Stages(_) => exit::FAILED,
            Failure::Integrity(_) => exit::INTEGRITY,
            Failure::Interrupted(_) => exit::INTERRUPTED,
        }
    }
}

/// Shorthand: a configuration error as an `anyhow::Error`.
pub fn config(msg: impl Into<String>) -> anyhow::Error {
    Failure::Config(msg.into()).into()
}

/// The exit code for any error: a [`Failure`] anywhere in the chain decides it.
pub fn exit_code_of(err: &anyhow::Error) -> i32 {
    for cause in err.chain() {
        if let Some(f) = cause.downcast_ref::<Failure>() {
            return f.exit_code();
        }
    }
    exit::FAILED
}
