//! The shop services' errors, each of one [`ErrorKind`].

use sea_orm::DbErr;

use crate::error::{ErrorKind, ServiceError};

/// What went wrong, in words a caller can act on. Each variant is one
/// kind; internal causes are logged where they happen, never sent.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// A request field is missing or malformed; the message names it.
    #[error("{field}: {reason}")]
    InvalidArgument { field: String, reason: String },
    /// An unknown user, product or order; the message says which.
    #[error("{0}")]
    NotFound(String),
    /// Valid, but the state refuses it (not enough stock, a request id
    /// used for something else).
    #[error("{0}")]
    FailedPrecondition(String),
    /// The same request is being handled by another call; retry shortly.
    #[error("{0}")]
    Aborted(String),
    #[error("{0}")]
    ResourceExhausted(String),
    /// A dependency (a service, the database) cannot answer now; retrying
    /// later may succeed.
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

    /// A storage failure: logged with its cause, answered as UNAVAILABLE
    /// with what could not be done.
    pub fn storage(doing: &str, err: DbErr) -> Self {
        tracing::warn!(error = %err, "database error while {doing}");
        Error::Unavailable(format!(
            "the database is unavailable ({doing}); retry later"
        ))
    }
}

impl ServiceError for Error {
    fn kind(&self) -> ErrorKind {
        match self {
            Error::InvalidArgument { .. } => ErrorKind::InvalidArgument,
            Error::NotFound(_) => ErrorKind::NotFound,
            Error::FailedPrecondition(_) => ErrorKind::FailedPrecondition,
            Error::Aborted(_) => ErrorKind::Aborted,
            Error::ResourceExhausted(_) => ErrorKind::ResourceExhausted,
            Error::Unavailable(_) => ErrorKind::Unavailable,
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        crate::error::grpc_status(&err)
    }
}
