//! The registry's errors, each of one [`ErrorKind`].

use crate::error::{ErrorKind, ServiceError};

/// What went wrong, in words a caller can act on. Each variant is one
/// kind; internal causes are logged where they happen, never sent.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// A request field is missing or malformed; the message names it.
    #[error("{field}: {reason}")]
    InvalidArgument { field: String, reason: String },
    #[error("{0}")]
    NotFound(String),
    /// A configured limit is reached.
    #[error("{0}")]
    ResourceExhausted(String),
    /// The request is valid but the state does not allow it.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The registry cannot do it now (storage failing, shutting down).
    #[error("{0}")]
    Unavailable(String),
}

impl Error {
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

impl ServiceError for Error {
    fn kind(&self) -> ErrorKind {
        match self {
            Error::InvalidArgument { .. } => ErrorKind::InvalidArgument,
            Error::NotFound(_) => ErrorKind::NotFound,
            Error::ResourceExhausted(_) => ErrorKind::ResourceExhausted,
            Error::FailedPrecondition(_) => ErrorKind::FailedPrecondition,
            Error::Unavailable(_) => ErrorKind::Unavailable,
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        crate::error::grpc_status(&err)
    }
}
