//! Nacos 2.x's gRPC API, on the registry's port + 1000: what the 2.x and
//! 3.x SDKs (Java, Python, Go, Rust, ...) speak.
//!
//! A client opens one HTTP/2 connection and makes it a Nacos connection:
//! a unary `ServerCheckRequest` names it, and a `ConnectionSetupRequest` on
//! its `requestBiStream` sets it up (the Rust SDK does these the other way
//! round). Its unary requests are tied to it by the peer address they
//! share, as Nacos's own server ties them by the transport. Until it is
//! set up, a request is refused with Nacos's 301, on which clients
//! reconnect.
//!
//! A connection is a KeepAlive session: its ephemeral instances hang on one
//! lease, which the connection keeps alive while it is open and which is
//! orphaned the moment it breaks, so they are unhealthy at once (and gone
//! after their delete timeout), as with a broken KeepAlive stream. A
//! subscription is a watch of the service; each change it brings is
//! pushed down the bi-stream as a `NotifySubscriberRequest`.

mod config;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status};

use super::{
    NacosInstance, Placed, find_service, nacos_code, now_ms, service_info, split_service,
    with_token,
};
use crate::auth::Need;
use crate::pb::nacos::bi_request_stream_server::{BiRequestStream, BiRequestStreamServer};
use crate::pb::nacos::request_server::{Request as RequestService, RequestServer};
use crate::pb::nacos::{Metadata, Payload};
use crate::pb::registry as pb;
use crate::pb::registry::registry_server::Registry as _;
use crate::registry::model::{InstanceAddr, InstanceSpec, LeaseId, ServiceKey};
use crate::registry::watch::{Selector, WatchItem, Watcher};
use crate::registry::{KeepAlive, Registry, RegistryService};
use crate::shutdown::Shutdown;

/// Nacos's code for a request on a connection that is not set up.
const UNREGISTERED: u16 = 301;
/// Nacos's code for a request type its server has no handler for.
const NO_HANDLER: u16 = 302;

/// How long a connection that was named (ServerCheck) may wait for its
/// bi-stream before it is forgotten.
const SETUP_WAIT: Duration = Duration::from_secs(60);

/// Pushes queued for one connection before its subscriptions wait.
const PUSH_QUEUE: usize = 64;

/// The request types served; any other is answered [`NO_HANDLER`].
const SERVED: &[&str] = &[
    "ServerCheckRequest",
    "HealthCheckRequest",
    "InstanceRequest",
    "PersistentInstanceRequest",
    "BatchInstanceRequest",
    "ServiceQueryRequest",
    "SubscribeServiceRequest",
    "ServiceListRequest",
    "ConfigQueryRequest",
    "ConfigPublishRequest",
    "ConfigRemoveRequest",
    "ConfigBatchListenRequest",
];

/// The 2.x gRPC API: its `Request` and `BiRequestStream` services share it.
#[derive(Clone)]
pub struct Remote {
    shared: Arc<Shared>,
}

struct Shared {
    face: RegistryService,
    /// The config centre's gRPC face, which config requests go through.
    configs: crate::registry::configs::grpc::ConfigService,
    registry: Registry,
    /// Connections by the peer address of their HTTP/2 connection.
    connections: parking_lot::Mutex<HashMap<SocketAddr, Arc<Connection>>>,
    /// The id of the next push, over all connections, as Nacos numbers
    /// them.
    pushes: AtomicU64,
    shutdown: Shutdown,
}

/// One client's connection.
struct Connection {
    id: String,
    peer: SocketAddr,
    named_at: Instant,
    /// Its ConnectionSetupRequest came: it may make requests.
    set_up: AtomicBool,
    /// Its bi-stream's way out, once open: where pushes go.
    outbound: parking_lot::Mutex<Option<mpsc::Sender<Result<Payload, Status>>>>,
    /// What it holds; None once it has ended.
    held: tokio::sync::Mutex<Option<Held>>,
    /// The last `lastRefTime` answered: each answer's is later, since a
    /// client drops one no newer than what it holds.
    last_ref_time: AtomicU64,
}

/// What a connection holds in the registry.
struct Held {
    /// The session its lease is attached to: dropped, the lease is
    /// orphaned.
    session: KeepAlive,
    /// The lease its ephemeral instances hang on; 0 before the first.
    lease: LeaseId,
    /// Its ephemeral instances, for a batch registration to replace.
    instances: HashSet<(ServiceKey, InstanceAddr)>,
    /// Its subscriptions, by service and the clusters asked for.
    subscriptions: HashMap<(ServiceKey, String), Following>,
    /// The config items it listens to.
    config_listens: HashMap<crate::registry::configs::model::ConfigKey, Following>,
}

/// A subscription's task, stopped when the subscription is dropped.
struct Following(tokio::task::JoinHandle<()>);

impl Drop for Following {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Remote {
    /// The API over `face`'s registry; connections end when `shutdown`
    /// fires.
    pub fn new(face: RegistryService, shutdown: Shutdown) -> Remote {
        Remote {
            shared: Arc::new(Shared {
                configs: crate::registry::configs::grpc::ConfigService::new(
                    face.registry().clone(),
                    shutdown.clone(),
                ),
                registry: face.registry().clone(),
                face,
                connections: parking_lot::Mutex::new(HashMap::new()),
                pushes: AtomicU64::new(1),
                shutdown,
            }),
        }
    }

    /// Its two gRPC services, as routes, each reading requests up to
    /// `max_message_size`.
    pub fn routes(&self, max_message_size: usize) -> tonic::service::Routes {
        tonic::service::Routes::new(
            RequestServer::new(self.clone()).max_decoding_message_size(max_message_size),
        )
        .add_service(
            BiRequestStreamServer::new(self.clone()).max_decoding_message_size(max_message_size),
        )
    }
}

impl Shared {
    /// The connection of `peer`, named now if it has no name yet.
    fn name(&self, peer: SocketAddr) -> Arc<Connection> {
        let mut connections = self.connections.lock();
        if let Some(found) = connections.get(&peer) {
            return found.clone();
        }
        // Peers that were named and never opened their stream go now.
        connections.retain(|_, c| c.outbound.lock().is_some() || c.named_at.elapsed() < SETUP_WAIT);
        let connection = Arc::new(Connection {
            id: format!("{}_{}_{}", now_ms(), peer.ip(), peer.port()),
            peer,
            named_at: Instant::now(),
            set_up: AtomicBool::new(false),
            outbound: parking_lot::Mutex::new(None),
            held: tokio::sync::Mutex::new(Some(Held {
                session: self.registry.keep_alive(),
                lease: 0,
                instances: HashSet::new(),
                subscriptions: HashMap::new(),
                config_listens: HashMap::new(),
            })),
            last_ref_time: AtomicU64::new(0),
        });
        connections.insert(peer, connection.clone());
        connection
    }

    /// The set-up connection of `peer`, if it has one.
    fn connection(&self, peer: Option<SocketAddr>) -> Option<Arc<Connection>> {
        let found = self.connections.lock().get(&peer?).cloned()?;
        found.set_up.load(Ordering::Acquire).then_some(found)
    }

    /// Ends `connection`: forgets it, orphans its lease and stops its
    /// subscriptions. On `handing_over` (this registry stops), a cluster's
    /// other nodes keep its instances while the client moves to them.
    async fn end(&self, connection: &Arc<Connection>, handing_over: bool) {
        {
            let mut connections = self.connections.lock();
            if connections
                .get(&connection.peer)
                .is_some_and(|c| Arc::ptr_eq(c, connection))
            {
                connections.remove(&connection.peer);
            }
        }
        *connection.outbound.lock() = None;
        if let Some(mut held) = connection.held.lock().await.take() {
            if handing_over {
                held.session.hand_over();
            }
            tracing::debug!(connection = %connection.id, instances = held.instances.len(), "nacos connection ended");
        }
    }
}

impl Connection {
    /// A `lastRefTime` later than every one answered before.
    fn next_ref_time(&self) -> u64 {
        let now = now_ms();
        let mut last = self.last_ref_time.load(Ordering::Relaxed);
        loop {
            let next = now.max(last + 1);
            match self.last_ref_time.compare_exchange_weak(
                last,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return next,
                Err(seen) => last = seen,
            }
        }
    }
}

/// A request's envelope: the fields every Nacos request carries.
#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct Envelope {
    request_id: Option<String>,
    headers: Option<HashMap<String, String>>,
}

/// A naming request's service.
#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct Naming {
    namespace: Option<String>,
    service_name: Option<String>,
    group_name: Option<String>,
}

impl Naming {
    /// Namespace, group and name, Nacos's defaults filled in by the
    /// registry.
    fn scope(&self) -> Result<(String, String, String), Status> {
        let service = self
            .service_name
            .as_deref()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| super::missing("serviceName"))?;
        let (group, name) = split_service(service, self.group_name.as_deref().unwrap_or(""))?;
        Ok((self.namespace.clone().unwrap_or_default(), group, name))
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct InstanceRequest {
    #[serde(flatten)]
    naming: Naming,
    r#type: Option<String>,
    instance: Option<NacosInstance>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct BatchInstanceRequest {
    #[serde(flatten)]
    naming: Naming,
    r#type: Option<String>,
    instances: Option<Vec<NacosInstance>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct ServiceQueryRequest {
    #[serde(flatten)]
    naming: Naming,
    cluster: Option<String>,
    healthy_only: Option<bool>,
    /// What the Python SDK sends for `healthyOnly`.
    health_only: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct SubscribeServiceRequest {
    #[serde(flatten)]
    naming: Naming,
    subscribe: Option<bool>,
    clusters: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct ServiceListRequest {
    namespace: Option<String>,
    group_name: Option<String>,
    page_no: Option<u32>,
    page_size: Option<u32>,
    selector: Option<String>,
}

/// One unary request, read.
struct Call<'a> {
    kind: &'a str,
    request_id: String,
    token: Option<String>,
    body: Value,
}

impl Call<'_> {
    fn parse<T: DeserializeOwned>(&self) -> Result<T, Status> {
        T::deserialize(&self.body).map_err(|err| {
            Status::invalid_argument(format!("the {} does not read: {err}", self.kind))
        })
    }
}

/// A payload of `kind` carrying `body` as JSON.
fn payload(kind: &str, body: &Value) -> Payload {
    Payload {
        metadata: Some(Metadata {
            r#type: kind.to_string(),
            client_ip: String::new(),
            headers: HashMap::new(),
        }),
        body: Some(prost_types::Any {
            type_url: String::new(),
            value: serde_json::to_vec(body).unwrap_or_default(),
        }),
    }
}

/// A successful answer of `kind` with `fields`.
fn answer(kind: &str, request_id: &str, mut fields: Value) -> Payload {
    if let Value::Object(map) = &mut fields {
        map.insert("resultCode".into(), json!(200));
        map.insert("errorCode".into(), json!(0));
        map.entry("message").or_insert_with(|| json!(""));
        map.insert("requestId".into(), json!(request_id));
        map.insert("success".into(), json!(true));
    }
    payload(kind, &fields)
}

/// Nacos's `ErrorResponse`: `code` (Nacos's) and a message a person can
/// act on.
fn refusal(code: u16, request_id: &str, message: &str) -> Payload {
    // Nacos answers its connection codes (3xx) with resultCode 500, and
    // any other refusal with the code in both.
    let result = if (300..400).contains(&code) {
        500
    } else {
        code
    };
    payload(
        "ErrorResponse",
        &json!({
            "resultCode": result,
            "errorCode": code,
            "message": message,
            "requestId": request_id,
            "success": false,
        }),
    )
}

#[tonic::async_trait]
impl RequestService for Remote {
    async fn request(
        &self,
        request: tonic::Request<Payload>,
    ) -> Result<tonic::Response<Payload>, Status> {
        let peer = request.remote_addr();
        let payload = request.into_inner();
        let metadata = payload.metadata.unwrap_or_default();
        let body: Value = match payload.body.as_ref().map(|b| b.value.as_slice()) {
            None | Some([]) => json!({}),
            Some(bytes) => serde_json::from_slice(bytes).map_err(|err| {
                Status::invalid_argument(format!(
                    "the body of a {} is not JSON: {err}",
                    metadata.r#type
                ))
            })?,
        };
        let envelope = Envelope::deserialize(&body).unwrap_or_default();
        let token = metadata
            .headers
            .get("accessToken")
            .or_else(|| envelope.headers.as_ref()?.get("accessToken"))
            .cloned();
        let call = Call {
            kind: &metadata.r#type,
            request_id: envelope.request_id.unwrap_or_default(),
            token,
            body,
        };
        Ok(tonic::Response::new(self.answer(peer, &call).await))
    }
}

impl Remote {
    async fn answer(&self, peer: Option<SocketAddr>, call: &Call<'_>) -> Payload {
        let id = call.request_id.as_str();
        if !SERVED.contains(&call.kind) {
            return refusal(
                NO_HANDLER,
                id,
                &format!(
                    "RequestHandler Not Found: shop-mesh serves Nacos's naming and config requests ({}); {:?} is not one of them",
                    SERVED.join(", "),
                    call.kind
                ),
            );
        }
        if call.kind == "ServerCheckRequest" {
            let Some(peer) = peer else {
                return refusal(500, id, "the connection's peer address is unknown");
            };
            let connection = self.shared.name(peer);
            return answer(
                "ServerCheckResponse",
                id,
                json!({"connectionId": connection.id, "supportAbilityNegotiation": false}),
            );
        }
        let Some(connection) = self.shared.connection(peer) else {
            return refusal(
                UNREGISTERED,
                id,
                "Connection is unregistered: send a ConnectionSetupRequest on requestBiStream first",
            );
        };
        let handled = match call.kind {
            "HealthCheckRequest" => Ok(answer("HealthCheckResponse", id, json!({}))),
            "InstanceRequest" => self.instance(&connection, call, false).await,
            "PersistentInstanceRequest" => self.instance(&connection, call, true).await,
            "BatchInstanceRequest" => self.batch(&connection, call).await,
            "ServiceQueryRequest" => self.query(&connection, call).await,
            "SubscribeServiceRequest" => self.subscribe(&connection, call).await,
            "ServiceListRequest" => self.list(call).await,
            "ConfigQueryRequest" => self.config_query(&connection, call).await,
            "ConfigPublishRequest" => self.config_publish(&connection, call).await,
            "ConfigRemoveRequest" => self.config_remove(call).await,
            "ConfigBatchListenRequest" => self.config_listen(&connection, call).await,
            other => Err(Status::unimplemented(format!("{other:?} is not served"))),
        };
        handled.unwrap_or_else(|status| {
            let message = match status.code() {
                // Nacos clients show a token as their accessToken.
                Code::Unauthenticated => format!(
                    "{} (a Nacos client shows it as its accessToken)",
                    status.message()
                ),
                _ => status.message().to_string(),
            };
            refusal(nacos_code(status.code()), id, &message)
        })
    }

    /// InstanceRequest and PersistentInstanceRequest: register or
    /// deregister one instance.
    async fn instance(
        &self,
        connection: &Arc<Connection>,
        call: &Call<'_>,
        persistent: bool,
    ) -> Result<Payload, Status> {
        let r: InstanceRequest = call.parse()?;
        let (namespace, group, service) = r.naming.scope()?;
        let at = Placed {
            namespace: &namespace,
            group: &group,
            service: &service,
        };
        let instance = r.instance.ok_or_else(|| super::missing("instance"))?;
        let mut pb = instance.to_pb(&at)?;
        if persistent {
            pb.ephemeral = Some(false);
        }
        let kind = r.r#type.unwrap_or_default();
        match kind.as_str() {
            "registerInstance" => self.register(connection, call, pb).await?,
            "deregisterInstance" => self.deregister(connection, call, &pb).await?,
            other => {
                return Err(Status::invalid_argument(format!(
                    "Unsupported request type {other:?}: an InstanceRequest is registerInstance or deregisterInstance"
                )));
            }
        }
        Ok(answer(
            "InstanceResponse",
            &call.request_id,
            json!({"type": kind}),
        ))
    }

    /// Registers `instance` for `connection`: an ephemeral one on the
    /// connection's lease, attached to its session.
    async fn register(
        &self,
        connection: &Arc<Connection>,
        call: &Call<'_>,
        instance: pb::Instance,
    ) -> Result<(), Status> {
        let ephemeral = instance.ephemeral != Some(false);
        let mut held = connection.held.lock().await;
        let held = held
            .as_mut()
            .ok_or_else(|| Status::unavailable("the connection has ended"))?;
        let lease = if ephemeral { held.lease } else { 0 };
        let key = ServiceKey::parse(&instance.namespace, &instance.group, &instance.service)?;
        let addr = InstanceAddr::parse(&instance.cluster, &instance.ip, instance.port)?;
        // The lease cannot lapse under an open connection: its stream
        // beats it, and forgets it (0) if a beat fails.
        let registered = self
            .shared
            .face
            .register(with_token(
                call.token.as_deref(),
                pb::RegisterRequest {
                    instance: Some(instance),
                    lease_id: lease,
                },
            ))
            .await?
            .into_inner();
        if ephemeral {
            if registered.lease_id != held.lease {
                held.lease = registered.lease_id;
                held.session.beat(registered.lease_id).await?;
            }
            held.instances.insert((key, addr));
        }
        Ok(())
    }

    async fn deregister(
        &self,
        connection: &Arc<Connection>,
        call: &Call<'_>,
        instance: &pb::Instance,
    ) -> Result<(), Status> {
        let key = ServiceKey::parse(&instance.namespace, &instance.group, &instance.service)?;
        let addr = InstanceAddr::parse(&instance.cluster, &instance.ip, instance.port)?;
        let done = self
            .shared
            .face
            .deregister(with_token(
                call.token.as_deref(),
                pb::DeregisterRequest {
                    namespace: instance.namespace.clone(),
                    group: instance.group.clone(),
                    service: instance.service.clone(),
                    cluster: instance.cluster.clone(),
                    ip: instance.ip.clone(),
                    port: instance.port,
                },
            ))
            .await;
        // Deregistering what is not there is done, as Nacos answers it.
        match done {
            Err(status) if status.code() == Code::NotFound => {}
            other => {
                other?;
            }
        }
        if let Some(held) = connection.held.lock().await.as_mut() {
            held.instances.remove(&(key, addr));
        }
        Ok(())
    }

    /// BatchInstanceRequest: the connection's ephemeral instances of a
    /// service become exactly these. Every one is checked before any is
    /// registered.
    async fn batch(
        &self,
        connection: &Arc<Connection>,
        call: &Call<'_>,
    ) -> Result<Payload, Status> {
        let r: BatchInstanceRequest = call.parse()?;
        let kind = r.r#type.unwrap_or_default();
        if kind != "batchRegisterInstance" {
            return Err(Status::invalid_argument(format!(
                "Unsupported request type {kind:?}: a BatchInstanceRequest is batchRegisterInstance"
            )));
        }
        let (namespace, group, service) = r.naming.scope()?;
        let at = Placed {
            namespace: &namespace,
            group: &group,
            service: &service,
        };
        let mut instances = Vec::new();
        let mut wanted = HashSet::new();
        for (i, instance) in r.instances.unwrap_or_default().iter().enumerate() {
            let pb = instance.to_pb(&at).map_err(|s| {
                Status::invalid_argument(format!("instances[{i}]: {}", s.message()))
            })?;
            let spec = InstanceSpec::try_from(pb.clone()).map_err(|e| {
                Status::invalid_argument(format!("instances[{i}]: {}", Status::from(e).message()))
            })?;
            wanted.insert(spec.addr.clone());
            instances.push(pb);
        }
        let key = ServiceKey::parse(&namespace, &group, &service)?;
        for instance in instances {
            self.register(connection, call, instance).await?;
        }
        let stale: Vec<InstanceAddr> = match connection.held.lock().await.as_ref() {
            None => Vec::new(),
            Some(held) => held
                .instances
                .iter()
                .filter(|(k, a)| *k == key && !wanted.contains(a))
                .map(|(_, a)| a.clone())
                .collect(),
        };
        for addr in stale {
            let gone = pb::Instance {
                namespace: namespace.clone(),
                group: group.clone(),
                service: service.clone(),
                cluster: addr.cluster.to_string(),
                ip: addr.ip.to_string(),
                port: addr.port.into(),
                ..Default::default()
            };
            self.deregister(connection, call, &gone).await?;
        }
        Ok(answer(
            "BatchInstanceResponse",
            &call.request_id,
            json!({"type": kind}),
        ))
    }

    /// The service's instances as `ServiceInfo`, for `connection`; `None`
    /// as a service with none when the registry has no such service.
    async fn service_info(
        &self,
        connection: &Connection,
        token: Option<&str>,
        scope: &(String, String, String),
        clusters: &str,
        healthy_only: bool,
        enabled_only: bool,
    ) -> Result<Value, Status> {
        let (namespace, group, service) = scope;
        let found = find_service(
            &self.shared.face,
            token,
            (namespace, group, service),
            clusters,
            healthy_only,
            enabled_only,
        )
        .await?;
        let group = if group.is_empty() {
            crate::registry::model::DEFAULT_GROUP
        } else {
            group
        };
        let grouped = super::grouped(group, service);
        let info = service_info(
            service,
            group,
            clusters,
            found.as_ref(),
            &grouped,
            connection.next_ref_time(),
        );
        Ok(json!(info))
    }

    /// ServiceQueryRequest: a service's instances, once.
    async fn query(&self, connection: &Connection, call: &Call<'_>) -> Result<Payload, Status> {
        let r: ServiceQueryRequest = call.parse()?;
        let scope = r.naming.scope()?;
        let clusters = r.cluster.unwrap_or_default();
        let healthy_only = r.healthy_only.or(r.health_only).unwrap_or(false);
        let info = self
            .service_info(
                connection,
                call.token.as_deref(),
                &scope,
                &clusters,
                healthy_only,
                false,
            )
            .await?;
        Ok(answer(
            "QueryServiceResponse",
            &call.request_id,
            json!({"serviceInfo": info}),
        ))
    }

    /// SubscribeServiceRequest: a service's instances now, and each change
    /// pushed after; or the end of that.
    async fn subscribe(
        &self,
        connection: &Arc<Connection>,
        call: &Call<'_>,
    ) -> Result<Payload, Status> {
        let r: SubscribeServiceRequest = call.parse()?;
        let scope = r.naming.scope()?;
        let clusters = r.clusters.unwrap_or_default();
        let info = self
            .service_info(
                connection,
                call.token.as_deref(),
                &scope,
                &clusters,
                false,
                true,
            )
            .await?;
        let key = ServiceKey::parse(&scope.0, &scope.1, &scope.2)?;
        let mut held = connection.held.lock().await;
        let held = held
            .as_mut()
            .ok_or_else(|| Status::unavailable("the connection has ended"))?;
        let slot = (key.clone(), clusters.clone());
        if r.subscribe.unwrap_or(true) {
            if let std::collections::hash_map::Entry::Vacant(vacant) =
                held.subscriptions.entry(slot)
            {
                let grant = self.shared.registry.authorize(
                    call.token.as_deref(),
                    Need::Read {
                        namespace: &key.namespace,
                    },
                )?;
                let who = Watcher {
                    peer: Some(connection.peer),
                    by: grant.map(|g| g.name.clone()),
                    since_ms: now_ms(),
                };
                let watch = self
                    .shared
                    .registry
                    .watch_by(Selector::Service(key), 0, 0, who)?;
                let task = tokio::spawn(self.clone().follow(
                    connection.clone(),
                    watch,
                    scope,
                    clusters,
                    call.token.clone(),
                ));
                vacant.insert(Following(task));
            }
        } else {
            held.subscriptions.remove(&slot);
        }
        Ok(answer(
            "SubscribeServiceResponse",
            &call.request_id,
            json!({"serviceInfo": info, "message": "success"}),
        ))
    }

    /// A subscription: after the snapshot (which the subscribe answer
    /// carried), pushes the service as it is after each run of changes,
    /// while the credential still reads it.
    async fn follow(
        self,
        connection: Arc<Connection>,
        mut watch: crate::registry::WatchStream,
        scope: (String, String, String),
        clusters: String,
        token: Option<String>,
    ) {
        let mut primed = false;
        while let Some(item) = watch.next().await {
            if let WatchItem::Snapshot { more: true, .. } = item {
                continue;
            }
            if !primed {
                primed = true;
                continue;
            }
            // A burst of changes is one push.
            while let Some(Some(_)) = watch.next().now_or_never() {}
            let info = match self
                .service_info(
                    &connection,
                    token.as_deref(),
                    &scope,
                    &clusters,
                    false,
                    true,
                )
                .await
            {
                Ok(info) => info,
                Err(status) => {
                    tracing::info!(connection = %connection.id, service = %scope.2, error = %status.message(), "nacos subscription ended");
                    return;
                }
            };
            let id = self
                .shared
                .pushes
                .fetch_add(1, Ordering::Relaxed)
                .to_string();
            let push = payload(
                "NotifySubscriberRequest",
                &json!({"headers": {}, "requestId": id, "module": "naming", "serviceInfo": info}),
            );
            let Some(outbound) = connection.outbound.lock().clone() else {
                return;
            };
            if outbound.send(Ok(push)).await.is_err() {
                return;
            }
        }
    }

    /// ServiceListRequest: a page of a group's service names.
    async fn list(&self, call: &Call<'_>) -> Result<Payload, Status> {
        let r: ServiceListRequest = call.parse()?;
        if r.selector.as_deref().is_some_and(|s| !s.trim().is_empty()) {
            return Err(Status::unimplemented(
                "a ServiceListRequest's selector is not served by shop-mesh; list without one",
            ));
        }
        let page = self
            .shared
            .face
            .list_services(with_token(
                call.token.as_deref(),
                pb::ListServicesRequest {
                    namespace: r.namespace.unwrap_or_default(),
                    group: r.group_name.unwrap_or_default(),
                    page: r.page_no.unwrap_or(1),
                    page_size: r.page_size.unwrap_or(10),
                    search: String::new(),
                },
            ))
            .await?
            .into_inner();
        let names: Vec<&str> = page.services.iter().map(|s| s.name.as_str()).collect();
        Ok(answer(
            "ServiceListResponse",
            &call.request_id,
            json!({"count": page.total, "serviceNames": names}),
        ))
    }
}

type Pushes = ReceiverStream<Result<Payload, Status>>;

#[tonic::async_trait]
impl BiRequestStream for Remote {
    type requestBiStreamStream = Pushes;

    async fn request_bi_stream(
        &self,
        request: tonic::Request<tonic::Streaming<Payload>>,
    ) -> Result<tonic::Response<Pushes>, Status> {
        let peer = request.remote_addr().ok_or_else(|| {
            Status::failed_precondition("the connection's peer address is unknown")
        })?;
        let mut inbound = request.into_inner();
        let connection = self.shared.name(peer);
        let (tx, rx) = mpsc::channel(PUSH_QUEUE);
        *connection.outbound.lock() = Some(tx);
        let shared = self.shared.clone();
        let every = shared.registry.config().heartbeat_interval;
        tokio::spawn(async move {
            let mut beat = tokio::time::interval(every);
            let handing_over = loop {
                tokio::select! {
                    message = inbound.message() => match message {
                        Ok(Some(message)) => on_stream(&connection, message),
                        Ok(None) | Err(_) => break false,
                    },
                    _ = beat.tick() => {
                        // The connection is open: its lease is alive.
                        if let Some(held) = connection.held.lock().await.as_mut()
                            && held.lease != 0
                            && let Err(err) = held.session.beat(held.lease).await
                        {
                            tracing::debug!(connection = %connection.id, error = %err, "nacos connection's lease");
                            held.lease = 0;
                        }
                    }
                    _ = shared.shutdown.cancelled() => break true,
                }
            };
            shared.end(&connection, handing_over).await;
        });
        Ok(tonic::Response::new(ReceiverStream::new(rx)))
    }
}

/// A message on a connection's stream: its setup, or its answer to a push.
fn on_stream(connection: &Connection, message: Payload) {
    let kind = message.metadata.map(|m| m.r#type).unwrap_or_default();
    match kind.as_str() {
        "ConnectionSetupRequest" => {
            connection.set_up.store(true, Ordering::Release);
            tracing::debug!(connection = %connection.id, "nacos connection set up");
        }
        // Answers to pushes and detections: nothing waits on them.
        kind if kind.ends_with("Response") => {}
        kind => {
            tracing::debug!(connection = %connection.id, kind, "nacos stream message ignored")
        }
    }
}
