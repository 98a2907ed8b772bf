//! `shop-mesh token create|list|revoke`: the registry's credentials,
//! managed with a token of the admin scope (`--token-file`, or
//! `discovery.token`).

use std::io::Write;

use serde_json::json;

use crate::inspect::{Scope, client, status, table};
use crate::pb::registry as pb;
use crate::server::Connections;

/// What to do with tokens.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Makes a token and prints it (once: the registry keeps only a
    /// digest of it).
    Create {
        /// Who or what it is for.
        #[arg(long)]
        name: String,
        /// Everything, tokens included.
        #[arg(long, conflicts_with_all = ["read", "service"])]
        admin: bool,
        /// Reads only, of this namespace (`*`: all).
        #[arg(long, value_name = "NAMESPACE", conflicts_with = "service")]
        read: Option<String>,
        /// Reads of the namespace, and writes to these services (a name,
        /// or a prefix ending in `*`); repeat for more.
        #[arg(long, value_name = "NAME")]
        service: Vec<String>,
        /// Where to look.
        #[command(flatten)]
        scope: Scope,
    },
    /// Lists the tokens the registry accepts, without their secrets.
    List {
        /// Where to look.
        #[command(flatten)]
        scope: Scope,
    },
    /// Stops the registry accepting a token, at once.
    Revoke {
        /// The token's id, as `token list` prints it.
        id: String,
        /// Where to look.
        #[command(flatten)]
        scope: Scope,
    },
}

impl Command {
    /// The flags that say where to look.
    pub fn scope(&self) -> &Scope {
        match self {
            Command::Create { scope, .. }
            | Command::List { scope }
            | Command::Revoke { scope, .. } => scope,
        }
    }

    /// Runs it against the registry.
    pub async fn run(
        self,
        config: &crate::discovery::Config,
        connections: &Connections,
    ) -> anyhow::Result<()> {
        let (mut client, _) = client(config, connections).await?;
        let mut out = std::io::stdout().lock();
        match self {
            Command::Create {
                name,
                admin,
                read,
                service,
                scope: flags,
            } => {
                let scope = match (admin, read) {
                    (true, _) => pb::TokenScope {
                        admin: true,
                        ..Default::default()
                    },
                    (false, Some(namespace)) => pb::TokenScope {
                        read_namespace: namespace,
                        ..Default::default()
                    },
                    (false, None) if !service.is_empty() => pb::TokenScope {
                        namespace: config.namespace.clone(),
                        services: service,
                        ..Default::default()
                    },
                    (false, None) => anyhow::bail!(
                        "say what the token may touch: --admin, --read <namespace>, or --service <name> (repeatable)"
                    ),
                };
                let made = client
                    .create_token(pb::CreateTokenRequest {
                        name,
                        scope: Some(scope),
                    })
                    .await
                    .map_err(status)?
                    .into_inner();
                if flags.json {
                    writeln!(out, "{}", json!({"id": made.id, "token": made.token}))?;
                } else {
                    writeln!(out, "{}", made.token)?;
                    eprintln!(
                        "token {} made; keep it now, it cannot be shown again",
                        made.id
                    );
                }
            }
            Command::List { scope } => {
                let answer = client
                    .list_tokens(pb::ListTokensRequest {})
                    .await
                    .map_err(status)?
                    .into_inner();
                if scope.json {
                    for t in &answer.tokens {
                        let line = json!({"id": t.id, "name": t.name,
                            "scope": describe(t.scope.as_ref()), "created_ms": t.created_ms});
                        writeln!(out, "{line}")?;
                    }
                } else {
                    let rows: Vec<Vec<String>> = answer
                        .tokens
                        .iter()
                        .map(|t| vec![t.id.clone(), t.name.clone(), describe(t.scope.as_ref())])
                        .collect();
                    write!(out, "{}", table(&["ID", "NAME", "SCOPE"], &rows))?;
                }
            }
            Command::Revoke { id, .. } => {
                client
                    .revoke_token(pb::RevokeTokenRequest { id: id.clone() })
                    .await
                    .map_err(status)?;
                writeln!(out, "token {id} revoked")?;
            }
        }
        Ok(())
    }
}

/// A scope as `token list` prints it.
fn describe(scope: Option<&pb::TokenScope>) -> String {
    match scope {
        None => "-".into(),
        Some(s) if s.admin => "admin".into(),
        Some(s) if !s.read_namespace.is_empty() => format!("read {}", s.read_namespace),
        Some(s) => format!("services {}/{}", s.namespace, s.services.join(",")),
    }
}
