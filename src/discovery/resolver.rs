//! The resolver: watches one service at the registry and turns what it
//! says into endpoint changes (`Reset`, `Add`, `Remove`). Nothing else
//! knows how discovery works. Protobuf stops at the edge: each answer is
//! read into endpoints as it arrives, and the resolver's state holds only
//! those.
//!
//! Trouble at the registry never empties a caller's set: while the
//! registry is unreachable nothing changes; after a reconnect the watch
//! resumes from the last revision; and when the registry restarted (a new
//! incarnation, whose snapshot may not yet hold instances that are about
//! to register again) endpoints missing from its snapshot are kept as
//! stale for a grace period, and never removed if that would leave none.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::sync::mpsc;

use super::metrics::WatchMetrics;
use tokio::time::Instant;

use super::connector::Connector;
use crate::pb::registry as pb;
use crate::shutdown::Shutdown;

/// Where a call may go, and how much of the traffic it should take.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EndpointInfo {
    /// Where calls go.
    pub addr: SocketAddr,
    /// Relative share of traffic; above 0 (instances of weight 0 are never
    /// announced).
    pub weight: f64,
}

/// A change to a service's endpoint set.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// The whole set, replacing whatever was known.
    Reset(Vec<EndpointInfo>),
    /// Added, or its weight changed.
    Add(EndpointInfo),
    /// No longer takes traffic: removed, unhealthy, disabled or weight 0, or
    /// stale past its grace.
    Remove(SocketAddr),
    /// The registry refused to say (the credential shown is not good for
    /// it): why, so a call that finds no instance can tell its caller.
    Refused(String),
}

/// Which service to follow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Registry namespace of the service.
    pub namespace: String,
    /// Registry group of the service.
    pub group: String,
    /// The service's name, as it registers (`server-product`).
    pub service: String,
}

/// Follows `target` until `shutdown` (or until the receiver is dropped).
pub fn resolve(
    connector: Connector,
    target: Target,
    stale_grace: Duration,
    shutdown: Shutdown,
    metrics: WatchMetrics,
) -> mpsc::Receiver<Change> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let mut state = State::default();
        tokio::select! {
            _ = run(&connector, &target, stale_grace, (&shutdown, &metrics), &tx, &mut state) => {}
            _ = tx.closed() => {}
        }
        metrics.closed();
    });
    rx
}

#[derive(Default)]
struct State {
    revision: u64,
    incarnation: u64,
    known: HashMap<SocketAddr, EndpointInfo>,
    /// Known endpoints the current registry has not confirmed, and when
    /// they may go.
    stale: HashMap<SocketAddr, Instant>,
}

async fn run(
    connector: &Connector,
    target: &Target,
    stale_grace: Duration,
    (shutdown, metrics): (&Shutdown, &WatchMetrics),
    tx: &mpsc::Sender<Change>,
    state: &mut State,
) {
    let mut backoff = connector.backoff();
    loop {
        let Some(mut client) = connector.connect(shutdown).await else {
            return;
        };
        let request = pb::WatchRequest {
            namespace: target.namespace.clone(),
            group: target.group.clone(),
            service: target.service.clone(),
            start_revision: if state.revision == 0 {
                0
            } else {
                state.revision + 1
            },
            incarnation: state.incarnation,
        };
        match client.watch(request).await {
            Ok(stream) => {
                backoff = connector.backoff();
                metrics.opened();
                follow(stream.into_inner(), stale_grace, shutdown, tx, state).await;
                metrics.closed();
            }
            Err(status) => {
                if matches!(
                    status.code(),
                    tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
                ) && tx
                    .send(Change::Refused(status.message().to_owned()))
                    .await
                    .is_err()
                {
                    return;
                }
                tracing::warn!(service = %target.service, %status, "cannot watch the service")
            }
        }
        if shutdown.is_cancelled() || tx.is_closed() {
            return;
        }
        let delay = backoff.next().unwrap_or(Duration::from_secs(1));
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// Applies one watch stream until it ends.
async fn follow(
    mut stream: tonic::Streaming<pb::WatchResponse>,
    stale_grace: Duration,
    shutdown: &Shutdown,
    tx: &mpsc::Sender<Change>,
    state: &mut State,
) {
    let mut snapshot: Vec<EndpointInfo> = Vec::new();
    loop {
        let next_stale = state.stale.values().min().copied();
        let message = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = sleep_until(next_stale) => {
                for change in state.expire_stale(Instant::now()) {
                    if tx.send(change).await.is_err() {
                        return;
                    }
                }
                continue;
            }
            message = stream.message() => message,
        };
        let answer = match message {
            Ok(Some(answer)) => answer,
            Ok(None) => return,
            Err(status) => {
                tracing::debug!(%status, "watch stream broke; keeping the last known endpoints");
                return;
            }
        };
        let changes = match answer.body {
            Some(pb::watch_response::Body::Snapshot(chunk)) => {
                snapshot.extend(chunk.instances.iter().filter_map(endpoint));
                if chunk.more {
                    continue;
                }
                let restarted = state.incarnation != 0 && state.incarnation != answer.incarnation;
                let first = state.incarnation == 0;
                let instances = std::mem::take(&mut snapshot);
                state.snapshot(instances, first || !restarted, stale_grace)
            }
            Some(pb::watch_response::Body::Change(change)) => match seen(&change) {
                Some((addr, serving)) => state.change(addr, serving),
                None => Vec::new(),
            },
            None => Vec::new(),
        };
        state.revision = answer.revision;
        state.incarnation = answer.incarnation;
        for change in changes {
            if tx.send(change).await.is_err() {
                return;
            }
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

impl State {
    /// A full snapshot. `exact`: it replaces what is known (first answer,
    /// or a reset from the same registry); otherwise (the registry
    /// restarted) what it lacks turns stale.
    fn snapshot(
        &mut self,
        serving: Vec<EndpointInfo>,
        exact: bool,
        grace: Duration,
    ) -> Vec<Change> {
        let serving: HashMap<_, _> = serving.into_iter().map(|e| (e.addr, e)).collect();
        if exact {
            self.known = serving;
            self.stale.clear();
            return vec![Change::Reset(self.known.values().copied().collect())];
        }
        let mut changes = Vec::new();
        let until = Instant::now() + grace;
        for addr in self.known.keys() {
            if !serving.contains_key(addr) {
                self.stale.entry(*addr).or_insert(until);
            }
        }
        for (addr, info) in serving {
            self.stale.remove(&addr);
            if self.known.insert(addr, info) != Some(info) {
                changes.push(Change::Add(info));
            }
        }
        if !self.stale.is_empty() {
            tracing::info!(
                stale = self.stale.len(),
                "the registry restarted; keeping endpoints it has not confirmed yet"
            );
        }
        changes
    }

    /// What a change says of the instance at `addr`: it may take traffic
    /// now (`serving`), or not (changed so, or removed).
    fn change(&mut self, addr: SocketAddr, serving: Option<EndpointInfo>) -> Vec<Change> {
        self.stale.remove(&addr);
        match serving {
            Some(info) if self.known.insert(addr, info) == Some(info) => Vec::new(),
            Some(info) => vec![Change::Add(info)],
            None => match self.known.remove(&addr) {
                Some(_) => vec![Change::Remove(addr)],
                None => Vec::new(),
            },
        }
    }

    /// Drops stale endpoints whose grace has passed, unless that would
    /// leave the set empty.
    fn expire_stale(&mut self, now: Instant) -> Vec<Change> {
        let due: HashSet<SocketAddr> = self
            .stale
            .iter()
            .filter(|(_, until)| **until <= now)
            .map(|(addr, _)| *addr)
            .collect();
        if due.is_empty() {
            return Vec::new();
        }
        let fresh = self.known.len() - self.stale.len();
        self.stale.retain(|addr, _| !due.contains(addr));
        if fresh == 0 && self.stale.is_empty() {
            // The registry confirmed nothing: keep what was last known
            // rather than empty the set, without timing it out again.
            tracing::warn!(
                "no endpoint confirmed since the registry restarted; keeping the old ones"
            );
            return Vec::new();
        }
        due.into_iter()
            .filter(|addr| self.known.remove(addr).is_some())
            .map(Change::Remove)
            .collect()
    }
}

/// A change as the resolver reads it: the instance's address, and its
/// endpoint if it may take traffic after the change. `None` for a change
/// that names no address (which the registry never sends).
fn seen(change: &pb::Change) -> Option<(SocketAddr, Option<EndpointInfo>)> {
    let instance = change.instance.as_ref()?;
    let addr = address(instance)?;
    let serving = match change.kind() {
        pb::change::Kind::Put => endpoint(instance),
        _ => None,
    };
    Some((addr, serving))
}

fn address(instance: &pb::Instance) -> Option<SocketAddr> {
    let ip: IpAddr = instance.ip.parse().ok()?;
    let port = u16::try_from(instance.port).ok()?;
    Some(SocketAddr::new(ip, port))
}

/// The endpoint of an instance that may take traffic: healthy, enabled,
/// weight above 0.
fn endpoint(instance: &pb::Instance) -> Option<EndpointInfo> {
    let weight = instance.weight.unwrap_or(1.0);
    if !(instance.healthy && instance.enabled.unwrap_or(true) && weight > 0.0) {
        return None;
    }
    Some(EndpointInfo {
        addr: address(instance)?,
        weight,
    })
}
