//! Self-registration: a service registers itself once its server is ready,
//! keeps its lease alive, comes back by itself when the registry restarts
//! (Nacos's "redo"), and leaves before its listener closes.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::transport::Channel;

use super::connector::Connector;
use crate::pb::registry as pb;
use crate::pb::registry::registry_client::RegistryClient;
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
async fn keep_registered(
    connector: &Connector,
    instance: &pb::Instance,
    shutdown: &Shutdown,
) -> Option<RegistryClient<Channel>> {
    let mut lease = 0;
    let mut backoff = connector.backoff();
    loop {
        let mut client = connector.connect(shutdown).await?;
        let last_client = Some(client.clone());
        let request = pb::RegisterRequest {
            instance: Some(instance.clone()),
            lease_id: lease,
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
                tracing::info!(instance = %answer.instance_id, lease, "registered");
                let interval = Duration::from_millis(answer.heartbeat_interval_ms.max(100));
                match heartbeat(&mut client, instance, lease, interval, shutdown).await {
                    Ended::Left => return None,
                    Ended::LeaseLost => {
                        tracing::warn!(
                            lease,
                            "the registry no longer knows our lease; registering again"
                        );
                        lease = 0;
                        continue;
                    }
                    Ended::Broken => {
                        tracing::warn!("lost the registry; reconnecting");
                    }
                }
            }
            Err(status) if status.code() == Code::NotFound && lease != 0 => {
                lease = 0;
                continue;
            }
            Err(status) => {
                tracing::warn!(%status, "registration refused");
            }
        }
        let delay = backoff.next().unwrap_or(Duration::from_secs(1));
        tokio::select! {
            _ = shutdown.cancelled() => return last_client,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

enum Ended {
    /// Shut down and deregistered.
    Left,
    LeaseLost,
    Broken,
}

/// Sends a heartbeat every `interval` on one KeepAlive stream; on
/// shutdown, deregisters while the stream is still open (closing it first
/// would mark the instance unhealthy for nothing).
async fn heartbeat(
    client: &mut RegistryClient<Channel>,
    instance: &pb::Instance,
    lease: u64,
    interval: Duration,
    shutdown: &Shutdown,
) -> Ended {
    let (tx, rx) = mpsc::channel(2);
    if tx
        .send(pb::KeepAliveRequest { lease_id: lease })
        .await
        .is_err()
    {
        return Ended::Broken;
    }
    let mut answers = match client.keep_alive(ReceiverStream::new(rx)).await {
        Ok(answers) => answers.into_inner(),
        Err(status) if status.code() == Code::NotFound => return Ended::LeaseLost,
        Err(_) => return Ended::Broken,
    };
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
                    return Ended::Broken;
                }
            }
            answer = answers.message() => match answer {
                Ok(Some(_)) => {}
                Err(status) if status.code() == Code::NotFound => return Ended::LeaseLost,
                Ok(None) | Err(_) => return Ended::Broken,
            },
        }
    }
}

async fn deregister(mut client: RegistryClient<Channel>, instance: &pb::Instance) {
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
