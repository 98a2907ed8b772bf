//! The one table from kinds of failure to gRPC codes, shared by every
//! error type of the crate.
//!
//! Each module keeps its own error type, whose variants carry its domain's
//! meaning; it says only which [`ErrorKind`] each variant is. A front (the
//! gRPC servers today) turns a kind into its own code here, once, so that a
//! second front maps the same kinds in one more place and nowhere else.

/// What kind of failure an error is, as the caller sees it: the choice the
/// caller has to make (fix the request, look elsewhere, retry) and no more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request itself is wrong; sending it again will not help.
    InvalidArgument,
    NotFound,
    /// The request is valid but the state refuses it.
    FailedPrecondition,
    /// Another call is handling the same request; retrying shortly helps.
    Aborted,
    /// A configured limit is reached.
    ResourceExhausted,
    /// The service cannot do it now; retrying later may succeed.
    Unavailable,
}

impl ErrorKind {
    pub fn grpc_code(self) -> tonic::Code {
        match self {
            ErrorKind::InvalidArgument => tonic::Code::InvalidArgument,
            ErrorKind::NotFound => tonic::Code::NotFound,
            ErrorKind::FailedPrecondition => tonic::Code::FailedPrecondition,
            ErrorKind::Aborted => tonic::Code::Aborted,
            ErrorKind::ResourceExhausted => tonic::Code::ResourceExhausted,
            ErrorKind::Unavailable => tonic::Code::Unavailable,
        }
    }
}

/// An error a caller is answered with: its message is written for the
/// caller (internal causes are logged where they happen, never sent), and
/// its kind picks the code.
pub trait ServiceError: std::fmt::Display {
    fn kind(&self) -> ErrorKind;
}

/// The gRPC answer to `err`. Each error type's `From<_> for tonic::Status`
/// is this one call (the orphan rule forbids one blanket impl for all).
pub fn grpc_status(err: &impl ServiceError) -> tonic::Status {
    tonic::Status::new(err.kind().grpc_code(), err.to_string())
}
