//! The registry's JSON API over plain HTTP, on the port its gRPC API
//! serves, under `/api/v1/`: what the console calls, and what anyone can
//! call with curl. Every handler is an adapter over the gRPC service's own
//! method, so a request is checked (its credential included: `Authorization:
//! Bearer smt_...`) and refused with the same rules and the same message;
//! a refusal's gRPC code becomes its HTTP status.
//!
//! ```text
//! GET    /api/v1/services?namespace=&group=&page=&page_size=
//! GET    /api/v1/services/{service}?namespace=&group=&healthy_only=&cluster=
//! PATCH  /api/v1/services/{service}?namespace=&group=      {"protect_threshold": 0.5, "metadata": {..}}
//! PATCH  /api/v1/services/{service}/instances/{ip}/{port}?namespace=&group=&cluster=   {"weight": 2, "enabled": false}
//! DELETE /api/v1/services/{service}/instances/{ip}/{port}?namespace=&group=&cluster=
//! GET    /api/v1/changes?namespace=&group=&service=&limit=
//! ```
//!
//! The change feed has no gRPC twin (Watch streams what follows; this reads
//! what the history holds): it checks the credential and its fields the
//! way the handlers do, with the same rules.

use std::collections::HashMap;

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, delete, get};
use serde::Deserialize;
use serde_json::{Value, json};
use tonic::Code;

use super::RegistryService;
use crate::pb::registry as pb;
use crate::pb::registry::registry_server::Registry as _;

/// The routes of the JSON API, served by `service`.
pub fn routes(service: RegistryService) -> axum::Router {
    axum::Router::new()
        .route("/api/v1/services", get(list_services))
        .route(
            "/api/v1/services/{service}",
            get(get_service).patch(update_service),
        )
        .route(
            "/api/v1/services/{service}/instances/{ip}/{port}",
            delete(deregister).patch(update_instance),
        )
        .route("/api/v1/changes", get(changes))
        .route("/api/v1/{*rest}", any(no_such_call))
        .with_state(service)
}

/// A path under the API's that names no call: 404, said in JSON.
async fn no_such_call(uri: axum::http::Uri) -> Refused {
    Refused(tonic::Status::not_found(format!(
        "{} is not a call of this API (see the README's JSON API)",
        uri.path()
    )))
}

/// A refusal as the API answers it: the gRPC code's HTTP status, and
/// `{"code": "NOT_FOUND", "message": "..."}`.
struct Refused(tonic::Status);

impl From<tonic::Status> for Refused {
    fn from(status: tonic::Status) -> Self {
        Refused(status)
    }
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        let status = match self.0.code() {
            Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
            Code::Unauthenticated => StatusCode::UNAUTHORIZED,
            Code::PermissionDenied => StatusCode::FORBIDDEN,
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::FailedPrecondition | Code::Aborted | Code::AlreadyExists => StatusCode::CONFLICT,
            Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let code = format!("{:?}", self.0.code());
        let body = json!({"code": screaming(&code), "message": self.0.message()});
        (status, Json(body)).into_response()
    }
}

/// `NotFound` as gRPC spells it in its specification: `NOT_FOUND`.
fn screaming(camel: &str) -> String {
    let mut out = String::new();
    for (i, c) in camel.chars().enumerate() {
        if c.is_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

/// A bad query string or body, refused as the gRPC API refuses a bad
/// field: 400, naming what is wrong.
fn invalid(what: &str, reason: impl std::fmt::Display) -> Refused {
    Refused(tonic::Status::invalid_argument(format!("{what}: {reason}")))
}

/// `message` as a gRPC request showing the HTTP request's credential.
fn request<T>(headers: &HeaderMap, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(value) = headers.get(axum::http::header::AUTHORIZATION)
        && let Ok(value) = value.to_str()
        && let Ok(value) = value.parse()
    {
        request.metadata_mut().insert("authorization", value);
    }
    request
}

/// Where a service is: its namespace and group, defaulted as the gRPC
/// API defaults them.
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
    page: u32,
    #[serde(default)]
    page_size: u32,
}

async fn list_services(
    State(service): State<RegistryService>,
    headers: HeaderMap,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<Value>, Refused> {
    let Query(q) = query.map_err(|err| invalid("query", err.body_text()))?;
    let answer = service
        .list_services(request(
            &headers,
            pb::ListServicesRequest {
                namespace: q.namespace,
                group: q.group,
                page: q.page,
                page_size: q.page_size,
            },
        ))
        .await?
        .into_inner();
    let services: Vec<Value> = answer
        .services
        .iter()
        .map(|s| {
            json!({
                "namespace": s.namespace,
                "group": s.group,
                "name": s.name,
                "instance_count": s.instance_count,
                "healthy_count": s.healthy_count,
                "protect_threshold": s.protect_threshold,
            })
        })
        .collect();
    Ok(Json(json!({
        "services": services,
        "total": answer.total,
        "revision": answer.revision,
    })))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct GetQuery {
    #[serde(default)]
    namespace: String,
    #[serde(default)]
    group: String,
    #[serde(default)]
    healthy_only: bool,
    /// One cluster; the gRPC API's list, as far as a query string goes.
    #[serde(default)]
    cluster: Option<String>,
}

async fn get_service(
    State(service): State<RegistryService>,
    name: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    query: Result<Query<GetQuery>, QueryRejection>,
) -> Result<Json<Value>, Refused> {
    let Path(name) = name.map_err(|err| invalid("path", err.body_text()))?;
    let Query(q) = query.map_err(|err| invalid("query", err.body_text()))?;
    let answer = service
        .get_service(request(
            &headers,
            pb::GetServiceRequest {
                namespace: q.namespace,
                group: q.group,
                service: name,
                healthy_only: q.healthy_only,
                clusters: q.cluster.into_iter().collect(),
            },
        ))
        .await?
        .into_inner();
    let instances: Vec<Value> = answer.instances.iter().map(instance_json).collect();
    Ok(Json(json!({
        "namespace": answer.namespace,
        "group": answer.group,
        "name": answer.name,
        "revision": answer.revision,
        "protect_threshold": answer.protect_threshold,
        "protection_triggered": answer.protection_triggered,
        "instances": instances,
    })))
}

fn instance_json(i: &pb::Instance) -> Value {
    json!({
        "instance_id": i.instance_id,
        "cluster": i.cluster,
        "ip": i.ip,
        "port": i.port,
        "weight": i.weight,
        "healthy": i.healthy,
        "enabled": i.enabled,
        "ephemeral": i.ephemeral,
        "metadata": i.metadata,
        "heartbeat_interval_ms": i.heartbeat_interval_ms,
        "unhealthy_timeout_ms": i.unhealthy_timeout_ms,
        "delete_timeout_ms": i.delete_timeout_ms,
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceSettings {
    protect_threshold: f64,
    #[serde(default)]
    metadata: HashMap<String, String>,
}

async fn update_service(
    State(service): State<RegistryService>,
    name: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    query: Result<Query<Scope>, QueryRejection>,
    body: Result<Json<ServiceSettings>, JsonRejection>,
) -> Result<Json<Value>, Refused> {
    let Path(name) = name.map_err(|err| invalid("path", err.body_text()))?;
    let Query(scope) = query.map_err(|err| invalid("query", err.body_text()))?;
    let Json(settings) = body.map_err(|err| invalid("body", err.body_text()))?;
    let answer = service
        .update_service(request(
            &headers,
            pb::UpdateServiceRequest {
                namespace: scope.namespace,
                group: scope.group,
                service: name,
                protect_threshold: settings.protect_threshold,
                metadata: settings.metadata,
            },
        ))
        .await?
        .into_inner();
    let pb::UpdateServiceResponse {} = answer;
    Ok(Json(json!({})))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct InstanceQuery {
    #[serde(default)]
    namespace: String,
    #[serde(default)]
    group: String,
    #[serde(default)]
    cluster: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InstanceSettings {
    #[serde(default)]
    weight: Option<f64>,
    #[serde(default)]
    enabled: Option<bool>,
}

/// The instance a path and query name: its service's namespace, group
/// and name, and its cluster, ip and port.
struct InstanceAt {
    namespace: String,
    group: String,
    service: String,
    cluster: String,
    ip: String,
    port: u32,
}

impl InstanceAt {
    fn read(
        path: Result<Path<(String, String, String)>, PathRejection>,
        query: Result<Query<InstanceQuery>, QueryRejection>,
    ) -> Result<InstanceAt, Refused> {
        let Path((service, ip, port)) = path.map_err(|err| invalid("path", err.body_text()))?;
        let Query(q) = query.map_err(|err| invalid("query", err.body_text()))?;
        let port = port
            .parse()
            .map_err(|_| invalid("port", format!("{port:?} is not a port number")))?;
        Ok(InstanceAt {
            namespace: q.namespace,
            group: q.group,
            service,
            cluster: q.cluster,
            ip,
            port,
        })
    }
}

async fn update_instance(
    State(service): State<RegistryService>,
    path: Result<Path<(String, String, String)>, PathRejection>,
    headers: HeaderMap,
    query: Result<Query<InstanceQuery>, QueryRejection>,
    body: Result<Json<InstanceSettings>, JsonRejection>,
) -> Result<Json<Value>, Refused> {
    let at = InstanceAt::read(path, query)?;
    let Json(settings) = body.map_err(|err| invalid("body", err.body_text()))?;
    let answer = service
        .update_instance(request(
            &headers,
            pb::UpdateInstanceRequest {
                namespace: at.namespace,
                group: at.group,
                service: at.service,
                cluster: at.cluster,
                ip: at.ip,
                port: at.port,
                weight: settings.weight,
                enabled: settings.enabled,
            },
        ))
        .await?
        .into_inner();
    Ok(Json(json!({"revision": answer.revision})))
}

async fn deregister(
    State(service): State<RegistryService>,
    path: Result<Path<(String, String, String)>, PathRejection>,
    headers: HeaderMap,
    query: Result<Query<InstanceQuery>, QueryRejection>,
) -> Result<Json<Value>, Refused> {
    let at = InstanceAt::read(path, query)?;
    let answer = service
        .deregister(request(
            &headers,
            pb::DeregisterRequest {
                namespace: at.namespace,
                group: at.group,
                service: at.service,
                cluster: at.cluster,
                ip: at.ip,
                port: at.port,
            },
        ))
        .await?
        .into_inner();
    Ok(Json(json!({"revision": answer.revision})))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChangesQuery {
    #[serde(default)]
    namespace: String,
    #[serde(default)]
    group: String,
    /// One service; every service of the group when absent.
    #[serde(default)]
    service: Option<String>,
    /// Changes to answer at most; 100 when absent.
    #[serde(default)]
    limit: Option<usize>,
}

/// The registry's recent changes, oldest first, with their revisions.
async fn changes(
    State(service): State<RegistryService>,
    headers: HeaderMap,
    query: Result<Query<ChangesQuery>, QueryRejection>,
) -> Result<Json<Value>, Refused> {
    use crate::registry::Selector;
    use crate::registry::model::{ChangeKind, GroupKey, ServiceKey};
    let Query(q) = query.map_err(|err| invalid("query", err.body_text()))?;
    let registry = service.registry();
    let max = registry.config().limits.max_page_size;
    let limit = match q.limit {
        None => max.min(100),
        Some(n) if n == 0 || n > max => {
            return Err(invalid("limit", format!("{n} is not within 1 to {max}")));
        }
        Some(n) => n,
    };
    let selector = match &q.service {
        Some(name) => Selector::Service(
            ServiceKey::parse(&q.namespace, &q.group, name).map_err(tonic::Status::from)?,
        ),
        None => {
            Selector::Group(GroupKey::parse(&q.namespace, &q.group).map_err(tonic::Status::from)?)
        }
    };
    let namespace = match &selector {
        Selector::Service(key) => key.namespace.clone(),
        Selector::Group(group) => group.namespace.clone(),
    };
    let token = super::grpc::presented(&request(&headers, ()));
    registry
        .authorize(
            token.as_deref(),
            crate::auth::Need::Read {
                namespace: &namespace,
            },
        )
        .map_err(tonic::Status::from)?;
    let (events, revision) = registry.recent_changes(&selector, limit);
    let changes: Vec<Value> = events
        .iter()
        .map(|event| {
            json!({
                "revision": event.revision,
                "kind": match event.kind {
                    ChangeKind::Put => "PUT",
                    ChangeKind::Removed => "REMOVED",
                },
                "service": event.instance.service.name.to_string(),
                "instance": instance_json(&super::grpc::to_pb(&event.instance)),
            })
        })
        .collect();
    Ok(Json(json!({"revision": revision, "changes": changes})))
}
