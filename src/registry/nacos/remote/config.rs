//! Nacos 2.x's config requests over the config centre: ConfigQuery,
//! ConfigPublish, ConfigRemove and ConfigBatchListen, and the
//! ConfigChangeNotify pushed when a listened item changes. Each goes
//! through the config centre's gRPC face, so the checks, the messages and
//! the credentials are the same; a Nacos namespace id (`tenant`) is a
//! shop-mesh namespace, and a Nacos beta publish (`betaIps`) is a gray
//! version for those addresses. A connection reads as its peer's address,
//! so a beta reaches the clients it names.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures::StreamExt;
use serde::Deserialize;
use serde_json::json;
use tonic::{Code, Status};

use super::{Call, Connection, Following, Remote, answer, payload};
use crate::pb::config as pb;
use crate::pb::config::configs_server::Configs as _;
use crate::pb::nacos::Payload;
use crate::registry::configs::model::{ConfigKey, ContentType};
use crate::registry::nacos::with_token;

/// Nacos's code for a config that does not exist (its SDKs read it as
/// empty content).
const CONFIG_NOT_FOUND: u16 = 300;

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct ConfigRequest {
    data_id: Option<String>,
    group: Option<String>,
    tenant: Option<String>,
    content: Option<String>,
    cas_md5: Option<String>,
    addition_map: Option<HashMap<String, String>>,
    listen: Option<bool>,
    config_listen_contexts: Option<Vec<ListenContext>>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct ListenContext {
    data_id: Option<String>,
    group: Option<String>,
    tenant: Option<String>,
    md5: Option<String>,
}

/// An item's (namespace, group, data id) as a request names it.
fn scope(
    data_id: Option<&str>,
    group: Option<&str>,
    tenant: Option<&str>,
) -> Result<(String, String, String), Status> {
    let data_id = data_id
        .filter(|d| !d.is_empty())
        .ok_or_else(|| super::super::missing("dataId"))?;
    Ok((
        tenant.unwrap_or_default().to_string(),
        group.unwrap_or_default().to_string(),
        data_id.to_string(),
    ))
}

/// The config centre's type for a Nacos type name; Nacos's `xml` and
/// `html` (and anything else) are kept as text.
fn content_type(name: &str) -> pb::ContentType {
    ContentType::parse("type", name)
        .unwrap_or(ContentType::Text)
        .into()
}

/// How a connection reads: as its peer's address, for gray rules.
fn client_of(connection: &Connection) -> pb::Client {
    pb::Client {
        ip: connection.peer.ip().to_string(),
        labels: HashMap::new(),
    }
}

impl Remote {
    /// The item `scope` names as `connection` reads it; `None` when there
    /// is no such item.
    async fn read(
        &self,
        connection: &Connection,
        token: Option<&str>,
        (namespace, group, data_id): &(String, String, String),
    ) -> Result<Option<pb::Item>, Status> {
        let request = pb::GetRequest {
            namespace: namespace.clone(),
            group: group.clone(),
            data_id: data_id.clone(),
            version: None,
            client: Some(client_of(connection)),
        };
        match self.shared.configs.get(with_token(token, request)).await {
            Ok(answer) => Ok(answer.into_inner().item),
            Err(status) if status.code() == Code::NotFound => Ok(None),
            Err(status) => Err(status),
        }
    }

    /// ConfigQueryRequest: an item's content as the connection reads it.
    pub(super) async fn config_query(
        &self,
        connection: &Connection,
        call: &Call<'_>,
    ) -> Result<Payload, Status> {
        let r: ConfigRequest = call.parse()?;
        let scope = scope(
            r.data_id.as_deref(),
            r.group.as_deref(),
            r.tenant.as_deref(),
        )?;
        let Some(item) = self.read(connection, call.token.as_deref(), &scope).await? else {
            // Not an ErrorResponse: Nacos answers a failed
            // ConfigQueryResponse, whose code its SDKs read as "empty".
            return Ok(payload(
                "ConfigQueryResponse",
                &json!({
                    "resultCode": 500,
                    "errorCode": CONFIG_NOT_FOUND,
                    "message": format!("config data not exist: no config {}", scope.2),
                    "requestId": call.request_id,
                    "success": false,
                }),
            ));
        };
        Ok(answer(
            "ConfigQueryResponse",
            &call.request_id,
            json!({
                "content": item.content,
                "contentType": ContentType::from(item.content_type()).name(),
                "md5": item.md5,
                "lastModified": item.modified_ms,
                "isBeta": item.gray.is_some(),
                "tag": false,
                "encryptedDataKey": "",
            }),
        ))
    }

    /// ConfigPublishRequest: content as the item's new version; with
    /// `betaIps`, its gray version for those addresses; with `casMd5`,
    /// only if the item's content still has that digest.
    pub(super) async fn config_publish(
        &self,
        connection: &Connection,
        call: &Call<'_>,
    ) -> Result<Payload, Status> {
        let r: ConfigRequest = call.parse()?;
        let scope = scope(
            r.data_id.as_deref(),
            r.group.as_deref(),
            r.tenant.as_deref(),
        )?;
        let content = r.content.ok_or_else(|| super::super::missing("content"))?;
        let extra = r.addition_map.unwrap_or_default();
        let beta: Vec<String> = extra
            .get("betaIps")
            .map(|ips| {
                ips.split(',')
                    .map(str::trim)
                    .filter(|ip| !ip.is_empty())
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default();
        let expected_version = match r.cas_md5.as_deref().filter(|m| !m.is_empty()) {
            None => None,
            Some(md5) => {
                let current = self.read(connection, call.token.as_deref(), &scope).await?;
                match current {
                    Some(item) if item.md5 == md5 => Some(item.version),
                    _ => {
                        return Err(Status::failed_precondition(format!(
                            "config {} no longer has content of MD5 {md5}; read it again and retry",
                            scope.2
                        )));
                    }
                }
            }
        };
        let (namespace, group, data_id) = scope;
        let request = pb::PublishRequest {
            namespace,
            group,
            data_id,
            content,
            content_type: content_type(extra.get("type").map_or("", String::as_str)) as i32,
            expected_version,
            gray: (!beta.is_empty()).then(|| pb::GrayRule {
                ips: beta,
                labels: HashMap::new(),
            }),
        };
        self.shared
            .configs
            .publish(with_token(call.token.as_deref(), request))
            .await?;
        Ok(answer("ConfigPublishResponse", &call.request_id, json!({})))
    }

    /// ConfigRemoveRequest: deletes the item; one already gone is removed
    /// too, as Nacos has it.
    pub(super) async fn config_remove(&self, call: &Call<'_>) -> Result<Payload, Status> {
        let r: ConfigRequest = call.parse()?;
        let (namespace, group, data_id) = scope(
            r.data_id.as_deref(),
            r.group.as_deref(),
            r.tenant.as_deref(),
        )?;
        let request = pb::DeleteRequest {
            namespace,
            group,
            data_id,
            expected_version: None,
        };
        match self
            .shared
            .configs
            .delete(with_token(call.token.as_deref(), request))
            .await
        {
            Ok(_) => {}
            Err(status) if status.code() == Code::NotFound => {}
            Err(status) => return Err(status),
        }
        Ok(answer("ConfigRemoveResponse", &call.request_id, json!({})))
    }

    /// ConfigBatchListenRequest: starts (or stops) following each item
    /// named; answers those whose digest is not the one the client holds,
    /// and from then on pushes ConfigChangeNotifyRequest for each change.
    pub(super) async fn config_listen(
        &self,
        connection: &Arc<Connection>,
        call: &Call<'_>,
    ) -> Result<Payload, Status> {
        let r: ConfigRequest = call.parse()?;
        let listen = r.listen.unwrap_or(true);
        let mut changed = Vec::new();
        for context in r.config_listen_contexts.unwrap_or_default() {
            let scope = scope(
                context.data_id.as_deref(),
                context.group.as_deref(),
                context.tenant.as_deref(),
            )?;
            let key = ConfigKey::parse(&scope.0, &scope.1, &scope.2)?;
            if !listen {
                if let Some(held) = connection.held.lock().await.as_mut() {
                    held.config_listens.remove(&key);
                }
                continue;
            }
            let current = self.read(connection, call.token.as_deref(), &scope).await?;
            let held_md5 = context.md5.unwrap_or_default();
            if current.as_ref().map_or("", |item| item.md5.as_str()) != held_md5 {
                changed.push(
                    json!({"dataId": scope.2, "group": key.group.to_string(), "tenant": scope.0}),
                );
            }
            let mut held = connection.held.lock().await;
            let held = held
                .as_mut()
                .ok_or_else(|| Status::unavailable("the connection has ended"))?;
            if held.config_listens.contains_key(&key) {
                continue;
            }
            let request = pb::WatchRequest {
                namespace: scope.0.clone(),
                group: scope.1.clone(),
                data_id: scope.2.clone(),
                client: Some(client_of(connection)),
                ..Default::default()
            };
            let watch = self
                .shared
                .configs
                .watch(with_token(call.token.as_deref(), request))
                .await?
                .into_inner();
            let task = tokio::spawn(self.clone().notify(connection.clone(), watch, scope));
            held.config_listens.insert(key, Following(task));
        }
        Ok(answer(
            "ConfigChangeBatchListenResponse",
            &call.request_id,
            json!({"changedConfigs": changed}),
        ))
    }

    /// A listened item: after the snapshot, a ConfigChangeNotifyRequest
    /// for each change, while the credential still reads it.
    async fn notify(
        self,
        connection: Arc<Connection>,
        mut watch: <crate::registry::configs::grpc::ConfigService as crate::pb::config::configs_server::Configs>::WatchStream,
        (tenant, group, data_id): (String, String, String),
    ) {
        while let Some(answer) = watch.next().await {
            let Ok(answer) = answer else {
                tracing::info!(connection = %connection.id, config = %data_id, "nacos config listener ended");
                return;
            };
            // The first snapshot is what the listen answer compared; a
            // reset one may hide a change, so it is told as one.
            if let Some(pb::watch_response::Body::Snapshot(snapshot)) = &answer.body
                && !snapshot.reset
            {
                continue;
            }
            let group = match &answer.body {
                Some(pb::watch_response::Body::Change(change)) => change
                    .item
                    .as_ref()
                    .map_or(group.clone(), |item| item.group.clone()),
                _ => group.clone(),
            };
            let id = self
                .shared
                .pushes
                .fetch_add(1, Ordering::Relaxed)
                .to_string();
            let push = payload(
                "ConfigChangeNotifyRequest",
                &json!({"headers": {}, "requestId": id, "module": "config",
                    "dataId": data_id, "group": group, "tenant": tenant}),
            );
            let Some(outbound) = connection.outbound.lock().clone() else {
                return;
            };
            if outbound.send(Ok(push)).await.is_err() {
                return;
            }
        }
    }
}
