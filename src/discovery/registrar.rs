//! Self-registration: a service registers itself once its server is ready,
//! keeps its lease alive, comes back by itself when the registry restarts
//! (Nacos's "redo"), and leaves before its listener closes.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

use super::connector::Connector;
use crate::discovery::RegistryClient;
use crate::pb::registry as pb;
use crate::shutdown::Shutdown;

/// How long deregistration may take before the service goes anyway.
const DEREGISTER_TIMEOUT: Duration = Duration::from_secs(3);

/// A running registration.
pub struct Registration {
    left: tokio::task::JoinHandle<()>,
}

impl Registration {
    /// Registers `instance` and keeps it registered until `shutdown`; then
    /// deregisters and waits `drain_delay` so callers see it gone before the
    /// server stops taking calls.
    pub fn start(
        connector: Connector,
        instance: pb::Instance,
        shutdown: Shutdown,
        drain_delay: Duration,
    ) -> Registration {
        let left = tokio::spawn(async move {
            let client = keep_registered(&connector, &instance, &shutdown).await;
            if let Some(client) = client {
                deregister(client, &instance).await;
            }
            tokio::time::sleep(drain_delay).await;
        });
        Registration { left }
    }

    /// Resolves once the instance has left the registry (after shutdown).
    pub async fn left(self) {
        let _ = self.left.await;
    }
}

/// Registers and heartbeats, reconnecting as needed, until shutdown;
/// answers the last client, to deregister with.
///
/// A KeepAlive stream that breaks while the lease may still be alive (the
/// registry node died, or the connection did) is resumed, not registered
/// again: the next address reached gets a KeepAlive for the same lease,
/// which any node of a cluster takes over, so the instance never leaves and
/// never turns unhealthy. Only a registry that no longer knows the lease
/// (NOT_FOUND: it restarted, or the lease expired) gets a new registration.
async fn keep_registered(
    connector: &Connector,
    instance: &pb::Instance,
    shutdown: &Shutdown,
) -> Option<RegistryClient> {
    let mut lease = 0;
    // The lease's heartbeat interval, as the registry last answered it.
    let mut interval = Duration::from_secs(1);
    let mut backoff = connector.backoff();
    loop {
        let (mut client, registry) = connector.connect_named(shutdown).await?;
        let last_client = Some(client.clone());
        // The lease to keep alive, and whether it is resumed rather than
        // just registered: None when the registration was refused.
        let alive = if lease != 0 {
            tracing::debug!(lease, %registry, "resuming the lease");
            Some(Some(registry.as_str()))
        } else {
            let request = pb::RegisterRequest {
                instance: Some(instance.clone()),
                lease_id: 0,
            };
            let answer = tokio::select! {
                _ = shutdown.cancelled() => return last_client,
                answer = client.register(request) => answer,
            };
            match answer {
                Ok(answer) => {
                    let answer = answer.into_inner();
                    lease = answer.lease_id;
                    backoff = connector.backoff();
                    tracing::info!(instance = %answer.instance_id, lease, %registry, "registered");
                    interval = Duration::from_millis(answer.heartbeat_interval_ms.max(100));
                    Some(None)
                }
                Err(status)
                    if matches!(
                        status.code(),
                        Code::Unauthenticated | Code::PermissionDenied
                    ) =>
                {
                    tracing::error!(
                        reason = %status.message(),
                        %registry,
                        "the registry refused this service's credential; give it a token that may register {} (SHOP_MESH__DISCOVERY__TOKEN, or discovery.token_file), made with shop-mesh token create --service {}",
                        instance.service,
                        instance.service
                    );
                    None
                }
                Err(status) => {
                    tracing::warn!(%status, %registry, "registration refused");
                    None
                }
            }
        };
        let Some(resuming) = alive else {
            if !pause(&mut backoff, shutdown).await {
                return last_client;
            }
            continue;
        };
        match heartbeat(&mut client, instance, lease, interval, shutdown, resuming).await {
            Ended::Left => return None,
            Ended::LeaseLost => {
                tracing::warn!(
                    lease,
                    %registry,
                    "the registry no longer knows our lease; registering again"
                );
                lease = 0;
                continue;
            }
            Ended::Broken { answered } => {
                if answered {
                    backoff = connector.backoff();
                }
                tracing::warn!(%registry, "lost the registry; reconnecting");
            }
        }
        if !pause(&mut backoff, shutdown).await {
            return last_client;
        }
    }
}

/// Waits the back-off's next delay; false when shut down meanwhile.
async fn pause(backoff: &mut impl Iterator<Item = Duration>, shutdown: &Shutdown) -> bool {
    let delay = backoff.next().unwrap_or(Duration::from_secs(1));
    tokio::select! {
        _ = shutdown.cancelled() => false,
        _ = tokio::time::sleep(delay) => true,
    }
}

enum Ended {
    /// Shut down and deregistered.
    Left,
    /// The registry does not know the lease.
    LeaseLost,
    /// The stream or its connection broke; `answered`: after at least one
    /// heartbeat was answered.
    Broken { answered: bool },
}

/// Sends a heartbeat every `interval` on one KeepAlive stream (logging
/// its first answer when it resumes a lease on `resuming_on`); on
/// shutdown, deregisters while the stream is still open (closing it first
/// would mark the instance unhealthy for nothing).
async fn heartbeat(
    client: &mut RegistryClient,
    instance: &pb::Instance,
    lease: u64,
    interval: Duration,
    shutdown: &Shutdown,
    resuming_on: Option<&str>,
) -> Ended {
    let (tx, rx) = mpsc::channel(2);
    let broken = Ended::Broken { answered: false };
    if tx
        .send(pb::KeepAliveRequest { lease_id: lease })
        .await
        .is_err()
    {
        return broken;
    }
    let mut answers = match client.keep_alive(ReceiverStream::new(rx)).await {
        Ok(answers) => answers.into_inner(),
        Err(status) if status.code() == Code::NotFound => return Ended::LeaseLost,
        Err(_) => return broken,
    };
    let mut answered = false;
    let mut ticks = tokio::time::interval(interval);
    ticks.tick().await;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => {
                deregister(client.clone(), instance).await;
                return Ended::Left;
            }
            _ = ticks.tick() => {
                if tx.send(pb::KeepAliveRequest { lease_id: lease }).await.is_err() {
                    return Ended::Broken { answered };
                }
            }
            answer = answers.message() => match answer {
                Ok(Some(_)) => {
                    if !answered && let Some(registry) = resuming_on {
                        tracing::info!(lease, %registry, "resumed the lease");
                    }
                    answered = true;
                }
                Err(status) if status.code() == Code::NotFound => return Ended::LeaseLost,
                Ok(None) | Err(_) => return Ended::Broken { answered },
            },
        }
    }
}

async fn deregister(mut client: RegistryClient, instance: &pb::Instance) {
    let request = pb::DeregisterRequest {
        namespace: instance.namespace.clone(),
        group: instance.group.clone(),
        service: instance.service.clone(),
        cluster: instance.cluster.clone(),
        ip: instance.ip.clone(),
        port: instance.port,
    };
    match tokio::time::timeout(DEREGISTER_TIMEOUT, client.deregister(request)).await {
        Ok(Ok(_)) => tracing::info!(service = %instance.service, "deregistered"),
        Ok(Err(status)) if status.code() == Code::NotFound => {}
        Ok(Err(status)) => {
            tracing::warn!(%status, "could not deregister; the registry will time us out")
        }
        Err(_) => tracing::warn!("deregistration timed out; the registry will time us out"),
    }
}
