//! The registry's errors, and their one mapping to a gRPC status.

/// What went wrong, in words a caller can act on. Each variant is one
/// gRPC code; internal causes are logged where they happen, never sent.
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

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        let code = match err {
            Error::InvalidArgument { .. } => tonic::Code::InvalidArgument,
            Error::NotFound(_) => tonic::Code::NotFound,
            Error::ResourceExhausted(_) => tonic::Code::ResourceExhausted,
            Error::FailedPrecondition(_) => tonic::Code::FailedPrecondition,
            Error::Unavailable(_) => tonic::Code::Unavailable,
        };
        tonic::Status::new(code, err.to_string())
    }
}
