//! The CLI's one error type. Each variant is one line for a person (printed as
//! `agent-bus: error: ...`) and one exit code of [`crate::exit`].

use crate::exit;

pub(crate) type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    /// A flag, argument or task file the user wrote is wrong.
    #[error("{0}")]
    Usage(String),
    #[error("config file {path}: {detail}")]
    Config { path: String, detail: String },
    #[error("cannot reach the dispatcher at {server}: {detail}")]
    Unreachable { server: String, detail: String },
    #[error("the dispatcher at {server} refused the token ({detail})")]
    TokenRefused { server: String, detail: String },
    #[error("no such task: {id}")]
    NoSuchTask { id: String },
    /// Any other 4xx: the API's own message, which names the field when one is to blame.
    #[error("{message}")]
    Refused { message: String },
    #[error("the dispatcher at {server} failed: {detail}")]
    Server { server: String, detail: String },
    /// An answer the client does not understand.
    #[error("unexpected answer from {server}: {detail}")]
    Protocol { server: String, detail: String },
    /// Standard output was closed: no message.
    #[error("standard output closed")]
    BrokenPipe,
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

impl Error {
    pub(crate) fn usage(message: impl Into<String>) -> Self {
        Self::Usage(message.into())
    }

    pub(crate) fn exit_code(&self) -> u8 {
        match self {
            Self::Usage(_) | Self::Io { .. } => exit::USAGE,
            Self::Config { .. } => exit::CONFIG,
            Self::Unreachable { .. } => exit::UNREACHABLE,
            Self::TokenRefused { .. } => exit::TOKEN_REFUSED,
            Self::NoSuchTask { .. } | Self::Refused { .. } => exit::REFUSED,
            Self::Server { .. } | Self::Protocol { .. } => exit::SERVER_ERROR,
            Self::BrokenPipe => exit::BROKEN_PIPE,
        }
    }

    /// Whether waiting on a task should try again later instead of giving up: the
    /// dispatcher is restarting or a proxy lost it for a moment.
    pub(crate) fn is_transient(&self) -> bool {
        matches!(self, Self::Unreachable { .. } | Self::Server { .. })
    }
}

/// Writes to standard output, turning a closed pipe into [`Error::BrokenPipe`] instead
/// of the panic `println!` would give.
pub(crate) fn write_out(text: &str) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                Error::BrokenPipe
            } else {
                Error::Io {
                    what: "writing to standard output".into(),
                    source: e,
                }
            }
        })
}

/// Writes to standard error; a closed standard error is ignored (nothing to tell).
pub(crate) fn write_err(text: &str) {
    use std::io::Write;
    let mut err = std::io::stderr().lock();
    let _ = err.write_all(text.as_bytes()).and_then(|()| err.flush());
}
