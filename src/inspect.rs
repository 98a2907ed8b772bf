//! Commands that look into the registry: `services`, `instances`, `watch`,
//! `cluster`. Tables for people, `--json` (one object per line) for
//! scripts. A table ends (a watch begins) with the registry node that
//! answered: with several addresses (a,b,c) it is the first that could be
//! reached.

use std::io::Write;

use serde_json::json;

use crate::discovery::RegistryClient;
use crate::pb::registry as pb;
use crate::server::Connections;
use crate::shutdown::Shutdown;

/// Where to look.
#[derive(Debug, Clone, clap::Args)]
pub struct Scope {
    /// Registry addresses, tried in turn (a,b,c) [config: discovery.registry].
    #[arg(long)]
    pub registry: Option<String>,
    /// [config: discovery.namespace]
    #[arg(long)]
    pub namespace: Option<String>,
    /// [config: discovery.group]
    #[arg(long)]
    pub group: Option<String>,
    /// One JSON object per line instead of a table.
    #[arg(long)]
    pub json: bool,
    /// A file holding the token to show the registry [config:
    /// discovery.token_file; or discovery.token].
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<std::path::PathBuf>,
}

impl Scope {
    /// Overrides the discovery settings with the flags given.
    pub fn apply(&self, config: &mut crate::discovery::Config) {
        if let Some(registry) = &self.registry {
            config.registry = registry.clone();
        }
        if let Some(namespace) = &self.namespace {
            config.namespace = namespace.clone();
        }
        if let Some(group) = &self.group {
            config.group = group.clone();
        }
        if let Some(file) = &self.token_file {
            // The flag wins over a token in the environment.
            config.token_file = file.clone();
            config.token = Default::default();
        }
    }
}

/// A client of the first registry address that answers, and that address.
pub(crate) async fn client(
    config: &crate::discovery::Config,
    connections: &Connections,
) -> anyhow::Result<(RegistryClient, String)> {
    let (channel, addr) = channel(config, connections).await?;
    Ok((
        crate::pb::registry::registry_client::RegistryClient::new(channel),
        addr,
    ))
}

/// A channel to the first registry address that answers, showing the
/// configured token, for any of the registry's APIs; and that address.
pub(crate) async fn channel(
    config: &crate::discovery::Config,
    connections: &Connections,
) -> anyhow::Result<(
    tonic::service::interceptor::InterceptedService<
        tonic::transport::Channel,
        crate::discovery::Credential,
    >,
    String,
)> {
    let connector = config.connector(connections)?;
    // No endless retrying: a person is waiting. Dropping the attempt at
    // the deadline stops it.
    let never = Shutdown::new();
    let addrs = config
        .registry
        .split(',')
        .filter(|a| !a.trim().is_empty())
        .count() as u32;
    let patience = config.connect_timeout * (addrs.max(1) + 1);
    match tokio::time::timeout(patience, connector.connect_channel(&never)).await {
        Ok(Some(reached)) => Ok(reached),
        _ => anyhow::bail!("cannot reach the registry at {}", config.registry),
    }
}

/// The line under a table naming the registry node that answered.
pub(crate) fn answered_by(addr: &str) -> String {
    format!("\nanswered by {addr}\n")
}

/// A status as a person reads it: `FailedPrecondition: product 1001 has ...`.
pub fn status(status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", status.code(), status.message())
}

/// `shop-mesh services`
pub async fn services(
    config: &crate::discovery::Config,
    connections: &Connections,
    json: bool,
) -> anyhow::Result<()> {
    let (mut client, answered) = client(config, connections).await?;
    let mut all = Vec::new();
    for page in 1.. {
        let answer = client
            .list_services(pb::ListServicesRequest {
                namespace: config.namespace.clone(),
                group: config.group.clone(),
                page,
                page_size: 1000,
                search: String::new(),
            })
            .await
            .map_err(status)?
            .into_inner();
        let done = answer.services.len() < 1000;
        all.extend(answer.services);
        if done {
            break;
        }
    }
    let mut out = std::io::stdout().lock();
    if json {
        for s in &all {
            let line = json!({"namespace": s.namespace, "group": s.group, "service": s.name,
                "instances": s.instance_count, "healthy": s.healthy_count, "protect_threshold": s.protect_threshold,
                "answered_by": answered});
            writeln!(out, "{line}")?;
        }
        return Ok(());
    }
    let rows: Vec<Vec<String>> = all
        .iter()
        .map(|s| {
            vec![
                s.name.clone(),
                s.instance_count.to_string(),
                s.healthy_count.to_string(),
            ]
        })
        .collect();
    write!(
        out,
        "{}{}",
        table(&["SERVICE", "INSTANCES", "HEALTHY"], &rows),
        answered_by(&answered)
    )?;
    Ok(())
}

/// `shop-mesh instances <service>`
pub async fn instances(
    config: &crate::discovery::Config,
    connections: &Connections,
    service: &str,
    json: bool,
) -> anyhow::Result<()> {
    let (mut client, answered) = client(config, connections).await?;
    let answer = client
        .get_service(pb::GetServiceRequest {
            namespace: config.namespace.clone(),
            group: config.group.clone(),
            service: service.into(),
            ..Default::default()
        })
        .await
        .map_err(status)?
        .into_inner();
    let mut out = std::io::stdout().lock();
    if json {
        for i in &answer.instances {
            let mut line = instance_json(i);
            line["answered_by"] = answered.clone().into();
            writeln!(out, "{line}")?;
        }
        return Ok(());
    }
    let rows: Vec<Vec<String>> = answer.instances.iter().map(instance_row).collect();
    write!(
        out,
        "{}{}",
        table(
            &[
                "ADDRESS",
                "CLUSTER",
                "WEIGHT",
                "HEALTHY",
                "ENABLED",
                "EPHEMERAL"
            ],
            &rows
        ),
        answered_by(&answered)
    )?;
    Ok(())
}

/// `shop-mesh watch <service>`: each change as it arrives, until Ctrl-C.
pub async fn watch(
    config: &crate::discovery::Config,
    connections: &Connections,
    service: &str,
    json: bool,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let (mut client, answered) = client(config, connections).await?;
    let mut stream = client
        .watch(pb::WatchRequest {
            namespace: config.namespace.clone(),
            group: config.group.clone(),
            service: service.into(),
            ..Default::default()
        })
        .await
        .map_err(status)?
        .into_inner();
    if !json {
        let mut out = std::io::stdout().lock();
        writeln!(out, "answered by {answered}")?;
        out.flush()?;
    }
    loop {
        let answer = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            answer = stream.message() => answer.map_err(status)?,
        };
        let Some(answer) = answer else {
            anyhow::bail!("the registry closed the watch");
        };
        // Every instance of a snapshot is a line of its own, like a change.
        let (event, instances) = match answer.body {
            Some(pb::watch_response::Body::Snapshot(s)) => {
                (if s.reset { "reset" } else { "snapshot" }, s.instances)
            }
            Some(pb::watch_response::Body::Change(change)) => {
                let event = match change.kind() {
                    pb::change::Kind::Delete => "delete",
                    _ => "put",
                };
                (event, change.instance.into_iter().collect())
            }
            None => continue,
        };
        let mut out = std::io::stdout().lock();
        for i in &instances {
            if json {
                let line = json!({"revision": answer.revision, "event": event, "instance": instance_json(i),
                    "answered_by": answered});
                writeln!(out, "{line}")?;
            } else {
                let row = instance_row(i).join("  ");
                writeln!(
                    out,
                    "{:>8}  {:<8}  {row}",
                    answer.revision,
                    event.to_uppercase()
                )?;
            }
        }
        out.flush()?;
    }
}

/// `shop-mesh cluster`: the registry node that answered, where its state
/// lives, its view's revision, the registry nodes that are up and, on the
/// etcd store, etcd's members.
pub async fn cluster(
    config: &crate::discovery::Config,
    connections: &Connections,
    json: bool,
) -> anyhow::Result<()> {
    let (mut client, answered) = client(config, connections).await?;
    let info = client
        .get_cluster(pb::GetClusterRequest {})
        .await
        .map_err(status)?
        .into_inner();
    let mut out = std::io::stdout().lock();
    if json {
        let members: Vec<serde_json::Value> = info
            .etcd_members
            .iter()
            .map(|m| {
                json!({"id": format!("{:x}", m.id), "name": m.name, "client_urls": m.client_urls,
                    "leader": m.leader, "learner": m.learner})
            })
            .collect();
        let nodes: Vec<serde_json::Value> = info
            .nodes
            .iter()
            .map(|n| {
                json!({"address": n.address, "started_ms": n.started_ms, "version": n.version,
                    "answering": n.answering})
            })
            .collect();
        let line = json!({"answered_by": answered, "node": info.node, "store": info.store,
            "revision": info.revision, "incarnation": info.incarnation,
            "nodes": nodes, "nodes_error": info.nodes_error,
            "etcd_endpoints": info.etcd_endpoints, "etcd_prefix": info.etcd_prefix,
            "etcd_members": members, "etcd_error": info.etcd_error});
        writeln!(out, "{line}")?;
        return Ok(());
    }
    let mut rows = vec![
        vec!["NODE".to_string(), info.node.clone()],
        vec!["STORE".to_string(), info.store.clone()],
        vec!["REVISION".to_string(), info.revision.to_string()],
    ];
    if info.store == "etcd" {
        rows.push(vec!["ETCD".to_string(), info.etcd_endpoints.join(",")]);
        rows.push(vec!["PREFIX".to_string(), info.etcd_prefix.clone()]);
    }
    let head = table(&["", ""], &rows);
    // The header row of two empty cells is an empty line: drop it.
    write!(out, "{}", head.trim_start_matches('\n'))?;
    if info.nodes_error.is_empty() {
        let nodes: Vec<Vec<String>> = info
            .nodes
            .iter()
            .map(|n| {
                vec![
                    n.address.clone(),
                    n.version.clone(),
                    started(n.started_ms),
                    if n.answering { "answered" } else { "" }.to_string(),
                ]
            })
            .collect();
        write!(
            out,
            "\n{}",
            table(&["REGISTRY NODE", "VERSION", "STARTED", ""], &nodes)
        )?;
    } else {
        writeln!(out, "\nregistry nodes unknown: {}", info.nodes_error)?;
    }
    if info.store == "etcd" {
        if info.etcd_error.is_empty() {
            let members: Vec<Vec<String>> = info
                .etcd_members
                .iter()
                .map(|m| {
                    vec![
                        m.name.clone(),
                        format!("{:x}", m.id),
                        m.client_urls.join(","),
                        if m.leader {
                            "leader"
                        } else if m.learner {
                            "learner"
                        } else {
                            "follower"
                        }
                        .to_string(),
                    ]
                })
                .collect();
            write!(
                out,
                "\n{}",
                table(&["ETCD MEMBER", "ID", "CLIENT URLS", "ROLE"], &members)
            )?;
        } else {
            writeln!(out, "\netcd members unknown: {}", info.etcd_error)?;
        }
    }
    write!(out, "{}", answered_by(&answered))?;
    Ok(())
}

/// A Unix time in ms as people read it: RFC 3339, UTC, to the second.
fn started(unix_ms: u64) -> String {
    chrono::DateTime::from_timestamp_millis(unix_ms as i64).map_or_else(
        || unix_ms.to_string(),
        |at| at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    )
}

fn address(i: &pb::Instance) -> String {
    if i.ip.contains(':') {
        format!("[{}]:{}", i.ip, i.port)
    } else {
        format!("{}:{}", i.ip, i.port)
    }
}

fn instance_row(i: &pb::Instance) -> Vec<String> {
    vec![
        address(i),
        i.cluster.clone(),
        i.weight.unwrap_or(1.0).to_string(),
        yes_no(i.healthy),
        yes_no(i.enabled.unwrap_or(true)),
        yes_no(i.ephemeral.unwrap_or(true)),
    ]
}

fn instance_json(i: &pb::Instance) -> serde_json::Value {
    json!({"service": i.service, "address": address(i), "cluster": i.cluster,
        "weight": i.weight.unwrap_or(1.0), "healthy": i.healthy, "enabled": i.enabled.unwrap_or(true),
        "ephemeral": i.ephemeral.unwrap_or(true), "metadata": i.metadata, "instance_id": i.instance_id})
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.into()
}

/// Left-aligned columns, two spaces apart, measured in terminal cells (华为
/// is four wide, not two).
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    use unicode_width::UnicodeWidthStr;
    let mut widths: Vec<usize> = headers.iter().map(|h| h.width()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.width());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut text = String::new();
        for (i, (cell, width)) in cells.iter().zip(&widths).enumerate() {
            text.push_str(cell);
            if i + 1 < cells.len() {
                text.push_str(&" ".repeat(width - cell.width() + 2));
            }
        }
        text.trim_end().to_string() + "\n"
    };
    let mut out = line(headers.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}
