//! The config centre's gRPC face: each handler checks the caller's
//! credential with the registry's rules, converts the request, calls
//! [`Configs`], and converts the answer back.

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use super::model::{Client, ConfigKey, ContentType, GrayRule, Seen, Version};
use super::{ChangeKind, Configs, Expect, Publish, Selector, WatchChange, WatchItem};
use crate::auth::{Grant, Need};
use crate::error::Error;
use crate::pb::config as pb;
use crate::registry::Registry;
use crate::registry::model::GroupKey;
use crate::shutdown::Shutdown;

/// Bytes of content per snapshot message, so a large group stays under
/// the message size limit (an item alone always fits: its content is
/// bounded below the limit).
const SNAPSHOT_BYTES: usize = 1024 * 1024;

/// The config centre's gRPC face. Cheap to clone.
#[derive(Clone)]
pub struct ConfigService {
    registry: Registry,
    shutdown: Shutdown,
}

impl ConfigService {
    /// Serves `registry`'s config centre; watch streams end when
    /// `shutdown` fires.
    pub fn new(registry: Registry, shutdown: Shutdown) -> ConfigService {
        ConfigService { registry, shutdown }
    }

    fn configs(&self) -> &Configs {
        self.registry.configs()
    }

    /// Checks that the caller may read `namespace`.
    fn may_read<T>(&self, request: &Request<T>, namespace: &str) -> Result<(), Error> {
        let token = crate::registry::grpc::presented(request);
        self.registry
            .authorize(token.as_deref(), Need::Read { namespace })
            .map(drop)
    }

    /// Checks that the caller may change `key` (a write of the service
    /// of its namespace named as its data id); answers who it is.
    fn may_write<T>(&self, request: &Request<T>, key: &ConfigKey) -> Result<String, Error> {
        let token = crate::registry::grpc::presented(request);
        let grant = self.registry.authorize(token.as_deref(), write(key))?;
        Ok(by(grant.as_deref()))
    }
}

/// A request that names one item.
trait Names {
    /// The item it names, checked.
    fn key(&self) -> Result<ConfigKey, Error>;
}

macro_rules! names {
    ($($request:ty),*) => {$(
        impl Names for $request {
            fn key(&self) -> Result<ConfigKey, Error> {
                ConfigKey::parse(&self.namespace, &self.group, &self.data_id)
            }
        }
    )*};
}

names!(
    pb::PublishRequest,
    pb::GetRequest,
    pb::DeleteRequest,
    pb::HistoryRequest,
    pb::RollbackRequest,
    pb::PromoteRequest,
    pb::AbandonRequest,
    pb::WatchRequest
);

/// What changing `key` needs.
fn write(key: &ConfigKey) -> Need<'_> {
    Need::Write {
        namespace: &key.namespace,
        service: &key.data_id,
    }
}

fn by(grant: Option<&Grant>) -> String {
    grant.map(|g| g.name.clone()).unwrap_or_default()
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl pb::configs_server::Configs for ConfigService {
    async fn publish(
        &self,
        request: Request<pb::PublishRequest>,
    ) -> Result<Response<pb::PublishResponse>, Status> {
        let key = request.get_ref().key()?;
        let by = self.may_write(&request, &key)?;
        let r = request.into_inner();
        let content_type = content_type_from_pb(r.content_type)?;
        let gray = r
            .gray
            .map(|rule| GrayRule::parse(&rule.ips, rule.labels))
            .transpose()?;
        let version = self
            .configs()
            .publish(Publish {
                key: key.clone(),
                content: r.content,
                content_type,
                expect: Expect::from_wire(r.expected_version),
                by,
                gray: gray.clone(),
            })
            .await?;
        let seen = Seen {
            key,
            version,
            gray_rule: gray,
            gray_version: 0,
        };
        Ok(Response::new(pb::PublishResponse {
            revision: seen.version.version,
            item: Some(item_pb(&seen, true)),
        }))
    }

    async fn get(
        &self,
        request: Request<pb::GetRequest>,
    ) -> Result<Response<pb::GetResponse>, Status> {
        let key = request.get_ref().key()?;
        self.may_read(&request, &key.namespace)?;
        let r = request.into_inner();
        let seen = match r.version {
            None => self.configs().get(&key, &client_from_pb(r.client)?)?,
            Some(version) => self.configs().get_version(&key, version)?,
        };
        Ok(Response::new(pb::GetResponse {
            item: Some(item_pb(&seen, true)),
        }))
    }

    async fn delete(
        &self,
        request: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let key = request.get_ref().key()?;
        self.may_write(&request, &key)?;
        let expect = Expect::from_wire(request.get_ref().expected_version);
        let revision = self.configs().delete(&key, expect).await?;
        Ok(Response::new(pb::DeleteResponse { revision }))
    }

    async fn list(
        &self,
        request: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        let group = {
            let r = request.get_ref();
            GroupKey::parse(&r.namespace, &r.group)?
        };
        self.may_read(&request, &group.namespace)?;
        let r = request.into_inner();
        if r.search.len() > crate::registry::model::MAX_NAME_LEN {
            return Err(Error::invalid(
                "search",
                format!("at most {} bytes", crate::registry::model::MAX_NAME_LEN),
            )
            .into());
        }
        let max = self.registry.config().limits.max_page_size;
        let page_size = match r.page_size as usize {
            0 => max.min(100),
            n if n > max => {
                return Err(Error::invalid(
                    "page_size",
                    format!("{n} is above the maximum, {max}"),
                )
                .into());
            }
            n => n,
        };
        let page = (r.page as usize).max(1);
        let (items, total, revision) = self.configs().list(&group, &r.search, page, page_size);
        Ok(Response::new(pb::ListResponse {
            items: items.iter().map(|seen| item_pb(seen, false)).collect(),
            total: total as u32,
            revision,
        }))
    }

    async fn history(
        &self,
        request: Request<pb::HistoryRequest>,
    ) -> Result<Response<pb::HistoryResponse>, Status> {
        let key = request.get_ref().key()?;
        self.may_read(&request, &key.namespace)?;
        let versions = self.configs().history(&key)?;
        Ok(Response::new(pb::HistoryResponse {
            versions: versions.iter().map(|seen| item_pb(seen, true)).collect(),
        }))
    }

    async fn rollback(
        &self,
        request: Request<pb::RollbackRequest>,
    ) -> Result<Response<pb::PublishResponse>, Status> {
        let key = request.get_ref().key()?;
        let by = self.may_write(&request, &key)?;
        let r = request.into_inner();
        if r.version == 0 {
            return Err(Error::invalid("version", "must be set: a version History lists").into());
        }
        let version = self
            .configs()
            .rollback(&key, r.version, Expect::from_wire(r.expected_version), by)
            .await?;
        Ok(Response::new(published(key, version)))
    }

    async fn promote(
        &self,
        request: Request<pb::PromoteRequest>,
    ) -> Result<Response<pb::PublishResponse>, Status> {
        let key = request.get_ref().key()?;
        let by = self.may_write(&request, &key)?;
        let gray_version = gray_version(request.get_ref().gray_version)?;
        let version = self.configs().promote(&key, gray_version, by).await?;
        Ok(Response::new(published(key, version)))
    }

    async fn abandon(
        &self,
        request: Request<pb::AbandonRequest>,
    ) -> Result<Response<pb::AbandonResponse>, Status> {
        let key = request.get_ref().key()?;
        self.may_write(&request, &key)?;
        let gray_version = gray_version(request.get_ref().gray_version)?;
        let revision = self.configs().abandon(&key, gray_version).await?;
        Ok(Response::new(pb::AbandonResponse { revision }))
    }

    type WatchStream = BoxStream<pb::WatchResponse>;

    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let token = crate::registry::grpc::presented(&request);
        let r = request.into_inner();
        let group = GroupKey::parse(&r.namespace, &r.group)?;
        self.registry.authorize(
            token.as_deref(),
            Need::Read {
                namespace: &group.namespace,
            },
        )?;
        let namespace = group.namespace.clone();
        let selector = if r.data_id.is_empty() {
            Selector::Group(group)
        } else {
            Selector::Item(r.key()?)
        };
        let client = client_from_pb(r.client)?;
        let watch = self
            .configs()
            .watch(selector, client, r.start_revision, r.incarnation)?;
        let incarnation = self.configs().incarnation();
        let registry = self.registry.clone();
        // A token revoked while its watch is open gets no further change:
        // its next answer is the refusal, and the stream ends.
        let mut refused = false;
        let answers = watch
            .into_stream()
            .flat_map(move |item| {
                let answers: Vec<Result<pb::WatchResponse, Status>> = match registry.authorize(
                    token.as_deref(),
                    Need::Read {
                        namespace: &namespace,
                    },
                ) {
                    Ok(_) => watch_responses(item, incarnation)
                        .into_iter()
                        .map(Ok)
                        .collect(),
                    Err(err) => vec![Err(err.into())],
                };
                futures::stream::iter(answers)
            })
            .take_while(move |answer| {
                let go = !refused;
                refused |= answer.is_err();
                std::future::ready(go)
            })
            .take_until(self.shutdown.clone().cancelled_owned());
        Ok(Response::new(Box::pin(answers)))
    }
}

/// The content type a request names; TEXT when it names none.
fn content_type_from_pb(value: i32) -> Result<ContentType, Error> {
    pb::ContentType::try_from(value)
        .map(ContentType::from)
        .map_err(|_| {
            Error::invalid(
                "content_type",
                format!("{value} is not a content type; one of TEXT, PROPERTIES, YAML, JSON, TOML"),
            )
        })
}

impl From<pb::ContentType> for ContentType {
    /// Unspecified is text, as Publish takes it.
    fn from(kind: pb::ContentType) -> ContentType {
        match kind {
            pb::ContentType::Unspecified | pb::ContentType::Text => ContentType::Text,
            pb::ContentType::Properties => ContentType::Properties,
            pb::ContentType::Yaml => ContentType::Yaml,
            pb::ContentType::Json => ContentType::Json,
            pb::ContentType::Toml => ContentType::Toml,
        }
    }
}

impl From<ContentType> for pb::ContentType {
    fn from(kind: ContentType) -> pb::ContentType {
        match kind {
            ContentType::Text => pb::ContentType::Text,
            ContentType::Properties => pb::ContentType::Properties,
            ContentType::Yaml => pb::ContentType::Yaml,
            ContentType::Json => pb::ContentType::Json,
            ContentType::Toml => pb::ContentType::Toml,
        }
    }
}

/// An item of this face as JSON, as the JSON API and the CLI's `--json`
/// give it.
pub fn item_json(item: &pb::Item) -> serde_json::Value {
    serde_json::json!({
        "namespace": item.namespace,
        "group": item.group,
        "data_id": item.data_id,
        "content": item.content,
        "type": ContentType::from(item.content_type()).name(),
        "md5": item.md5,
        "version": item.version,
        "size": item.size,
        "modified_by": item.modified_by,
        "modified_ms": item.modified_ms,
        "rolled_back_from": item.rolled_back_from,
        "gray": item.gray.as_ref().map(|g| serde_json::json!({"ips": g.ips, "labels": g.labels})),
        "gray_version": item.gray_version,
    })
}

/// The version a current one became, as Publish answers it.
fn published(key: ConfigKey, version: Arc<Version>) -> pb::PublishResponse {
    let seen = Seen::of(key, &version, None, &Client::default());
    pb::PublishResponse {
        revision: version.version,
        item: Some(item_pb(&seen, true)),
    }
}

/// The gray version a request names; it must name one.
fn gray_version(version: u64) -> Result<u64, Error> {
    match version {
        0 => Err(Error::invalid(
            "gray_version",
            "must be set: the gray version, as Get or History show it",
        )),
        version => Ok(version),
    }
}

/// Who a request says asks; anyone when it says nothing.
fn client_from_pb(client: Option<pb::Client>) -> Result<Client, Error> {
    match client {
        None => Ok(Client::default()),
        Some(client) => Client::parse(&client.ip, client.labels),
    }
}

/// An item as a client reads it, with its content or without.
pub fn item_pb(seen: &Seen, content: bool) -> pb::Item {
    let (key, version) = (&seen.key, &seen.version);
    pb::Item {
        namespace: String::from(&*key.namespace),
        group: String::from(&*key.group),
        data_id: String::from(&*key.data_id),
        content: if content {
            String::from(&*version.content)
        } else {
            String::new()
        },
        content_type: pb::ContentType::from(version.content_type) as i32,
        md5: version.md5.clone(),
        version: version.version,
        modified_by: version.by.clone(),
        modified_ms: version.at_ms,
        size: version.content.len() as u64,
        rolled_back_from: version.rolled_back_from,
        gray: seen.gray_rule.as_ref().map(|rule| pb::GrayRule {
            ips: rule.ips.iter().map(|ip| ip.to_string()).collect(),
            labels: rule
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        }),
        gray_version: seen.gray_version,
    }
}

/// The answers one watch item becomes: a snapshot in messages of at
/// most [`SNAPSHOT_BYTES`] of content, changes one apiece.
fn watch_responses(item: WatchItem, incarnation: u64) -> Vec<pb::WatchResponse> {
    match item {
        WatchItem::Snapshot {
            reset,
            items,
            revision,
        } => {
            let mut chunks: Vec<Vec<pb::Item>> = vec![Vec::new()];
            let mut bytes = 0;
            for seen in &items {
                let size = seen.version.content.len();
                if bytes + size > SNAPSHOT_BYTES && !chunks.last().is_some_and(Vec::is_empty) {
                    chunks.push(Vec::new());
                    bytes = 0;
                }
                bytes += size;
                chunks
                    .last_mut()
                    .expect("one chunk at least")
                    .push(item_pb(seen, true));
            }
            let last = chunks.len() - 1;
            chunks
                .into_iter()
                .enumerate()
                .map(|(n, items)| pb::WatchResponse {
                    revision,
                    incarnation,
                    body: Some(pb::watch_response::Body::Snapshot(pb::Snapshot {
                        reset,
                        items,
                        more: n < last,
                    })),
                })
                .collect()
        }
        WatchItem::Changes(changes) => changes
            .iter()
            .map(|change| change_pb(change, incarnation))
            .collect(),
    }
}

fn change_pb(change: &WatchChange, incarnation: u64) -> pb::WatchResponse {
    let (kind, content) = match change.kind {
        ChangeKind::Put => (pb::change::Kind::Put, true),
        ChangeKind::Deleted => (pb::change::Kind::Delete, false),
    };
    pb::WatchResponse {
        revision: change.revision,
        incarnation,
        body: Some(pb::watch_response::Body::Change(pb::Change {
            kind: kind as i32,
            item: Some(item_pb(&change.seen, content)),
        })),
    }
}
