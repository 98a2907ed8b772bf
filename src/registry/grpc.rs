//! The registry's gRPC face: each handler converts the request, calls
//! [`Registry`], and converts the answer back. No domain logic here.

use std::pin::Pin;

use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::model::{
    self, ChangeKind, GroupKey, Instance, InstanceAddr, InstanceSpec, ServiceKey, ServiceSettings,
    TimingOverrides,
};
use super::watch::{Selector, WatchItem, Watcher};
use super::{Error, Registry, StoreKind};
use crate::auth::{Need, Scope, TokenId};
use crate::pb::registry as pb;
use crate::shutdown::Shutdown;

/// The registry's gRPC face: converts requests to the domain, calls
/// [`Registry`], and converts the answers back. Cheap to clone: the JSON
/// API (`http.rs`) serves through a clone of it.
#[derive(Clone)]
pub struct RegistryService {
    registry: Registry,
    shutdown: Shutdown,
    /// Where this node listens, as GetCluster names it.
    addr: Option<std::net::SocketAddr>,
}

impl RegistryService {
    /// Serves `registry`; watch streams end when `shutdown` fires.
    pub fn new(registry: Registry, shutdown: Shutdown) -> Self {
        Self {
            registry,
            shutdown,
            addr: None,
        }
    }

    /// The registry served, for the JSON API's calls that have no gRPC
    /// twin (they check credentials themselves, as these handlers do).
    pub(super) fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Names `addr` as this node's address in GetCluster answers.
    pub fn listening_on(mut self, addr: std::net::SocketAddr) -> Self {
        self.addr = Some(addr);
        self
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl pb::registry_server::Registry for RegistryService {
    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let token = presented(&request);
        let request = request.into_inner();
        let instance = request
            .instance
            .ok_or_else(|| Error::invalid("instance", "must be set"))?;
        let spec = InstanceSpec::try_from(instance)?;
        self.registry
            .authorize_registration(token.as_deref(), &spec, request.lease_id)?;
        let registered = self.registry.register(spec, request.lease_id).await?;
        Ok(Response::new(pb::RegisterResponse {
            instance_id: registered.instance_id,
            lease_id: registered.lease,
            revision: registered.revision,
            heartbeat_interval_ms: registered.heartbeat_interval.as_millis() as u64,
        }))
    }

    async fn deregister(
        &self,
        request: Request<pb::DeregisterRequest>,
    ) -> Result<Response<pb::DeregisterResponse>, Status> {
        let token = presented(&request);
        let r = request.into_inner();
        let key = ServiceKey::parse(&r.namespace, &r.group, &r.service)?;
        let addr = InstanceAddr::parse(&r.cluster, &r.ip, r.port)?;
        self.registry.authorize(token.as_deref(), write(&key))?;
        let revision = self.registry.deregister(&key, &addr).await?;
        Ok(Response::new(pb::DeregisterResponse { revision }))
    }

    async fn list_services(
        &self,
        request: Request<pb::ListServicesRequest>,
    ) -> Result<Response<pb::ListServicesResponse>, Status> {
        let token = presented(&request);
        let r = request.into_inner();
        let group = GroupKey::parse(&r.namespace, &r.group)?;
        self.registry
            .authorize(token.as_deref(), read(&group.namespace))?;
        if r.search.len() > model::MAX_NAME_LEN || r.search.chars().any(char::is_control) {
            return Err(Error::invalid(
                "search",
                format!(
                    "at most {} bytes, no control characters",
                    model::MAX_NAME_LEN
                ),
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
        let page =
            self.registry
                .list_services(&group, &r.search, (r.page as usize).max(1), page_size);
        Ok(Response::new(pb::ListServicesResponse {
            services: page
                .services
                .into_iter()
                .map(|s| pb::ServiceSummary {
                    namespace: s.key.namespace.to_string(),
                    group: s.key.group.to_string(),
                    name: s.key.name.to_string(),
                    instance_count: s.instance_count as u32,
                    healthy_count: s.healthy_count as u32,
                    protect_threshold: s.protect_threshold,
                })
                .collect(),
            total: page.total as u32,
            revision: page.revision,
        }))
    }

    async fn get_service(
        &self,
        request: Request<pb::GetServiceRequest>,
    ) -> Result<Response<pb::GetServiceResponse>, Status> {
        let token = presented(&request);
        let r = request.into_inner();
        let key = ServiceKey::parse(&r.namespace, &r.group, &r.service)?;
        self.registry
            .authorize(token.as_deref(), read(&key.namespace))?;
        for cluster in &r.clusters {
            model::parse_name("clusters", cluster, None)?;
        }
        let view = self
            .registry
            .get_service(&key, r.healthy_only, &r.clusters)?;
        Ok(Response::new(pb::GetServiceResponse {
            namespace: view.key.namespace.to_string(),
            group: view.key.group.to_string(),
            name: view.key.name.to_string(),
            instances: view.instances.iter().map(|i| to_pb(i)).collect(),
            revision: view.revision,
            protect_threshold: view.protect_threshold,
            protection_triggered: view.protection_triggered,
            metadata: view.metadata.into_iter().collect(),
        }))
    }

    async fn update_service(
        &self,
        request: Request<pb::UpdateServiceRequest>,
    ) -> Result<Response<pb::UpdateServiceResponse>, Status> {
        let token = presented(&request);
        let r = request.into_inner();
        let key = ServiceKey::parse(&r.namespace, &r.group, &r.service)?;
        let settings = ServiceSettings::parse(r.protect_threshold, r.metadata)?;
        self.registry.authorize(token.as_deref(), write(&key))?;
        self.registry.update_service(&key, settings).await?;
        Ok(Response::new(pb::UpdateServiceResponse {}))
    }

    async fn update_instance(
        &self,
        request: Request<pb::UpdateInstanceRequest>,
    ) -> Result<Response<pb::UpdateInstanceResponse>, Status> {
        let token = presented(&request);
        let r = request.into_inner();
        let key = ServiceKey::parse(&r.namespace, &r.group, &r.service)?;
        let addr = InstanceAddr::parse(&r.cluster, &r.ip, r.port)?;
        let change = model::InstanceChange {
            weight: r.weight.map(|w| model::parse_weight(Some(w))).transpose()?,
            enabled: r.enabled,
            metadata: r
                .metadata
                .map(|m| model::parse_metadata("metadata", m.entries))
                .transpose()?,
        };
        if change.weight.is_none() && change.enabled.is_none() && change.metadata.is_none() {
            return Err(Error::invalid("weight", "set weight, enabled or metadata").into());
        }
        self.registry.authorize(token.as_deref(), write(&key))?;
        let revision = self.registry.update_instance(&key, &addr, change).await?;
        Ok(Response::new(pb::UpdateInstanceResponse { revision }))
    }

    async fn delete_service(
        &self,
        request: Request<pb::DeleteServiceRequest>,
    ) -> Result<Response<pb::DeleteServiceResponse>, Status> {
        let token = presented(&request);
        let r = request.into_inner();
        let key = ServiceKey::parse(&r.namespace, &r.group, &r.service)?;
        self.registry.authorize(token.as_deref(), write(&key))?;
        self.registry.delete_service(&key).await?;
        Ok(Response::new(pb::DeleteServiceResponse {}))
    }

    type KeepAliveStream = BoxStream<pb::KeepAliveResponse>;

    async fn keep_alive(
        &self,
        request: Request<Streaming<pb::KeepAliveRequest>>,
    ) -> Result<Response<Self::KeepAliveStream>, Status> {
        let token = presented(&request);
        self.registry
            .authorize(token.as_deref(), Need::Authenticated)?;
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(4);
        let mut session = self.registry.keep_alive();
        let shutdown = self.shutdown.clone();
        let registry = self.registry.clone();
        tokio::spawn(async move {
            loop {
                let message = tokio::select! {
                    message = inbound.message() => message,
                    _ = shutdown.cancelled() => {
                        session.hand_over();
                        break;
                    }
                };
                // A closed or broken stream ends the session, whose drop
                // marks its leases' instances unhealthy at once. A message
                // that does not decode is the caller's, and is answered so
                // before the stream ends.
                let beat = match message {
                    Ok(Some(beat)) => beat,
                    Err(status) if status.code() == tonic::Code::InvalidArgument => {
                        let _ = tx.send(Err(status)).await;
                        break;
                    }
                    Ok(None) | Err(_) => break,
                };
                let allowed = registry.authorize_lease(token.as_deref(), beat.lease_id);
                let answer =
                    match allowed {
                        Err(err) => Err(err),
                        Ok(()) => session.beat(beat.lease_id).await.map(|interval| {
                            pb::KeepAliveResponse {
                                lease_id: beat.lease_id,
                                heartbeat_interval_ms: interval.as_millis() as u64,
                            }
                        }),
                    };
                let failed = answer.is_err();
                if tx.send(answer.map_err(Status::from)).await.is_err() || failed {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn get_cluster(
        &self,
        request: Request<pb::GetClusterRequest>,
    ) -> Result<Response<pb::GetClusterResponse>, Status> {
        let token = presented(&request);
        self.registry.authorize(token.as_deref(), Need::Describe)?;
        let info = self.registry.cluster_info().await;
        let mut answer = pb::GetClusterResponse {
            store: match info.store {
                StoreKind::Memory => "memory",
                StoreKind::Etcd => "etcd",
            }
            .into(),
            node: self.addr.map(|a| a.to_string()).unwrap_or_default(),
            revision: info.revision,
            incarnation: info.incarnation,
            ..Default::default()
        };
        match info.nodes {
            Ok(nodes) => {
                answer.nodes = nodes
                    .into_iter()
                    .map(|n| pb::RegistryNode {
                        address: n.address.to_string(),
                        started_ms: n.started_ms,
                        version: n.version,
                        answering: n.answering,
                    })
                    .collect()
            }
            Err(err) => answer.nodes_error = err,
        }
        if let Some(etcd) = info.etcd {
            answer.etcd_endpoints = etcd.endpoints;
            answer.etcd_prefix = etcd.prefix;
            match etcd.members {
                Ok(members) => {
                    answer.etcd_members = members
                        .into_iter()
                        .map(|m| pb::EtcdMember {
                            id: m.id,
                            name: m.name,
                            client_urls: m.client_urls,
                            leader: m.leader,
                            learner: m.learner,
                        })
                        .collect()
                }
                Err(err) => answer.etcd_error = err,
            }
        }
        Ok(Response::new(answer))
    }

    type WatchStream = BoxStream<pb::WatchResponse>;

    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let token = presented(&request);
        let peer = request.remote_addr();
        let r = request.into_inner();
        let group = GroupKey::parse(&r.namespace, &r.group)?;
        let grant = self
            .registry
            .authorize(token.as_deref(), read(&group.namespace))?;
        let who = Watcher {
            peer,
            by: grant.map(|g| g.name.clone()),
            since_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
        };
        let (registry, namespace) = (self.registry.clone(), group.namespace.clone());
        let selector = if r.service.is_empty() {
            Selector::Group(group)
        } else {
            Selector::Service(ServiceKey::parse(&r.namespace, &r.group, &r.service)?)
        };
        let stream = self
            .registry
            .watch_by(selector, r.start_revision, r.incarnation, who)?;
        let incarnation = self.registry.incarnation();
        // A token revoked while its watch is open gets no further change:
        // its next answer is the refusal, and the stream ends.
        let mut refused = false;
        let answers = stream
            .map(move |item| {
                registry
                    .authorize(token.as_deref(), read(&namespace))
                    .map(|_| watch_response(item, incarnation))
                    .map_err(Status::from)
            })
            .take_while(move |answer| {
                let go = !refused;
                refused |= answer.is_err();
                std::future::ready(go)
            })
            .take_until(self.shutdown.clone().cancelled_owned());
        Ok(Response::new(Box::pin(answers)))
    }

    async fn create_token(
        &self,
        request: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::CreateTokenResponse>, Status> {
        let token = presented(&request);
        self.registry.authorize(token.as_deref(), Need::Admin)?;
        let r = request.into_inner();
        let scope = scope_from_pb(
            r.scope
                .ok_or_else(|| Error::invalid("scope", "must be set"))?,
        )?;
        let made = self.registry.create_token(&r.name, scope).await?;
        Ok(Response::new(pb::CreateTokenResponse {
            id: made.id().to_string(),
            token: made.reveal(),
        }))
    }

    async fn list_tokens(
        &self,
        request: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::ListTokensResponse>, Status> {
        let token = presented(&request);
        self.registry.authorize(token.as_deref(), Need::Admin)?;
        let tokens = self
            .registry
            .tokens()
            .iter()
            .map(|grant| pb::TokenInfo {
                id: grant.id.to_string(),
                name: grant.name.clone(),
                scope: Some(scope_to_pb(&grant.scope)),
                created_ms: grant.created_ms,
            })
            .collect();
        Ok(Response::new(pb::ListTokensResponse { tokens }))
    }

    async fn revoke_token(
        &self,
        request: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::RevokeTokenResponse>, Status> {
        let token = presented(&request);
        self.registry.authorize(token.as_deref(), Need::Admin)?;
        let id: TokenId = request.into_inner().id.parse()?;
        self.registry.revoke_token(id).await?;
        Ok(Response::new(pb::RevokeTokenResponse {}))
    }

    async fn issue_identity(
        &self,
        request: Request<pb::IssueIdentityRequest>,
    ) -> Result<Response<pb::IssueIdentityResponse>, Status> {
        let token = presented(&request);
        let r = request.into_inner();
        let namespace =
            model::parse_name("namespace", &r.namespace, Some(model::DEFAULT_NAMESPACE))?;
        let service = model::parse_name("service", &r.service, None)?;
        let audience = model::parse_name("audience", &r.audience, None)?;
        self.registry.authorize(
            token.as_deref(),
            Need::Write {
                namespace: &namespace,
                service: &service,
            },
        )?;
        let (identity, expires_ms) = self
            .registry
            .issue_identity(&namespace, &service, &audience);
        Ok(Response::new(pb::IssueIdentityResponse {
            identity,
            expires_ms,
        }))
    }

    async fn get_identity_keys(
        &self,
        request: Request<pb::GetIdentityKeysRequest>,
    ) -> Result<Response<pb::GetIdentityKeysResponse>, Status> {
        let token = presented(&request);
        self.registry.authorize(token.as_deref(), Need::Describe)?;
        let key = self.registry.identity_key();
        Ok(Response::new(pb::GetIdentityKeysResponse {
            keys: vec![pb::IdentityKey {
                id: key.id,
                ed25519: key.key,
            }],
        }))
    }
}

/// The token a call shows in its `authorization` metadata (`Bearer
/// smt_...`), if any; checked, and never logged, by
/// [`Registry::authorize`].
pub(super) fn presented<T>(request: &Request<T>) -> Option<String> {
    let value = request.metadata().get("authorization")?.to_str().ok()?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .unwrap_or(value);
    Some(token.trim().to_string())
}

/// What changing `service` needs.
fn write(service: &ServiceKey) -> Need<'_> {
    Need::Write {
        namespace: &service.namespace,
        service: &service.name,
    }
}

/// What reading `namespace` needs.
fn read(namespace: &str) -> Need<'_> {
    Need::Read { namespace }
}

fn scope_from_pb(scope: pb::TokenScope) -> Result<Scope, Error> {
    let kinds = [
        scope.admin,
        !scope.read_namespace.is_empty(),
        !scope.namespace.is_empty() || !scope.services.is_empty(),
    ];
    if kinds.iter().filter(|set| **set).count() != 1 {
        return Err(Error::invalid(
            "scope",
            "set exactly one of admin, read_namespace, or namespace with services",
        ));
    }
    let scope = if scope.admin {
        Scope::Admin
    } else if !scope.read_namespace.is_empty() {
        Scope::Read {
            namespace: scope.read_namespace,
        }
    } else {
        Scope::Services {
            namespace: scope.namespace,
            services: scope.services,
        }
    };
    scope.validate()?;
    Ok(scope)
}

fn scope_to_pb(scope: &Scope) -> pb::TokenScope {
    match scope {
        Scope::Admin => pb::TokenScope {
            admin: true,
            ..Default::default()
        },
        Scope::Read { namespace } => pb::TokenScope {
            read_namespace: namespace.clone(),
            ..Default::default()
        },
        Scope::Services {
            namespace,
            services,
        } => pb::TokenScope {
            namespace: namespace.clone(),
            services: services.clone(),
            ..Default::default()
        },
    }
}

impl TryFrom<pb::Instance> for InstanceSpec {
    type Error = Error;

    fn try_from(i: pb::Instance) -> Result<Self, Error> {
        Ok(InstanceSpec {
            service: ServiceKey::parse(&i.namespace, &i.group, &i.service)?,
            addr: InstanceAddr::parse(&i.cluster, &i.ip, i.port)?,
            weight: model::parse_weight(i.weight)?,
            enabled: i.enabled.unwrap_or(true),
            ephemeral: i.ephemeral.unwrap_or(true),
            metadata: model::parse_metadata("metadata", i.metadata)?,
            timings: TimingOverrides {
                heartbeat_interval_ms: i.heartbeat_interval_ms,
                unhealthy_timeout_ms: i.unhealthy_timeout_ms,
                delete_timeout_ms: i.delete_timeout_ms,
            },
        })
    }
}

pub fn to_pb(i: &Instance) -> pb::Instance {
    // Spelt without the formatting machinery where a copy will do: every
    // read answers this for each instance.
    let ip = i.addr.ip.to_string();
    pb::Instance {
        namespace: String::from(&*i.service.namespace),
        group: String::from(&*i.service.group),
        service: String::from(&*i.service.name),
        cluster: String::from(&*i.addr.cluster),
        instance_id: i.id_at(&ip),
        ip,
        port: i.addr.port.into(),
        weight: Some(i.weight),
        enabled: Some(i.enabled),
        ephemeral: Some(i.ephemeral),
        metadata: i
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        heartbeat_interval_ms: Some(i.timings.heartbeat_interval_ms.into()),
        unhealthy_timeout_ms: Some(i.timings.unhealthy_timeout_ms.into()),
        delete_timeout_ms: Some(i.timings.delete_timeout_ms.into()),
        healthy: i.healthy,
        // A lease id proves ownership of the lease: whoever holds it can
        // keep the lease's instances alive. Only Register answers it, to
        // the owner.
        lease_id: 0,
    }
}

fn watch_response(item: WatchItem, incarnation: u64) -> pb::WatchResponse {
    match item {
        WatchItem::Snapshot {
            revision,
            reset,
            instances,
            more,
        } => pb::WatchResponse {
            revision,
            incarnation,
            body: Some(pb::watch_response::Body::Snapshot(pb::Snapshot {
                reset,
                instances: instances.iter().map(|i| to_pb(i)).collect(),
                more,
            })),
        },
        WatchItem::Change(event) => pb::WatchResponse {
            revision: event.revision,
            incarnation,
            body: Some(pb::watch_response::Body::Change(pb::Change {
                kind: match event.kind {
                    ChangeKind::Put => pb::change::Kind::Put,
                    ChangeKind::Removed => pb::change::Kind::Delete,
                } as i32,
                instance: Some(to_pb(&event.instance)),
            })),
        },
    }
}
