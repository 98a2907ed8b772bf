//! The registry's changes told to a browser: `GET /api/v1/events` is a
//! Watch (the gRPC handler's own, with the request's credential) from the
//! current revision, sent as Server-Sent Events. Changes that arrive
//! together are sent as one event naming their services, at most one
//! every [`COALESCE`], so a page re-reads what it shows at most that
//! often however busy the registry is; the page reads the state itself
//! from the JSON API, so an event carries no instance.
//!
//! ```text
//! event: change   data: {"revision": 42, "services": ["server-product"]}
//! event: reset    data: {"revision": 42}        (re-read everything shown)
//! event: ended    data: {"message": "..."}      (the credential was refused; the stream ends)
//! ```

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::Stream;
use serde::Deserialize;
use serde_json::json;
use tokio_stream::StreamExt as _;
use tonic::transport::server::TcpConnectInfo;

use super::{Refused, RegistryService, invalid, request};
use crate::pb::registry as pb;
use crate::pb::registry::registry_server::Registry as _;
use crate::registry::console::{FromSession, SESSION_ENDED};

/// How long changes are gathered into one event.
pub const COALESCE: Duration = Duration::from_millis(100);

/// Services an event names at most; past that the page re-reads all.
const MAX_NAMED: usize = 50;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(in crate::registry) struct EventsQuery {
    #[serde(default)]
    namespace: String,
    #[serde(default)]
    group: String,
    /// One service; the whole group when absent.
    #[serde(default)]
    service: Option<String>,
}

pub(in crate::registry) async fn events(
    State(service): State<RegistryService>,
    connection: Option<axum::Extension<TcpConnectInfo>>,
    session: Option<axum::Extension<FromSession>>,
    headers: HeaderMap,
    query: Result<Query<EventsQuery>, QueryRejection>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, Refused> {
    let Query(q) = query.map_err(|err| invalid("query", err.body_text()))?;
    let registry = service.registry();
    let mut watch = request(
        &headers,
        pb::WatchRequest {
            namespace: q.namespace,
            group: q.group,
            service: q.service.unwrap_or_default(),
            start_revision: registry.revision() + 1,
            incarnation: registry.incarnation(),
        },
    );
    if let Some(axum::Extension(info)) = connection {
        watch.extensions_mut().insert(info);
    }
    let answers = service.watch(watch).await?.into_inner();
    let mut ended = false;
    let events = answers
        .chunks_timeout(1024, COALESCE)
        .map(move |batch| told(batch, session.is_some()))
        .take_while(move |(_, last)| {
            let go = !ended;
            ended |= *last;
            go
        })
        .map(|(event, _)| Ok(event));
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

/// One event for changes that came together; and whether it is the last.
/// `session`: the credential is a console session's, whose end is said
/// as such.
fn told(batch: Vec<Result<pb::WatchResponse, tonic::Status>>, session: bool) -> (Event, bool) {
    let mut revision = 0;
    let mut reset = false;
    let mut services = BTreeSet::new();
    for answer in batch {
        let answer = match answer {
            Ok(answer) => answer,
            Err(status) => {
                let message = match status.code() {
                    tonic::Code::Unauthenticated if session => SESSION_ENDED,
                    _ => status.message(),
                };
                let data = json!({"message": message});
                return (Event::default().event("ended").data(data.to_string()), true);
            }
        };
        revision = revision.max(answer.revision);
        match answer.body {
            Some(pb::watch_response::Body::Change(change)) => {
                if let Some(instance) = change.instance {
                    services.insert(instance.service);
                }
            }
            Some(pb::watch_response::Body::Snapshot(_)) | None => reset = true,
        }
    }
    if reset || services.len() > MAX_NAMED {
        let data = json!({"revision": revision});
        return (
            Event::default().event("reset").data(data.to_string()),
            false,
        );
    }
    let data = json!({"revision": revision, "services": services});
    (
        Event::default().event("change").data(data.to_string()),
        false,
    )
}
