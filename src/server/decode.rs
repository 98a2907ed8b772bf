//! Reading a request: one that is not a well-formed gRPC request is refused
//! where it is read, as the caller's fault (INVALID_ARGUMENT, or
//! RESOURCE_EXHAUSTED over the size limit), so that INTERNAL stays for the
//! server's own failures.
//!
//! tonic calls all of these INTERNAL (the gRPC spec asks that of a
//! compressed flag without an encoding) and a message over the limit
//! OUT_OF_RANGE. Two places read a request, and each refuses what it finds:
//! [`Frames`] reads the gRPC framing of every request body on a port,
//! health and reflection included, before tonic does; [`crate::codec::RequestCodec`]
//! decodes the message of every server generated in `build.rs`, health's
//! among them. Reflection's servers are tonic-reflection's own: a message
//! of theirs that does not decode ends the reflection stream, with no
//! error sent.

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::LazyLock;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::Frame;
use prost::Message;
use tonic::Status;
use tonic::body::Body;

use crate::codec::malformed;

/// The compressed flag and the length that open each message.
const HEADER: usize = 5;

/// `request` with its body read through [`Frames`], refusing a message
/// over `limit` bytes.
pub fn frames(request: http::Request<Body>, limit: usize) -> http::Request<Body> {
    // A port that also serves plain HTTP (the registry's JSON API) reads
    // those bodies as they are.
    let grpc = request
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|t| t.to_str().ok())
        .is_some_and(|t| t.starts_with("application/grpc"));
    if !grpc {
        return request;
    }
    // tonic refuses an encoding the server does not accept before it reads
    // the body; with one it accepts, it decompresses.
    let encoded = request
        .headers()
        .get("grpc-encoding")
        .is_some_and(|encoding| encoding != "identity");
    let single = SINGLE_MESSAGE.contains(request.uri().path());
    request.map(|body| {
        Body::new(Frames {
            body,
            encoded,
            single,
            limit,
            header: [0; HEADER],
            have: 0,
            left: 0,
            messages: 0,
        })
    })
}

/// The paths of the methods whose request is one message (unary and
/// server-streaming): a body without one is malformed. tonic alone would
/// answer INTERNAL ("Missing request message").
static SINGLE_MESSAGE: LazyLock<HashSet<String>> = LazyLock::new(|| {
    [
        crate::pb::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
    ]
    .into_iter()
    .flat_map(|encoded| {
        prost_types::FileDescriptorSet::decode(encoded)
            .expect("embedded descriptors are valid")
            .file
    })
    .flat_map(|file| {
        let package = file.package().to_string();
        file.service.into_iter().flat_map(move |service| {
            let prefix = format!("/{package}.{}/", service.name());
            service
                .method
                .into_iter()
                .filter(|method| !method.client_streaming())
                .map(move |method| format!("{prefix}{}", method.name()))
        })
    })
    .collect()
});

/// A request body, passed through as it is while its gRPC framing is
/// followed: each message is a compressed flag, a length, then that many
/// bytes.
struct Frames {
    body: Body,
    /// Whether the request names an encoding, so a compressed flag is
    /// allowed.
    encoded: bool,
    /// Whether the method takes exactly one message.
    single: bool,
    limit: usize,
    header: [u8; HEADER],
    /// Bytes of the current header read so far.
    have: usize,
    /// Bytes of the current message still to come.
    left: usize,
    messages: usize,
}

impl Frames {
    fn read(&mut self, mut data: &[u8]) -> Result<(), Status> {
        while !data.is_empty() {
            if self.left > 0 {
                let skipped = self.left.min(data.len());
                self.left -= skipped;
                data = &data[skipped..];
                continue;
            }
            let taken = (HEADER - self.have).min(data.len());
            self.header[self.have..self.have + taken].copy_from_slice(&data[..taken]);
            self.have += taken;
            data = &data[taken..];
            if self.have < HEADER {
                break;
            }
            self.have = 0;
            match self.header[0] {
                0 => {}
                1 if self.encoded => {}
                1 => return Err(malformed("a compressed message, but no grpc-encoding")),
                flag => {
                    return Err(malformed(&format!(
                        "compressed flag {flag} (valid flags are 0 and 1)"
                    )));
                }
            }
            let [_, length @ ..] = self.header;
            let length = u32::from_be_bytes(length) as usize;
            if length > self.limit {
                return Err(Status::resource_exhausted(format!(
                    "request too large: a message of {length} bytes, the limit is {} bytes",
                    self.limit
                )));
            }
            self.left = length;
            self.messages += 1;
        }
        Ok(())
    }

    /// Whether the body may end here.
    fn finished(&self) -> Result<(), Status> {
        if self.have > 0 || self.left > 0 {
            return Err(malformed("the body ends inside a message"));
        }
        if self.single && self.messages == 0 {
            return Err(malformed("no message"));
        }
        Ok(())
    }
}

impl http_body::Body for Frames {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        let frame = ready!(Pin::new(&mut this.body).poll_frame(cx));
        let checked = match &frame {
            Some(Ok(frame)) => frame.data_ref().map_or(Ok(()), |data| this.read(data)),
            Some(Err(_)) => Ok(()),
            None => this.finished(),
        };
        Poll::Ready(match checked {
            Ok(()) => frame,
            Err(status) => Some(Err(status)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(single: bool) -> Frames {
        Frames {
            body: Body::empty(),
            encoded: false,
            single,
            limit: 16,
            header: [0; HEADER],
            have: 0,
            left: 0,
            messages: 0,
        }
    }

    #[test]
    fn messages_split_anywhere_are_followed() {
        let body = [[0, 0, 0, 0, 2, 7, 7].as_slice(), &[0, 0, 0, 0, 0]].concat();
        for split in 0..body.len() {
            let mut reader = frames(true);
            reader.read(&body[..split]).unwrap();
            reader.read(&body[split..]).unwrap();
            assert_eq!(reader.messages, 2);
            reader.finished().unwrap();
        }
    }

    #[test]
    fn what_the_framing_refuses() {
        let code = |body: &[u8], single| {
            let mut reader = frames(single);
            reader
                .read(body)
                .and_then(|()| reader.finished())
                .map_err(|status| status.code())
        };
        assert_eq!(code(&[], false), Ok(()));
        assert_eq!(code(&[], true), Err(tonic::Code::InvalidArgument));
        assert_eq!(code(&[0, 0, 0], false), Err(tonic::Code::InvalidArgument));
        assert_eq!(
            code(&[0, 0, 0, 0, 3, 1], false),
            Err(tonic::Code::InvalidArgument)
        );
        assert_eq!(
            code(&[7, 0, 0, 0, 0], false),
            Err(tonic::Code::InvalidArgument)
        );
        assert_eq!(
            code(&[1, 0, 0, 0, 0], false),
            Err(tonic::Code::InvalidArgument)
        );
        assert_eq!(
            code(&[0, 0, 0, 0, 17], false),
            Err(tonic::Code::ResourceExhausted)
        );
        assert_eq!(
            code(&[0, 0, 0, 0, 16], false),
            Err(tonic::Code::InvalidArgument)
        );
    }

    #[test]
    fn single_message_methods_are_read_from_the_descriptors() {
        assert!(SINGLE_MESSAGE.contains("/shopmesh.shop.v1.UserService/GetUser"));
        assert!(SINGLE_MESSAGE.contains("/shopmesh.registry.v1.Registry/Watch"));
        assert!(SINGLE_MESSAGE.contains("/grpc.health.v1.Health/Check"));
        assert!(!SINGLE_MESSAGE.contains("/shopmesh.registry.v1.Registry/KeepAlive"));
    }
}
