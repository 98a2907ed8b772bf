//! The config centre's part of the JSON API, under `/api/v1/configs`: an
//! adapter over the config centre's gRPC face, as the rest of the API is
//! over the registry's, so each request is checked and refused by the
//! same rules with the same message.
//!
//! ```text
//! GET    /api/v1/configs?namespace=&group=&search=&page=&page_size=
//! GET    /api/v1/configs/{data_id}?namespace=&group=&version=
//! GET    /api/v1/configs/{data_id}/history?namespace=&group=
//! PUT    /api/v1/configs/{data_id}?namespace=&group=   {"content": "..", "type": "toml", "expected_version": 3, "gray": {"ips": [..], "labels": {..}}}
//! DELETE /api/v1/configs/{data_id}?namespace=&group=&expected_version=
//! POST   /api/v1/configs/{data_id}/rollback?namespace=&group=   {"version": 3, "expected_version": 5}
//! POST   /api/v1/configs/{data_id}/promote?namespace=&group=    {"gray_version": 7}
//! POST   /api/v1/configs/{data_id}/abandon?namespace=&group=    {"gray_version": 7}
//! ```

use std::collections::HashMap;

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{Refused, invalid, request};
use crate::pb::config as pb;
use crate::pb::config::configs_server::Configs as _;
use crate::registry::configs::grpc::{ConfigService, item_json};
use crate::registry::configs::model::ContentType;

/// The config centre's routes, served by `configs`.
pub fn routes(configs: ConfigService) -> axum::Router {
    axum::Router::new()
        .route("/api/v1/configs", get(list))
        .route(
            "/api/v1/configs/{data_id}",
            get(read).put(publish).delete(remove),
        )
        .route("/api/v1/configs/{data_id}/history", get(history))
        .route("/api/v1/configs/{data_id}/rollback", post(rollback))
        .route("/api/v1/configs/{data_id}/promote", post(promote))
        .route("/api/v1/configs/{data_id}/abandon", post(abandon))
        .with_state(configs)
}

fn type_pb(name: Option<&str>) -> Result<pb::ContentType, Refused> {
    match name {
        None => Ok(pb::ContentType::Text),
        Some(name) => ContentType::parse("type", name)
            .map(pb::ContentType::from)
            .map_err(|err| Refused(tonic::Status::from(err))),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Scope {
    #[serde(default)]
    namespace: String,
    #[serde(default)]
    group: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    #[serde(default)]
    namespace: String,
    #[serde(default)]
    group: String,
    #[serde(default)]
    search: String,
    #[serde(default)]
    page: u32,
    #[serde(default)]
    page_size: u32,
}

async fn list(
    State(configs): State<ConfigService>,
    headers: HeaderMap,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<Value>, Refused> {
    let Query(q) = query.map_err(|err| invalid("query", err.body_text()))?;
    let answer = configs
        .list(request(
            &headers,
            pb::ListRequest {
                namespace: q.namespace,
                group: q.group,
                search: q.search,
                page: q.page,
                page_size: q.page_size,
            },
        ))
        .await?
        .into_inner();
    let items: Vec<Value> = answer.items.iter().map(item_json).collect();
    Ok(Json(json!({
        "items": items,
        "total": answer.total,
        "revision": answer.revision,
    })))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReadQuery {
    #[serde(default)]
    namespace: String,
    #[serde(default)]
    group: String,
    #[serde(default)]
    version: Option<u64>,
}

async fn read(
    State(configs): State<ConfigService>,
    data_id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    query: Result<Query<ReadQuery>, QueryRejection>,
) -> Result<Json<Value>, Refused> {
    let Path(data_id) = data_id.map_err(|err| invalid("path", err.body_text()))?;
    let Query(q) = query.map_err(|err| invalid("query", err.body_text()))?;
    let answer = configs
        .get(request(
            &headers,
            pb::GetRequest {
                namespace: q.namespace,
                group: q.group,
                data_id,
                version: q.version,
                client: None,
            },
        ))
        .await?
        .into_inner();
    Ok(Json(item_json(&answer.item.unwrap_or_default())))
}

async fn history(
    State(configs): State<ConfigService>,
    data_id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    query: Result<Query<Scope>, QueryRejection>,
) -> Result<Json<Value>, Refused> {
    let Path(data_id) = data_id.map_err(|err| invalid("path", err.body_text()))?;
    let Query(q) = query.map_err(|err| invalid("query", err.body_text()))?;
    let answer = configs
        .history(request(
            &headers,
            pb::HistoryRequest {
                namespace: q.namespace,
                group: q.group,
                data_id,
            },
        ))
        .await?
        .into_inner();
    let versions: Vec<Value> = answer.versions.iter().map(item_json).collect();
    Ok(Json(json!({"versions": versions})))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct GrayBody {
    #[serde(default)]
    ips: Vec<String>,
    #[serde(default)]
    labels: HashMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishBody {
    content: String,
    #[serde(default, rename = "type")]
    content_type: Option<String>,
    #[serde(default)]
    expected_version: Option<u64>,
    #[serde(default)]
    gray: Option<GrayBody>,
}

async fn publish(
    State(configs): State<ConfigService>,
    data_id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    query: Result<Query<Scope>, QueryRejection>,
    body: Result<Json<PublishBody>, JsonRejection>,
) -> Result<Json<Value>, Refused> {
    let Path(data_id) = data_id.map_err(|err| invalid("path", err.body_text()))?;
    let Query(q) = query.map_err(|err| invalid("query", err.body_text()))?;
    let Json(body) = body.map_err(|err| invalid("body", err.body_text()))?;
    let answer = configs
        .publish(request(
            &headers,
            pb::PublishRequest {
                namespace: q.namespace,
                group: q.group,
                data_id,
                content: body.content,
                content_type: type_pb(body.content_type.as_deref())? as i32,
                expected_version: body.expected_version,
                gray: body.gray.map(|g| pb::GrayRule {
                    ips: g.ips,
                    labels: g.labels,
                }),
            },
        ))
        .await?
        .into_inner();
    Ok(Json(json!({
        "item": item_json(&answer.item.unwrap_or_default()),
        "revision": answer.revision,
    })))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RemoveQuery {
    #[serde(default)]
    namespace: String,
    #[serde(default)]
    group: String,
    #[serde(default)]
    expected_version: Option<u64>,
}

async fn remove(
    State(configs): State<ConfigService>,
    data_id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    query: Result<Query<RemoveQuery>, QueryRejection>,
) -> Result<Json<Value>, Refused> {
    let Path(data_id) = data_id.map_err(|err| invalid("path", err.body_text()))?;
    let Query(q) = query.map_err(|err| invalid("query", err.body_text()))?;
    let answer = configs
        .delete(request(
            &headers,
            pb::DeleteRequest {
                namespace: q.namespace,
                group: q.group,
                data_id,
                expected_version: q.expected_version,
            },
        ))
        .await?
        .into_inner();
    Ok(Json(json!({"revision": answer.revision})))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RollbackBody {
    version: u64,
    #[serde(default)]
    expected_version: Option<u64>,
}

async fn rollback(
    State(configs): State<ConfigService>,
    data_id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    query: Result<Query<Scope>, QueryRejection>,
    body: Result<Json<RollbackBody>, JsonRejection>,
) -> Result<Json<Value>, Refused> {
    let Path(data_id) = data_id.map_err(|err| invalid("path", err.body_text()))?;
    let Query(q) = query.map_err(|err| invalid("query", err.body_text()))?;
    let Json(body) = body.map_err(|err| invalid("body", err.body_text()))?;
    let answer = configs
        .rollback(request(
            &headers,
            pb::RollbackRequest {
                namespace: q.namespace,
                group: q.group,
                data_id,
                version: body.version,
                expected_version: body.expected_version,
            },
        ))
        .await?
        .into_inner();
    Ok(Json(json!({
        "item": item_json(&answer.item.unwrap_or_default()),
        "revision": answer.revision,
    })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GrayVersionBody {
    gray_version: u64,
}

async fn promote(
    State(configs): State<ConfigService>,
    data_id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    query: Result<Query<Scope>, QueryRejection>,
    body: Result<Json<GrayVersionBody>, JsonRejection>,
) -> Result<Json<Value>, Refused> {
    let Path(data_id) = data_id.map_err(|err| invalid("path", err.body_text()))?;
    let Query(q) = query.map_err(|err| invalid("query", err.body_text()))?;
    let Json(body) = body.map_err(|err| invalid("body", err.body_text()))?;
    let answer = configs
        .promote(request(
            &headers,
            pb::PromoteRequest {
                namespace: q.namespace,
                group: q.group,
                data_id,
                gray_version: body.gray_version,
            },
        ))
        .await?
        .into_inner();
    Ok(Json(json!({
        "item": item_json(&answer.item.unwrap_or_default()),
        "revision": answer.revision,
    })))
}

async fn abandon(
    State(configs): State<ConfigService>,
    data_id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    query: Result<Query<Scope>, QueryRejection>,
    body: Result<Json<GrayVersionBody>, JsonRejection>,
) -> Result<Json<Value>, Refused> {
    let Path(data_id) = data_id.map_err(|err| invalid("path", err.body_text()))?;
    let Query(q) = query.map_err(|err| invalid("query", err.body_text()))?;
    let Json(body) = body.map_err(|err| invalid("body", err.body_text()))?;
    let answer = configs
        .abandon(request(
            &headers,
            pb::AbandonRequest {
                namespace: q.namespace,
                group: q.group,
                data_id,
                gray_version: body.gray_version,
            },
        ))
        .await?
        .into_inner();
    Ok(Json(json!({"revision": answer.revision})))
}
