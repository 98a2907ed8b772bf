//! Nacos's 1.x open API over HTTP on the registry's port: the naming calls
//! under `/nacos/v1/ns/` and the login, as Nacos's HTTP clients (the npm
//! `nacos` package, Java 1.x, scripts with curl) make them.
//!
//! ```text
//! POST|PUT|PATCH|DELETE|GET /nacos/v1/ns/instance   register, update, deregister, detail
//! GET    /nacos/v1/ns/instance/list                 a service's instances
//! PUT    /nacos/v1/ns/instance/beat                 a heartbeat (re-registers from its beat)
//! GET|PUT|DELETE /nacos/v1/ns/service               service detail, update, delete
//! GET    /nacos/v1/ns/service/list                  a page of a group's service names
//! GET    /nacos/v1/ns/operator/metrics              {"status":"UP"}
//! POST   /nacos/v1/auth/login (and /auth/users/login)
//! ```
//!
//! A parameter may come in the query string or in a form body, for every
//! method, as Nacos reads them. Answers are Nacos's: `ok` or its JSON, and
//! a refusal is its HTTP status with the reason as plain text. An
//! instance registered here lives on its beats: its lease is beaten by
//! each `instance/beat`, and it is unhealthy, then gone, after its
//! timeouts without one. Every other path under `/nacos/v1/` and
//! `/nacos/v2/` answers 501, naming what is not served.

use std::collections::HashMap;
use std::str::FromStr;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, any, get, post, put};
use serde_json::{Value, json};
use tonic::{Code, Status};

use super::{
    NacosInstance, Placed, find_service, grouped, missing, nacos_code, now_ms, service_info,
    split_service, with_token,
};
use crate::auth::{Need, Scope};
use crate::pb::registry as pb;
use crate::pb::registry::registry_server::Registry as _;
use crate::registry::RegistryService;
use crate::registry::model::{DEFAULT_GROUP, DEFAULT_NAMESPACE, InstanceAddr, ServiceKey};

/// The largest form body read.
const MAX_FORM_BYTES: usize = 64 * 1024;

/// Nacos's beat answer codes: the instance was beaten, or is unknown.
const BEAT_OK: u32 = 10200;
const BEAT_UNKNOWN: u32 = 20404;

/// How long a Nacos client may keep its login, in seconds (shop-mesh
/// tokens last until revoked; a client logs in again after this).
const TOKEN_TTL_SECS: u64 = 18_000;

/// The routes of the open API, served by `face`.
pub fn routes(face: RegistryService) -> axum::Router {
    let served = |route: MethodRouter<RegistryService>| route.fallback(not_served);
    axum::Router::new()
        .route(
            "/nacos/v1/ns/instance",
            served(
                post(register)
                    .put(update)
                    .patch(update)
                    .delete(deregister)
                    .get(detail),
            ),
        )
        .route("/nacos/v1/ns/instance/list", served(get(list)))
        .route("/nacos/v1/ns/instance/beat", served(put(beat)))
        .route(
            "/nacos/v1/ns/service",
            served(
                get(service_detail)
                    .put(update_service)
                    .delete(delete_service),
            ),
        )
        .route("/nacos/v1/ns/service/list", served(get(service_list)))
        .route("/nacos/v1/ns/operator/metrics", served(get(metrics)))
        .route("/nacos/v1/auth/login", served(post(login)))
        .route("/nacos/v1/auth/users/login", served(post(login)))
        .route("/nacos/v1/{*rest}", any(not_served))
        .route("/nacos/v2/{*rest}", any(not_served))
        .with_state(face)
}

/// A Nacos HTTP call this registry does not serve: 501, naming it and
/// what is served.
async fn not_served(method: Method, uri: Uri) -> Response {
    let path = uri.path();
    let what = if path.contains("/cs/") {
        "Nacos's configuration API"
    } else {
        "this Nacos HTTP call"
    };
    text(
        StatusCode::NOT_IMPLEMENTED,
        format!(
            "{what} ({method} {path}) is not served by shop-mesh; it serves Nacos's naming open API \
             (/nacos/v1/ns/instance, instance/list, instance/beat, service, service/list, \
             operator/metrics), /nacos/v1/auth/login, and Nacos's 2.x gRPC API on this port + 1000\n"
        ),
    )
}

/// A plain-text answer, as Nacos gives its `ok` and its refusals.
fn text(status: StatusCode, body: impl Into<String>) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain;charset=UTF-8")],
        body.into(),
    )
        .into_response()
}

fn ok() -> Response {
    text(StatusCode::OK, "ok")
}

/// A refusal, as Nacos answers one: its status, the reason as text.
struct Refused(Status);

impl From<Status> for Refused {
    fn from(status: Status) -> Self {
        Refused(status)
    }
}

impl From<crate::registry::Error> for Refused {
    fn from(err: crate::registry::Error) -> Self {
        Refused(err.into())
    }
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(nacos_code(self.0.code()))
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        text(status, self.0.message())
    }
}

type Answer = Result<Response, Refused>;

/// A request's parameters, from its query string and its form body (the
/// query's first), values trimmed; and the credential it shows.
struct Params {
    values: HashMap<String, String>,
    token: Option<String>,
}

impl Params {
    async fn read(request: Request) -> Result<Self, Refused> {
        let (parts, body) = request.into_parts();
        let mut values = HashMap::new();
        let mut take = |bytes: &[u8]| {
            for (key, value) in form_urlencoded::parse(bytes) {
                values
                    .entry(key.into_owned())
                    .or_insert_with(|| value.trim().to_string());
            }
        };
        take(parts.uri.query().unwrap_or("").as_bytes());
        let form = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_none_or(|v| v.starts_with("application/x-www-form-urlencoded"));
        if form {
            let body = axum::body::to_bytes(body, MAX_FORM_BYTES)
                .await
                .map_err(|_| {
                    Status::invalid_argument(format!(
                        "the form body is over {MAX_FORM_BYTES} bytes, or broke off"
                    ))
                })?;
            take(&body);
        }
        let token = presented(&parts.headers, &values);
        Ok(Self { values, token })
    }

    /// A parameter, if given and not blank.
    fn get(&self, key: &str) -> Option<&str> {
        self.values
            .get(key)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    fn required(&self, key: &str) -> Result<&str, Status> {
        self.get(key).ok_or_else(|| missing(key))
    }

    fn parsed<T: FromStr>(&self, key: &str, what: &str) -> Result<Option<T>, Status> {
        self.get(key)
            .map(|v| {
                v.parse().map_err(|_| {
                    Status::invalid_argument(format!("Param '{key}': {v:?} is not {what}."))
                })
            })
            .transpose()
    }

    /// A boolean under the first of `keys` given.
    fn flag(&self, keys: &[&str]) -> Result<Option<bool>, Status> {
        let Some(key) = keys.iter().find(|k| self.get(k).is_some()) else {
            return Ok(None);
        };
        match self.get(key).map(str::to_ascii_lowercase).as_deref() {
            Some("true") => Ok(Some(true)),
            Some("false") => Ok(Some(false)),
            _ => Err(Status::invalid_argument(format!(
                "Param '{key}': {:?} is not true or false.",
                self.values[*key]
            ))),
        }
    }

    /// Namespace, group and name of the service named (`groupName`, or
    /// the group carried in `serviceName`).
    fn scope(&self) -> Result<(String, String, String), Status> {
        let service = self.required("serviceName")?;
        let (group, name) = split_service(service, self.get("groupName").unwrap_or(""))?;
        let namespace = self.get("namespaceId").unwrap_or("").to_string();
        Ok((namespace, group, name))
    }

    fn cluster(&self) -> &str {
        self.get("clusterName")
            .or_else(|| self.get("cluster"))
            .unwrap_or("")
    }

    fn port(&self) -> Result<i64, Status> {
        self.required("port")?;
        Ok(self.parsed("port", "a port")?.unwrap_or_default())
    }

    /// `metadata`: a JSON object, or Nacos's older `k1=v1,k2=v2`.
    fn metadata(&self) -> Result<Option<HashMap<String, String>>, Status> {
        self.get("metadata").map(parse_metadata).transpose()
    }

    /// The instance the parameters describe; missing fields stay missing.
    fn instance(&self) -> Result<NacosInstance, Status> {
        Ok(NacosInstance {
            ip: Some(self.required("ip")?.to_string()),
            port: Some(self.port()?),
            weight: self.parsed("weight", "a number")?,
            enabled: self.flag(&["enabled", "enable"])?,
            ephemeral: self.flag(&["ephemeral"])?,
            cluster_name: Some(self.cluster().to_string()),
            cluster: None,
            metadata: self.metadata()?,
        })
    }

    /// `message` as a call of the registry's gRPC API showing this
    /// request's credential.
    fn call<T>(&self, message: T) -> tonic::Request<T> {
        with_token(self.token.as_deref(), message)
    }

    /// Registers `instance` as this request's caller: a new lease, or the
    /// one the instance has (an HTTP client's instance lives on its
    /// beats).
    async fn register(
        &self,
        face: &RegistryService,
        instance: pb::Instance,
    ) -> Result<pb::RegisterResponse, Status> {
        let registered = face
            .register(self.call(pb::RegisterRequest {
                instance: Some(instance),
                lease_id: 0,
            }))
            .await?;
        Ok(registered.into_inner())
    }
}

/// The credential a request shows: Nacos's `accessToken` parameter, an
/// `Authorization: Bearer` header, or (as the npm client sends it on every
/// request) a `password` parameter; a shop-mesh token in each case.
fn presented(headers: &HeaderMap, values: &HashMap<String, String>) -> Option<String> {
    let param = |key: &str| values.get(key).filter(|v| !v.is_empty()).cloned();
    param("accessToken")
        .or_else(|| {
            let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
            let token = value
                .strip_prefix("Bearer ")
                .or_else(|| value.strip_prefix("bearer "))
                .unwrap_or(value);
            Some(token.trim().to_string())
        })
        .or_else(|| param("password"))
}

/// Nacos's metadata parameter: a JSON object (values that are not
/// strings are kept as their JSON text), or `k1=v1,k2=v2`.
fn parse_metadata(text: &str) -> Result<HashMap<String, String>, Status> {
    let invalid = || {
        Status::invalid_argument(format!(
            "Param 'metadata': {text:?} is neither a JSON object nor k1=v1,k2=v2."
        ))
    };
    if text.starts_with('{') {
        let object: serde_json::Map<String, Value> =
            serde_json::from_str(text).map_err(|_| invalid())?;
        return Ok(object
            .into_iter()
            .map(|(k, v)| match v {
                Value::String(s) => (k, s),
                other => (k, other.to_string()),
            })
            .collect());
    }
    text.split(',')
        .filter(|pair| !pair.trim().is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').ok_or_else(invalid)?;
            Ok((k.trim().to_string(), v.trim().to_string()))
        })
        .collect()
}

/// POST /nacos/v1/ns/instance: registers an instance (again: an update).
async fn register(State(face): State<RegistryService>, request: Request) -> Answer {
    let p = Params::read(request).await?;
    let (namespace, group, service) = p.scope()?;
    let at = Placed {
        namespace: &namespace,
        group: &group,
        service: &service,
    };
    let instance = p.instance()?.to_pb(&at)?;
    p.register(&face, instance).await?;
    Ok(ok())
}

/// DELETE /nacos/v1/ns/instance: `ok` also when there was no such
/// instance, as Nacos answers.
async fn deregister(State(face): State<RegistryService>, request: Request) -> Answer {
    let p = Params::read(request).await?;
    let (namespace, group, service) = p.scope()?;
    let ip = p.required("ip")?.to_string();
    let port = u32::try_from(p.port()?).unwrap_or(0);
    let gone = face
        .deregister(p.call(pb::DeregisterRequest {
            namespace,
            group,
            service,
            cluster: p.cluster().to_string(),
            ip,
            port,
        }))
        .await;
    match gone {
        Ok(_) => Ok(ok()),
        Err(status) if status.code() == Code::NotFound => Ok(ok()),
        Err(status) => Err(status.into()),
    }
}

/// The instance a request names, as the registry answers it to the
/// request's credential.
async fn named_instance(face: &RegistryService, p: &Params) -> Result<pb::Instance, Status> {
    let (namespace, group, service) = p.scope()?;
    let addr = InstanceAddr::parse(
        p.cluster(),
        p.required("ip")?,
        u32::try_from(p.port()?).unwrap_or(0),
    )?;
    let cluster = addr.cluster.to_string();
    let found = find_service(
        face,
        p.token.as_deref(),
        (&namespace, &group, &service),
        &cluster,
        false,
        false,
    )
    .await?;
    let ip = addr.ip.to_string();
    found
        .into_iter()
        .flat_map(|s| s.instances)
        .find(|i| i.ip == ip && i.port == u32::from(addr.port))
        .ok_or_else(|| {
            let group = if group.is_empty() {
                DEFAULT_GROUP
            } else {
                &group
            };
            Status::not_found(format!(
                "no instance {ip}:{} in cluster {cluster} of service {}",
                addr.port,
                grouped(group, &service)
            ))
        })
}

/// PUT and PATCH /nacos/v1/ns/instance: changes what is given of a known
/// instance (weight, enabled, metadata) in place, as UpdateInstance does:
/// its health, lease and timings stay as they are (an update is not a
/// sign of life).
async fn update(State(face): State<RegistryService>, request: Request) -> Answer {
    let p = Params::read(request).await?;
    let (namespace, group, service) = p.scope()?;
    let ip = p.required("ip")?.to_string();
    let port = u32::try_from(p.port()?).unwrap_or(0);
    let weight = p.parsed("weight", "a number")?;
    let enabled = p.flag(&["enabled", "enable"])?;
    let metadata = p.metadata()?.map(|entries| pb::MetadataUpdate { entries });
    face.update_instance(p.call(pb::UpdateInstanceRequest {
        namespace,
        group,
        service,
        cluster: p.cluster().to_string(),
        ip,
        port,
        weight,
        enabled,
        metadata,
    }))
    .await?;
    Ok(ok())
}

/// GET /nacos/v1/ns/instance: one instance.
async fn detail(State(face): State<RegistryService>, request: Request) -> Answer {
    let p = Params::read(request).await?;
    let i = named_instance(&face, &p).await?;
    Ok(axum::Json(json!({
        "service": grouped(&i.group, &i.service),
        "ip": i.ip,
        "port": i.port,
        "clusterName": i.cluster,
        "weight": i.weight.unwrap_or(1.0),
        "healthy": i.healthy,
        "enabled": i.enabled.unwrap_or(true),
        "ephemeral": i.ephemeral.unwrap_or(true),
        "instanceId": i.instance_id,
        "metadata": i.metadata,
    }))
    .into_response())
}

/// GET /nacos/v1/ns/instance/list: the enabled instances of a service (of
/// `clusters`, healthy ones only if `healthyOnly`); none for a service the
/// registry does not know, as Nacos answers.
async fn list(State(face): State<RegistryService>, request: Request) -> Answer {
    let p = Params::read(request).await?;
    let (namespace, group, service) = p.scope()?;
    let clusters = p.get("clusters").unwrap_or("");
    let healthy_only = p.flag(&["healthyOnly"])?.unwrap_or(false);
    let found = find_service(
        &face,
        p.token.as_deref(),
        (&namespace, &group, &service),
        clusters,
        healthy_only,
        true,
    )
    .await?;
    let group = if group.is_empty() {
        DEFAULT_GROUP
    } else {
        &group
    };
    let name = grouped(group, &service);
    let mut info = service_info(&name, group, clusters, found.as_ref(), &name, now_ms());
    // Nacos 1.x clients read the name as `dom`.
    info.dom = Some(&name);
    Ok(axum::Json(info).into_response())
}

/// PUT /nacos/v1/ns/instance/beat: a heartbeat of an instance, named by
/// the parameters or by the `beat` JSON the clients send. An unknown
/// instance is registered from its beat when there is one (the client
/// outlived its instance's delete timeout), and answered 20404 when there
/// is not, on which the clients register again.
async fn beat(State(face): State<RegistryService>, request: Request) -> Answer {
    let p = Params::read(request).await?;
    let (namespace, group, service) = p.scope()?;
    let sent: Option<NacosInstance> = p
        .get("beat")
        .map(|b| {
            serde_json::from_str(b).map_err(|err| {
                Status::invalid_argument(format!("Param 'beat': not a beat's JSON ({err})"))
            })
        })
        .transpose()?;
    let ip = sent
        .as_ref()
        .and_then(|b| b.ip.clone())
        .or_else(|| p.get("ip").map(String::from))
        .ok_or_else(|| missing("ip"))?;
    let port = match sent.as_ref().and_then(|b| b.port) {
        Some(port) => port,
        None => p.port()?,
    };
    let cluster = sent
        .as_ref()
        .and_then(|b| b.cluster_name.clone().or_else(|| b.cluster.clone()))
        .filter(|c| !c.is_empty())
        .unwrap_or_else(|| p.cluster().to_string());
    let key = ServiceKey::parse(&namespace, &group, &service)?;
    let addr = InstanceAddr::parse(&cluster, &ip, u32::try_from(port).unwrap_or(0))?;
    let registry = face.registry();
    // Checked before anything is looked up, as any write is: what a beat
    // answers must not tell a caller who may not write the service
    // whether an instance is there.
    registry.authorize(
        p.token.as_deref(),
        Need::Write {
            namespace: &key.namespace,
            service: &key.name,
        },
    )?;
    let still_there = || registry.instance(&key, &addr).is_some();
    let beaten = match registry.instance(&key, &addr) {
        Some(known) if known.ephemeral => {
            // The lease may keep instances of other services too.
            match registry.authorize_lease(p.token.as_deref(), known.lease) {
                Ok(()) => match registry.beat(known.lease).await {
                    // Beaten, unless the instance was removed meanwhile
                    // (its lease may outlive it).
                    Ok(interval) => still_there().then_some(interval),
                    Err(crate::registry::Error::NotFound(_)) => None,
                    Err(err) => return Err(err.into()),
                },
                // Its lease emptied between the lookup and the check.
                Err(_) if !still_there() => None,
                Err(err) => return Err(err.into()),
            }
        }
        // Persistent instances are probed; their beats change nothing.
        Some(_) => Some(registry.config().heartbeat_interval),
        None => None,
    };
    let interval = match (beaten, sent) {
        (Some(interval), _) => interval.as_millis() as u64,
        (None, Some(sent)) => {
            let at = Placed {
                namespace: &namespace,
                group: &group,
                service: &service,
            };
            let instance = NacosInstance {
                ip: Some(ip),
                port: Some(port),
                cluster_name: Some(cluster),
                cluster: None,
                ..sent
            }
            .to_pb(&at)?;
            p.register(&face, instance).await?.heartbeat_interval_ms
        }
        (None, None) => {
            return Ok(axum::Json(json!({
                "clientBeatInterval": registry.config().heartbeat_interval.as_millis() as u64,
                "code": BEAT_UNKNOWN,
                "lightBeatEnabled": true,
            }))
            .into_response());
        }
    };
    Ok(axum::Json(json!({
        "clientBeatInterval": interval,
        "code": BEAT_OK,
        "lightBeatEnabled": true,
    }))
    .into_response())
}

/// GET /nacos/v1/ns/service: a service's settings and clusters.
async fn service_detail(State(face): State<RegistryService>, request: Request) -> Answer {
    let p = Params::read(request).await?;
    let (namespace, group, service) = p.scope()?;
    let found = find_service(
        &face,
        p.token.as_deref(),
        (&namespace, &group, &service),
        "",
        false,
        false,
    )
    .await?
    .ok_or_else(|| {
        Status::not_found(format!(
            "service {} is not found in namespace {}",
            p.get("serviceName").unwrap_or_default(),
            found_namespace(&namespace)
        ))
    })?;
    let mut clusters: Vec<&str> = found.instances.iter().map(|i| i.cluster.as_str()).collect();
    clusters.sort_unstable();
    clusters.dedup();
    let clusters: Vec<Value> = clusters
        .into_iter()
        .map(|name| json!({"name": name, "healthChecker": {"type": "NONE"}, "metadata": {}}))
        .collect();
    Ok(axum::Json(json!({
        "namespaceId": found.namespace,
        "groupName": found.group,
        "name": found.name,
        "protectThreshold": found.protect_threshold,
        "metadata": found.metadata,
        "selector": {"type": "none", "contextType": "NONE"},
        "clusters": clusters,
    }))
    .into_response())
}

fn found_namespace(namespace: &str) -> &str {
    if namespace.is_empty() {
        DEFAULT_NAMESPACE
    } else {
        namespace
    }
}

/// PUT /nacos/v1/ns/service: sets a known service's protect threshold
/// (required, as Nacos has it) and, if given, its metadata.
async fn update_service(State(face): State<RegistryService>, request: Request) -> Answer {
    let p = Params::read(request).await?;
    let (namespace, group, service) = p.scope()?;
    p.required("protectThreshold")?;
    let protect_threshold = p
        .parsed("protectThreshold", "a number from 0 to 1")?
        .unwrap_or_default();
    let metadata = match p.metadata()? {
        Some(metadata) => metadata,
        None => find_service(
            &face,
            p.token.as_deref(),
            (&namespace, &group, &service),
            "",
            false,
            false,
        )
        .await?
        .map(|s| s.metadata)
        .unwrap_or_default(),
    };
    face.update_service(p.call(pb::UpdateServiceRequest {
        namespace,
        group,
        service,
        protect_threshold,
        metadata,
    }))
    .await?;
    Ok(ok())
}

/// DELETE /nacos/v1/ns/service: deletes a service with no instance left.
async fn delete_service(State(face): State<RegistryService>, request: Request) -> Answer {
    let p = Params::read(request).await?;
    let (namespace, group, service) = p.scope()?;
    face.delete_service(p.call(pb::DeleteServiceRequest {
        namespace,
        group,
        service,
    }))
    .await?;
    Ok(ok())
}

/// GET /nacos/v1/ns/service/list: page `pageNo` (from 1) of `pageSize`
/// names of a group's services, and how many it has. A page larger than
/// the registry's is gathered from several of its pages, since clients
/// ask for every service at once (Spring Cloud's asks for 2^31 - 1).
async fn service_list(State(face): State<RegistryService>, request: Request) -> Answer {
    let p = Params::read(request).await?;
    p.required("pageNo")?;
    p.required("pageSize")?;
    let page_no: u64 = p.parsed("pageNo", "a page number")?.unwrap_or(1);
    let page_size: u64 = p.parsed("pageSize", "a page size")?.unwrap_or(0);
    if page_no == 0 || page_size == 0 {
        return Err(
            Status::invalid_argument("Param 'pageNo' and 'pageSize' must be at least 1.").into(),
        );
    }
    let namespace = p.get("namespaceId").unwrap_or("").to_string();
    let group = p.get("groupName").unwrap_or("").to_string();
    let max = face.registry().config().limits.max_page_size.max(1) as u64;
    let mut skip = (page_no - 1).saturating_mul(page_size);
    let mut page = skip / max + 1;
    skip %= max;
    let mut names: Vec<String> = Vec::new();
    let count = loop {
        let answer = face
            .list_services(p.call(pb::ListServicesRequest {
                namespace: namespace.clone(),
                group: group.clone(),
                page: u32::try_from(page).unwrap_or(u32::MAX),
                page_size: max as u32,
                search: String::new(),
            }))
            .await?
            .into_inner();
        let fetched = answer.services.len() as u64;
        names.extend(
            answer
                .services
                .into_iter()
                .skip(skip as usize)
                .map(|s| s.name)
                .take((page_size - names.len() as u64) as usize),
        );
        skip = 0;
        if fetched < max || names.len() as u64 >= page_size {
            break answer.total;
        }
        page += 1;
    };
    Ok(axum::Json(json!({"count": count, "doms": names})).into_response())
}

/// GET /nacos/v1/ns/operator/metrics: the registry is up (Nacos's clients
/// ask before they trust a server).
async fn metrics() -> Response {
    axum::Json(json!({"status": "UP"})).into_response()
}

/// POST /nacos/v1/auth/login: a shop-mesh token, shown as the password,
/// becomes the client's accessToken; the username is the client's own.
async fn login(State(face): State<RegistryService>, request: Request) -> Answer {
    let p = Params::read(request).await?;
    let password = p.get("password").unwrap_or("");
    let grant = face
        .registry()
        .authorize(Some(password), Need::Authenticated)
        .map_err(|err| {
            let status = Status::from(err);
            Status::permission_denied(format!(
                "{}; log in with a shop-mesh token (shop-mesh token create) as the password",
                status.message()
            ))
        })?;
    let username = p
        .get("username")
        .map(String::from)
        .or_else(|| grant.as_ref().map(|g| g.name.clone()))
        .unwrap_or_default();
    let admin = grant
        .as_ref()
        .is_none_or(|g| matches!(g.scope, Scope::Admin));
    let mut answer = axum::Json(json!({
        "accessToken": password,
        "tokenTtl": TOKEN_TTL_SECS,
        "globalAdmin": admin,
        "username": username,
    }))
    .into_response();
    if let Ok(value) = HeaderValue::from_str(&format!("Bearer {password}")) {
        answer.headers_mut().insert(header::AUTHORIZATION, value);
    }
    Ok(answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_is_json_or_nacos_pairs() {
        let json = parse_metadata(r#"{"version":"2","weight":3}"#).unwrap();
        assert_eq!(json["version"], "2");
        assert_eq!(json["weight"], "3");
        let pairs = parse_metadata("a=1, b = 2").unwrap();
        assert_eq!(pairs["a"], "1");
        assert_eq!(pairs["b"], "2");
        let err = parse_metadata("{not json").unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains("metadata"), "{err:?}");
        assert!(parse_metadata("novalue").is_err());
    }
}
