//! `shop-mesh config get|put|delete|list|history|rollback|promote|abandon|watch`: the
//! registry's config centre from the command line. Content goes in from a
//! file (or `-`, standard input) and comes out to standard output or a
//! file, byte for byte, so `get` piped to `put` round-trips; everything
//! else (versions, digests, who and when) is a table for people, or
//! `--json` (one object per line) for scripts.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde_json::json;

use crate::inspect::{Scope, answered_by, status, table};
use crate::pb::config as pb;
use crate::pb::config::configs_client::ConfigsClient;
use crate::registry::configs::model::ContentType;
use crate::server::Connections;
use crate::shutdown::Shutdown;

/// What to do with config items. Each names its item by data id, in the
/// namespace and group of `--namespace` and `--group` (a role's live
/// settings: `--group shop-mesh`, data id its service name).
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Prints an item's content (or writes it to `--out`).
    Get {
        /// The item's data id.
        data_id: String,
        /// A kept version instead of the current one.
        #[arg(long)]
        version: Option<u64>,
        /// Writes the content to this file instead of standard output.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// Where to look.
        #[command(flatten)]
        scope: Scope,
    },
    /// Publishes content from a file (`-`: standard input), or from
    /// `--content`, as the item's new version.
    Put {
        /// The item's data id.
        data_id: String,
        /// The file to publish; `-` reads standard input.
        #[arg(
            long,
            value_name = "FILE",
            conflicts_with = "content",
            required_unless_present = "content"
        )]
        file: Option<PathBuf>,
        /// The content itself.
        #[arg(long)]
        content: Option<String>,
        /// text, properties, yaml, json or toml; by default from the
        /// file's extension, else text.
        #[arg(long = "type", value_name = "TYPE")]
        content_type: Option<String>,
        /// Only if the item is at this version (0: only if it does not
        /// exist yet).
        #[arg(long, value_name = "VERSION")]
        expect_version: Option<u64>,
        /// Publish as the gray version, for clients at this address
        /// (repeatable); others keep the current version.
        #[arg(long, value_name = "IP")]
        gray_ip: Vec<String>,
        /// Publish as the gray version, for clients with this label
        /// (key=value, repeatable: all must match); a role's labels are
        /// `service` and `instance` (its ip:port).
        #[arg(long, value_name = "KEY=VALUE", value_parser = label)]
        gray_label: Vec<(String, String)>,
        /// Where to publish.
        #[command(flatten)]
        scope: Scope,
    },
    /// Makes an item's gray version its current one, for every client.
    Promote {
        /// The item's data id.
        data_id: String,
        /// The gray version, as `history` lists it.
        #[arg(long, value_name = "VERSION")]
        gray_version: u64,
        /// Where to publish.
        #[command(flatten)]
        scope: Scope,
    },
    /// Drops an item's gray version: its clients go back to the current
    /// one.
    Abandon {
        /// The item's data id.
        data_id: String,
        /// The gray version, as `history` lists it.
        #[arg(long, value_name = "VERSION")]
        gray_version: u64,
        /// Where to publish.
        #[command(flatten)]
        scope: Scope,
    },
    /// Deletes an item and its history.
    Delete {
        /// The item's data id.
        data_id: String,
        /// Only if the item is at this version.
        #[arg(long, value_name = "VERSION")]
        expect_version: Option<u64>,
        /// Where to delete.
        #[command(flatten)]
        scope: Scope,
    },
    /// Lists the items of the namespace and group.
    List {
        /// Only data ids containing this.
        #[arg(long, default_value = "")]
        search: String,
        /// Where to look.
        #[command(flatten)]
        scope: Scope,
    },
    /// Lists the versions kept of an item, newest first.
    History {
        /// The item's data id.
        data_id: String,
        /// Where to look.
        #[command(flatten)]
        scope: Scope,
    },
    /// Publishes a kept version's content again, as a new version.
    Rollback {
        /// The item's data id.
        data_id: String,
        /// The version to restore, as `history` lists it.
        #[arg(long, value_name = "VERSION")]
        to: u64,
        /// Only if the item is at this version.
        #[arg(long, value_name = "VERSION")]
        expect_version: Option<u64>,
        /// Where to publish.
        #[command(flatten)]
        scope: Scope,
    },
    /// Prints each change to an item (or, without a data id, to every
    /// item of the group) as it happens, until Ctrl-C.
    Watch {
        /// The item's data id; every item of the group when left out.
        data_id: Option<String>,
        /// Where to look.
        #[command(flatten)]
        scope: Scope,
    },
}

impl Command {
    /// The flags that say where to look.
    pub fn scope(&self) -> &Scope {
        match self {
            Command::Get { scope, .. }
            | Command::Put { scope, .. }
            | Command::Delete { scope, .. }
            | Command::List { scope, .. }
            | Command::History { scope, .. }
            | Command::Rollback { scope, .. }
            | Command::Promote { scope, .. }
            | Command::Abandon { scope, .. }
            | Command::Watch { scope, .. } => scope,
        }
    }

    /// Runs it against the registry; a watch until `shutdown`.
    pub async fn run(
        self,
        config: &crate::discovery::Config,
        connections: &Connections,
        shutdown: Shutdown,
    ) -> anyhow::Result<()> {
        let (channel, answered) = crate::inspect::channel(config, connections).await?;
        let mut client = ConfigsClient::new(channel);
        let (namespace, group) = (config.namespace.clone(), config.group.clone());
        let mut out = std::io::stdout().lock();
        match self {
            Command::Get {
                data_id,
                version,
                out: file,
                scope,
            } => {
                let item = client
                    .get(pb::GetRequest {
                        namespace,
                        group,
                        data_id,
                        version,
                        client: None,
                    })
                    .await
                    .map_err(status)?
                    .into_inner()
                    .item
                    .unwrap_or_default();
                if scope.json {
                    writeln!(out, "{}", item_json(&item, true, &answered))?;
                } else if let Some(file) = file {
                    std::fs::write(&file, &item.content)
                        .map_err(|err| anyhow::anyhow!("cannot write {}: {err}", file.display()))?;
                    eprintln!(
                        "{} version {} ({} bytes, md5 {}) written to {}",
                        item.data_id,
                        item.version,
                        item.size,
                        item.md5,
                        file.display()
                    );
                } else {
                    out.write_all(item.content.as_bytes())?;
                }
            }
            Command::Put {
                data_id,
                file,
                content,
                content_type,
                expect_version,
                gray_ip,
                gray_label,
                scope,
            } => {
                let content = match (content, &file) {
                    (Some(content), _) => content,
                    (None, Some(file)) => read_content(file)?,
                    (None, None) => {
                        anyhow::bail!("give the content: --file FILE, --file -, or --content TEXT")
                    }
                };
                let kind = match content_type {
                    Some(name) => ContentType::parse("--type", &name)?,
                    None => file.as_deref().map_or(ContentType::Text, type_of_file),
                };
                let published = client
                    .publish(pb::PublishRequest {
                        namespace,
                        group,
                        data_id,
                        content,
                        content_type: pb::ContentType::from(kind) as i32,
                        expected_version: expect_version,
                        gray: (!gray_ip.is_empty() || !gray_label.is_empty()).then(|| {
                            pb::GrayRule {
                                ips: gray_ip,
                                labels: gray_label.into_iter().collect(),
                            }
                        }),
                    })
                    .await
                    .map_err(status)?
                    .into_inner();
                let item = published.item.unwrap_or_default();
                if scope.json {
                    writeln!(out, "{}", item_json(&item, false, &answered))?;
                } else {
                    writeln!(
                        out,
                        "published {}/{}/{} {}version {} ({}, {} bytes, md5 {})",
                        item.namespace,
                        item.group,
                        item.data_id,
                        if item.gray.is_some() { "gray " } else { "" },
                        item.version,
                        kind.name(),
                        item.size,
                        item.md5
                    )?;
                }
            }
            Command::Delete {
                data_id,
                expect_version,
                scope,
            } => {
                let answer = client
                    .delete(pb::DeleteRequest {
                        namespace: namespace.clone(),
                        group: group.clone(),
                        data_id: data_id.clone(),
                        expected_version: expect_version,
                    })
                    .await
                    .map_err(status)?
                    .into_inner();
                if scope.json {
                    writeln!(
                        out,
                        "{}",
                        json!({"namespace": namespace, "group": group, "data_id": data_id,
                            "deleted_at_revision": answer.revision, "answered_by": answered})
                    )?;
                } else {
                    writeln!(
                        out,
                        "deleted {namespace}/{group}/{data_id} at revision {}",
                        answer.revision
                    )?;
                }
            }
            Command::List { search, scope } => {
                let mut items = Vec::new();
                for page in 1.. {
                    let answer = client
                        .list(pb::ListRequest {
                            namespace: namespace.clone(),
                            group: group.clone(),
                            search: search.clone(),
                            page,
                            page_size: 1000,
                        })
                        .await
                        .map_err(status)?
                        .into_inner();
                    let done = answer.items.len() < 1000;
                    items.extend(answer.items);
                    if done {
                        break;
                    }
                }
                if scope.json {
                    for item in &items {
                        writeln!(out, "{}", item_json(item, false, &answered))?;
                    }
                } else {
                    let rows: Vec<Vec<String>> = items.iter().map(item_row).collect();
                    write!(
                        out,
                        "{}{}",
                        table(
                            &[
                                "DATA ID", "TYPE", "VERSION", "BYTES", "MD5", "BY", "MODIFIED"
                            ],
                            &rows
                        ),
                        answered_by(&answered)
                    )?;
                }
            }
            Command::History { data_id, scope } => {
                let versions = client
                    .history(pb::HistoryRequest {
                        namespace,
                        group,
                        data_id,
                    })
                    .await
                    .map_err(status)?
                    .into_inner()
                    .versions;
                if scope.json {
                    for item in &versions {
                        writeln!(out, "{}", item_json(item, false, &answered))?;
                    }
                } else {
                    let rows: Vec<Vec<String>> = versions
                        .iter()
                        .map(|v| {
                            let mut row = item_row(v);
                            row.remove(0);
                            row.push(match v.rolled_back_from {
                                0 => String::new(),
                                from => format!("rollback to {from}"),
                            });
                            row
                        })
                        .collect();
                    write!(
                        out,
                        "{}{}",
                        table(
                            &["TYPE", "VERSION", "BYTES", "MD5", "BY", "MODIFIED", "NOTE"],
                            &rows
                        ),
                        answered_by(&answered)
                    )?;
                }
            }
            Command::Rollback {
                data_id,
                to,
                expect_version,
                scope,
            } => {
                let item = client
                    .rollback(pb::RollbackRequest {
                        namespace,
                        group,
                        data_id,
                        version: to,
                        expected_version: expect_version,
                    })
                    .await
                    .map_err(status)?
                    .into_inner()
                    .item
                    .unwrap_or_default();
                if scope.json {
                    writeln!(out, "{}", item_json(&item, false, &answered))?;
                } else {
                    writeln!(
                        out,
                        "rolled {}/{}/{} back to version {to}: now version {} (md5 {})",
                        item.namespace, item.group, item.data_id, item.version, item.md5
                    )?;
                }
            }
            Command::Promote {
                data_id,
                gray_version,
                scope,
            } => {
                let item = client
                    .promote(pb::PromoteRequest {
                        namespace,
                        group,
                        data_id,
                        gray_version,
                    })
                    .await
                    .map_err(status)?
                    .into_inner()
                    .item
                    .unwrap_or_default();
                if scope.json {
                    writeln!(out, "{}", item_json(&item, false, &answered))?;
                } else {
                    writeln!(
                        out,
                        "promoted gray version {gray_version} of {}/{}/{}: now version {} for every client",
                        item.namespace, item.group, item.data_id, item.version
                    )?;
                }
            }
            Command::Abandon {
                data_id,
                gray_version,
                scope,
            } => {
                let answer = client
                    .abandon(pb::AbandonRequest {
                        namespace: namespace.clone(),
                        group: group.clone(),
                        data_id: data_id.clone(),
                        gray_version,
                    })
                    .await
                    .map_err(status)?
                    .into_inner();
                if scope.json {
                    writeln!(
                        out,
                        "{}",
                        json!({"namespace": namespace, "group": group, "data_id": data_id,
                            "abandoned_at_revision": answer.revision, "answered_by": answered})
                    )?;
                } else {
                    writeln!(
                        out,
                        "abandoned gray version {gray_version} of {namespace}/{group}/{data_id} at revision {}",
                        answer.revision
                    )?;
                }
            }
            Command::Watch { data_id, scope } => {
                drop(out);
                return watch(
                    &mut client,
                    pb::WatchRequest {
                        namespace,
                        group,
                        data_id: data_id.unwrap_or_default(),
                        ..Default::default()
                    },
                    (scope.json, &answered),
                    shutdown,
                )
                .await;
            }
        }
        out.flush()?;
        Ok(())
    }
}

/// Prints each answer of a watch as lines, until `shutdown`.
async fn watch<S>(
    client: &mut ConfigsClient<S>,
    request: pb::WatchRequest,
    (json, answered): (bool, &str),
    shutdown: Shutdown,
) -> anyhow::Result<()>
where
    S: tonic::client::GrpcService<tonic::body::Body>,
    S::Error: Into<tonic::codegen::StdError>,
    S::ResponseBody: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    <S::ResponseBody as http_body::Body>::Error: Into<tonic::codegen::StdError> + Send,
{
    let mut stream = client.watch(request).await.map_err(status)?.into_inner();
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
        // Every item of a snapshot is a line of its own, like a change.
        let (event, items) = match answer.body {
            Some(pb::watch_response::Body::Snapshot(s)) => {
                (if s.reset { "reset" } else { "snapshot" }, s.items)
            }
            Some(pb::watch_response::Body::Change(change)) => {
                let event = match change.kind() {
                    pb::change::Kind::Delete => "delete",
                    _ => "put",
                };
                (event, change.item.into_iter().collect())
            }
            None => continue,
        };
        let mut out = std::io::stdout().lock();
        for item in &items {
            if json {
                let mut line = item_json(item, true, answered);
                line["revision"] = answer.revision.into();
                line["event"] = event.into();
                writeln!(out, "{line}")?;
            } else {
                let row = item_row(item).join("  ");
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

/// A `key=value` label.
fn label(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{text:?} is not key=value"))
}

/// A file's content, or standard input's for `-`; it must be UTF-8.
fn read_content(file: &Path) -> anyhow::Result<String> {
    let mut bytes = Vec::new();
    if file == Path::new("-") {
        std::io::stdin().read_to_end(&mut bytes)?;
    } else {
        bytes = std::fs::read(file)
            .map_err(|err| anyhow::anyhow!("cannot read {}: {err}", file.display()))?;
    }
    String::from_utf8(bytes).map_err(|err| {
        anyhow::anyhow!(
            "{} is not UTF-8 text (byte {} is not); the config centre keeps text",
            file.display(),
            err.utf8_error().valid_up_to()
        )
    })
}

/// The type a file's extension names; text when it names none.
fn type_of_file(file: &Path) -> ContentType {
    let extension = file
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or_default();
    ContentType::parse("extension", extension).unwrap_or(ContentType::Text)
}

fn type_name(item: &pb::Item) -> &'static str {
    ContentType::from(item.content_type()).name()
}

/// When, as a person reads it: UTC, to the second.
fn when(ms: u64) -> String {
    chrono::DateTime::from_timestamp_millis(ms as i64)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_default()
}

fn item_row(item: &pb::Item) -> Vec<String> {
    let version = match (&item.gray, item.gray_version) {
        (Some(_), _) => format!("{} (gray)", item.version),
        (None, 0) => item.version.to_string(),
        (None, gray) => format!("{} (gray {gray} beside)", item.version),
    };
    vec![
        item.data_id.clone(),
        type_name(item).into(),
        version,
        item.size.to_string(),
        item.md5.clone(),
        item.modified_by.clone(),
        when(item.modified_ms),
    ]
}

/// The JSON API's item, with or without its content, and who answered.
fn item_json(item: &pb::Item, content: bool, answered: &str) -> serde_json::Value {
    let mut line = crate::registry::configs::grpc::item_json(item);
    if let Some(fields) = line.as_object_mut().filter(|_| !content) {
        fields.remove("content");
    }
    line["answered_by"] = answered.into();
    line
}
