//! The one error type a caller is answered with, and its one mapping to a
//! gRPC code. The registry and the shop services both speak it; a second
//! front (an HTTP API) maps the same variants in one more place and
//! nowhere else.

/// What went wrong, in words a caller can act on. Each variant is the
/// choice the caller has to make (fix the request, look elsewhere, retry)
/// and no more: internal causes are logged where they happen, never sent.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// A request field is missing or malformed; the message names it.
    /// Sending it again will not help.
    #[error("{field}: {reason}")]
    InvalidArgument {
        /// The request field at fault, as the caller's API spells it.
        field: String,
        /// What is wrong with it, quoting the value where that helps.
        reason: String,
    },
    /// An unknown service, instance, lease, user, product or order; the
    /// message says which.
    #[error("{0}")]
    NotFound(String),
    /// Valid, but the state refuses it (not enough stock, a request id used
    /// for something else, a service that still has instances).
    #[error("{0}")]
    FailedPrecondition(String),
    /// Another call is handling the same request; retrying shortly helps.
    #[error("{0}")]
    Aborted(String),
    /// A configured limit is reached.
    #[error("{0}")]
    ResourceExhausted(String),
    /// The service or a dependency (storage, another service) cannot do it
    /// now; retrying later may succeed.
    #[error("{0}")]
    Unavailable(String),
    /// No credential, or one that is malformed, unknown or revoked; the
    /// message says which, and never quotes the credential.
    #[error("{0}")]
    Unauthenticated(String),
    /// A valid credential whose scope does not cover the request; the
    /// message names what was asked and what the credential may touch.
    #[error("{0}")]
    PermissionDenied(String),
}

impl Error {
    /// A refusal of one request field, naming it.
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// The gRPC status code a caller is answered with: the one mapping,
    /// shared by every gRPC server in the mesh.
    pub fn grpc_code(&self) -> tonic::Code {
        match self {
            Error::InvalidArgument { .. } => tonic::Code::InvalidArgument,
            Error::NotFound(_) => tonic::Code::NotFound,
            Error::FailedPrecondition(_) => tonic::Code::FailedPrecondition,
            Error::Aborted(_) => tonic::Code::Aborted,
            Error::ResourceExhausted(_) => tonic::Code::ResourceExhausted,
            Error::Unavailable(_) => tonic::Code::Unavailable,
            Error::Unauthenticated(_) => tonic::Code::Unauthenticated,
            Error::PermissionDenied(_) => tonic::Code::PermissionDenied,
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        tonic::Status::new(err.grpc_code(), err.to_string())
    }
}
