//! The registry's JSON API over plain HTTP, on the port its gRPC API
//! serves, under `/api/v1/`: what the console calls, and what anyone can
//! call with curl. Every handler is an adapter over the gRPC service's own
//! method, so a request is checked (its credential included: `Authorization:
//! Bearer smt_...`) and refused with the same rules and the same message;
//! a refusal's gRPC code becomes its HTTP status.
//!
//! ```text
//! GET    /api/v1/namespaces
//! GET    /api/v1/services?namespace=&group=&page=&page_size=&search=
//! GET    /api/v1/services/{service}?namespace=&group=&healthy_only=&cluster=
//! GET    /api/v1/services/{service}/watchers?namespace=&group=
//! PATCH  /api/v1/services/{service}?namespace=&group=      {"protect_threshold": 0.5, "metadata": {..}}
//! PATCH  /api/v1/services/{service}/instances/{ip}/{port}?namespace=&group=&cluster=   {"weight": 2, "enabled": false, "metadata": {..}}
//! DELETE /api/v1/services/{service}/instances/{ip}/{port}?namespace=&group=&cluster=
//! GET    /api/v1/changes?namespace=&group=&service=&limit=
//! GET    /api/v1/events?namespace=&group=&service=          Server-Sent Events
//! GET    /api/v1/cluster
//! ```
//!
//! The config centre's calls, under `/api/v1/configs`, are in [`configs`].
//!
//! The change feed, the namespaces and a service's watchers have no gRPC
//! twin (Watch streams what follows; these read what the registry holds):
//! they check the credential and their fields the way the handlers do,
//! with the same rules. The events stream is Watch, told to a browser.

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

pub(super) mod configs;
mod live;

use super::RegistryService;
use crate::pb::registry as pb;
use crate::pb::registry::registry_server::Registry as _;
use crate::registry::Liveness;
use crate::registry::model::ServiceKey;

/// The routes of the JSON API, served by `service`.
pub fn routes(service: RegistryService) -> axum::Router {
    axum::Router::new()
        .route("/api/v1/namespaces", get(namespaces))
        .route("/api/v1/services", get(list_services))
        .route(
            "/api/v1/services/{service}",
            get(get_service).patch(update_service),
        )
        .route(
            "/api/v1/services/{service}/instances/{ip}/{port}",
            delete(deregister).patch(update_instance),
        )
        .route("/api/v1/services/{service}/watchers", get(watchers))
        .route("/api/v1/changes", get(changes))
        .route("/api/v1/events", get(live::events))
        .route("/api/v1/cluster", get(cluster))
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

/// A path nothing on this port serves: for a gRPC call, UNIMPLEMENTED as
/// gRPC says it; for anything else (a browser, curl), a plain 404.
pub(super) async fn no_such_path(request: axum::extract::Request) -> Response {
    let grpc = request
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    if grpc {
        return tonic::Status::unimplemented(format!(
            "{} is not a method this server serves",
            request.uri().path()
        ))
        .into_http::<axum::body::Body>()
        .into_response();
    }
    (
        StatusCode::NOT_FOUND,
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; charset=utf-8",
        )],
        format!(
            "{} is not a page of this registry; the console is at /\n",
            request.uri().path()
        ),
    )
        .into_response()
}

/// A refusal as the API answers it: the gRPC code's HTTP status, and
/// `{"code": "NOT_FOUND", "message": "..."}`.
pub(super) struct Refused(tonic::Status);

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
    #[serde(default)]
    search: String,
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
                search: q.search,
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
    let key = (q.namespace.clone(), q.group.clone(), name.clone());
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
    // How each is kept alive, which only this API shows (a gRPC answer
    // carries no lease): read after the instances, so one registered in
    // between has no entry and shows none.
    let key = ServiceKey::parse(&key.0, &key.1, &key.2).map_err(tonic::Status::from)?;
    let liveness: HashMap<(String, String, u32), Liveness> = service
        .registry()
        .liveness(&key)
        .into_iter()
        .map(|(addr, l)| {
            (
                (
                    addr.cluster.to_string(),
                    addr.ip.to_string(),
                    addr.port as u32,
                ),
                l,
            )
        })
        .collect();
    let instances: Vec<Value> = answer
        .instances
        .iter()
        .map(|i| {
            let mut json = instance_json(i);
            let found = liveness.get(&(i.cluster.clone(), i.ip.clone(), i.port));
            let (lease, last) = match found {
                Some(Liveness::Persistent) => ("persistent", None),
                Some(Liveness::Alive { last_beat_ms }) => ("alive", *last_beat_ms),
                Some(Liveness::Orphaned { last_beat_ms }) => ("orphaned", *last_beat_ms),
                None => ("unknown", None),
            };
            json["lease"] = json!(lease);
            json["last_heartbeat_ms"] = json!(last);
            json
        })
        .collect();
    Ok(Json(json!({
        "namespace": answer.namespace,
        "group": answer.group,
        "name": answer.name,
        "revision": answer.revision,
        "protect_threshold": answer.protect_threshold,
        "protection_triggered": answer.protection_triggered,
        "metadata": answer.metadata,
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
    #[serde(default)]
    metadata: Option<HashMap<String, String>>,
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
                metadata: settings
                    .metadata
                    .map(|entries| pb::MetadataUpdate { entries }),
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

/// Every namespace the credential may read, with its groups and their
/// service counts.
async fn namespaces(
    State(service): State<RegistryService>,
    headers: HeaderMap,
) -> Result<Json<Value>, Refused> {
    use crate::auth::Need;
    let registry = service.registry();
    let token = super::grpc::presented(&request(&headers, ()));
    registry
        .authorize(token.as_deref(), Need::Describe)
        .map_err(tonic::Status::from)?;
    let namespaces: Vec<Value> = registry
        .namespaces()
        .into_iter()
        .filter(|(namespace, _)| {
            registry
                .authorize(token.as_deref(), Need::Read { namespace })
                .is_ok()
        })
        .map(|(namespace, groups)| {
            let groups: Vec<Value> = groups
                .iter()
                .map(|(group, services)| json!({"name": group.as_ref(), "services": services}))
                .collect();
            json!({"name": namespace.as_ref(), "groups": groups})
        })
        .collect();
    Ok(Json(json!({"namespaces": namespaces})))
}

/// Who watches a service: its own watchers, then its group's.
async fn watchers(
    State(service): State<RegistryService>,
    name: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    query: Result<Query<Scope>, QueryRejection>,
) -> Result<Json<Value>, Refused> {
    let Path(name) = name.map_err(|err| invalid("path", err.body_text()))?;
    let Query(scope) = query.map_err(|err| invalid("query", err.body_text()))?;
    let key =
        ServiceKey::parse(&scope.namespace, &scope.group, &name).map_err(tonic::Status::from)?;
    let registry = service.registry();
    let token = super::grpc::presented(&request(&headers, ()));
    registry
        .authorize(
            token.as_deref(),
            crate::auth::Need::Read {
                namespace: &key.namespace,
            },
        )
        .map_err(tonic::Status::from)?;
    let watchers: Vec<Value> = registry
        .watchers(&key)
        .iter()
        .map(|w| {
            json!({
                "id": w.id,
                "peer": w.who.peer.map(|p| p.to_string()),
                "scope": if w.whole_group { "group" } else { "service" },
                "since_ms": w.who.since_ms,
                "queued_bytes": w.queued_bytes,
                "by": w.who.by,
            })
        })
        .collect();
    Ok(Json(json!({"watchers": watchers})))
}

/// GetCluster: where the state lives, the registry nodes that are up, and
/// on etcd its members.
async fn cluster(
    State(service): State<RegistryService>,
    headers: HeaderMap,
) -> Result<Json<Value>, Refused> {
    let answer = service
        .get_cluster(request(&headers, pb::GetClusterRequest {}))
        .await?
        .into_inner();
    let members: Vec<Value> = answer
        .etcd_members
        .iter()
        .map(|m| {
            json!({
                "id": format!("{:x}", m.id),
                "name": m.name,
                "client_urls": m.client_urls,
                "leader": m.leader,
                "learner": m.learner,
            })
        })
        .collect();
    let nodes: Vec<Value> = answer
        .nodes
        .iter()
        .map(|n| {
            json!({
                "address": n.address,
                "started_ms": n.started_ms,
                "version": n.version,
                "answering": n.answering,
            })
        })
        .collect();
    Ok(Json(json!({
        "store": answer.store,
        "node": answer.node,
        "revision": answer.revision,
        "incarnation": answer.incarnation.to_string(),
        "nodes": nodes,
        "nodes_error": answer.nodes_error,
        "etcd_endpoints": answer.etcd_endpoints,
        "etcd_prefix": answer.etcd_prefix,
        "etcd_members": members,
        "etcd_error": answer.etcd_error,
    })))
}
