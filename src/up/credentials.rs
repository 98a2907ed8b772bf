//! The credentials `up` hands out, so that a registry that checks them
//! (the default) costs a newcomer nothing: each service gets a token that
//! may register itself and nothing else, and the shell a token that may
//! read, all made with the registry's first admin token. Each is kept in
//! a file of its own (mode 0600), so `up` run again over the same data
//! dir gives the services the tokens it gave them before, as long as the
//! registry still accepts them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::auth::{Secret, Token};
use crate::discovery::RegistryClient;
use crate::inspect::status;
use crate::pb::registry as pb;
use crate::registry::ADMIN_TOKEN_FILE;
use crate::server::Connections;

/// The file a service's token is kept in, in its data dir.
pub const SERVICE_TOKEN_FILE: &str = "registry.token";

/// The file the shell's read-only token is kept in, in `up`'s data dir.
pub const CLI_TOKEN_FILE: &str = "cli.token";

/// What `up` hands out.
pub struct Handed {
    /// A read-only token, and the file it is kept in.
    pub reader: (Secret, PathBuf),
    /// Each service's token, by service name.
    pub services: Vec<(&'static str, Secret)>,
}

/// Reads the registry's admin token from `registry_dir`, then gives each
/// of `services` (name and data dir) a token, and `cli_dir` a read-only
/// one, reusing those kept from an earlier run.
pub async fn hand_out(
    discovery: &crate::discovery::Config,
    connections: &Connections,
    registry_dir: &Path,
    services: &[(&'static str, PathBuf)],
    cli_dir: &Path,
) -> anyhow::Result<Handed> {
    // Any answer, even a refusal, comes once the registry serves, and it
    // serves once its first start has written the admin token.
    let (mut first, _) = crate::inspect::client(discovery, connections).await?;
    tokio::time::timeout(
        super::START_TIMEOUT,
        first.get_cluster(pb::GetClusterRequest {}),
    )
    .await
    .map_err(|_| {
        anyhow::anyhow!(
            "the registry did not answer within {:?}",
            super::START_TIMEOUT
        )
    })?
    .ok();
    let admin_file = registry_dir.join(ADMIN_TOKEN_FILE);
    // Nodes of a cluster that start together serve before the one whose
    // token etcd took has put its file in place: wait for it a while.
    let deadline = tokio::time::Instant::now() + super::START_TIMEOUT;
    while !admin_file.exists() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let admin = std::fs::read_to_string(&admin_file).with_context(|| {
        format!(
            "the registry checks credentials, and up hands the services theirs with its first admin token, but {} cannot be read; \
             restore it, or start over with another --data-dir",
            admin_file.display()
        )
    })?;
    let admin = Secret::from(admin.lines().next().unwrap_or_default().trim().to_string());
    let mut as_admin = discovery.clone();
    as_admin.token = admin;
    as_admin.token_file = PathBuf::new();
    let (mut client, _) = crate::inspect::client(&as_admin, connections).await?;
    let accepted: HashMap<String, Option<pb::TokenScope>> = client
        .list_tokens(pb::ListTokensRequest {})
        .await
        .map_err(|err| {
            status(err).context(format!(
                "the registry refused the admin token in {}",
                admin_file.display()
            ))
        })?
        .into_inner()
        .tokens
        .into_iter()
        .map(|t| (t.id, t.scope))
        .collect();
    let mut handed = Vec::new();
    for (service, dir) in services {
        let scope = pb::TokenScope {
            namespace: discovery.namespace.clone(),
            services: vec![(*service).to_string()],
            ..Default::default()
        };
        let file = dir.join(SERVICE_TOKEN_FILE);
        let token = kept_or_made(
            &mut client,
            &accepted,
            &file,
            &format!("up: {service}"),
            scope,
        )
        .await?;
        handed.push((*service, token));
    }
    let scope = pb::TokenScope {
        read_namespace: discovery.namespace.clone(),
        ..Default::default()
    };
    let file = cli_dir.join(CLI_TOKEN_FILE);
    let reader = kept_or_made(&mut client, &accepted, &file, "up: command line", scope).await?;
    Ok(Handed {
        reader: (reader, file),
        services: handed,
    })
}

/// The token kept in `file` if the registry still accepts it for
/// `scope`, else a new one of `scope`, kept there (the one it replaces,
/// if the registry still has it, revoked).
async fn kept_or_made(
    client: &mut RegistryClient,
    accepted: &HashMap<String, Option<pb::TokenScope>>,
    file: &Path,
    name: &str,
    scope: pb::TokenScope,
) -> anyhow::Result<Secret> {
    let kept = std::fs::read_to_string(file)
        .ok()
        .and_then(|text| text.trim().parse::<Token>().ok());
    if let Some(token) = &kept {
        let id = token.id().to_string();
        match accepted.get(&id) {
            Some(Some(granted)) if *granted == scope => return Ok(Secret::from(token.reveal())),
            // Made for another namespace: replaced, and no longer good.
            Some(_) => {
                client
                    .revoke_token(pb::RevokeTokenRequest { id })
                    .await
                    .map_err(|err| {
                        status(err).context(format!("cannot revoke the old token for {name}"))
                    })?;
            }
            None => {}
        }
    }
    let made = client
        .create_token(pb::CreateTokenRequest {
            name: name.into(),
            scope: Some(scope),
        })
        .await
        .map_err(|err| status(err).context(format!("cannot make a token for {name}")))?
        .into_inner();
    let tmp = file.with_extension("token.tmp");
    crate::auth::write_private(&tmp, &made.token)
        .and_then(|()| crate::auth::publish(&tmp, file))
        .with_context(|| format!("cannot keep the token for {name} in {}", file.display()))?;
    Ok(Secret::from(made.token))
}
