//! The credentials the registry accepts: the grants of its tokens, kept
//! where the rest of what must last is (the data dir in memory, etcd on a
//! cluster), and the check of a token a caller shows.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use super::Registry;
use crate::auth::{Digest32, Grant, Need, Scope, Token, TokenId};
use crate::etcd::{Compare, Op, Txn};
use crate::registry::Error;
use crate::registry::cluster::keys::Key;
use crate::registry::persist;

/// The longest name a token may be given.
const MAX_NAME_LEN: usize = 128;

impl Registry {
    /// Makes a token for `name` with `scope`: stored (durably, or in etcd)
    /// before it is answered. Its text is in the answer and nowhere else.
    pub async fn create_token(&self, name: &str, scope: Scope) -> Result<Token, Error> {
        let name = name.trim();
        if name.is_empty() || name.len() > MAX_NAME_LEN || name.chars().any(char::is_control) {
            return Err(Error::invalid(
                "name",
                format!("1 to {MAX_NAME_LEN} characters, no control characters"),
            ));
        }
        scope.validate()?;
        let max = self.inner.config.auth.max_tokens;
        if self.inner.state.lock().tokens.len() >= max {
            return Err(Error::ResourceExhausted(format!(
                "this registry keeps at most {max} tokens (registry.auth.max_tokens); revoke some first"
            )));
        }
        self.store_token(Token::generate(), name, scope, false)
            .await
    }

    /// Stores the grant of `token`. `first`: only if no first admin token
    /// was ever made (on a cluster, decided in etcd, so nodes that start
    /// together make one between them); answers None when one was.
    async fn store_token_once(
        &self,
        token: Token,
        name: &str,
        scope: Scope,
    ) -> Result<Option<Token>, Error> {
        match self.store_token(token, name, scope, true).await {
            Ok(token) => Ok(Some(token)),
            Err(Error::Aborted(_)) => Ok(None),
            Err(err) => Err(err),
        }
    }

    async fn store_token(
        &self,
        token: Token,
        name: &str,
        scope: Scope,
        first: bool,
    ) -> Result<Token, Error> {
        let grant = Grant {
            id: token.id(),
            name: name.to_string(),
            scope,
            digest: token.digest(),
            created_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
        };
        if let Some(node) = self.node() {
            // The grant serialises: it holds strings and numbers only.
            let value = serde_json::to_vec(&grant).expect("a grant serialises");
            let key = node.key(&Key::Token(grant.id));
            let bootstrap = format!("{}/{FIRST_ADMIN_KEY}", node.prefix);
            let mut compares = vec![Compare::absent(&key)];
            let mut puts = vec![Op::put(&key, value, None)];
            if first {
                compares.push(Compare::absent(&bootstrap));
                puts.push(Op::put(&bootstrap, grant.id.to_string(), None));
            }
            if !node
                .commit(Txn::new().when(compares).and_then(puts))
                .await?
                .succeeded
            {
                return Err(Error::Aborted(
                    "a token with the same id was made at the same moment; try again".into(),
                ));
            }
            return Ok(token);
        }
        let id = grant.id;
        self.inner.state.lock().tokens.insert(id, Arc::new(grant));
        if let Err(err) = self.persist(persist::Subject::Token(id)).await {
            // Undo, so memory never accepts what the disk does not hold.
            self.inner.state.lock().tokens.remove(&id);
            return Err(err);
        }
        tracing::info!(%id, name, "token created");
        Ok(token)
    }

    /// Stops accepting the token `id`, at once (on a cluster: on every node
    /// once its view has the change, on this one before the answer).
    pub async fn revoke_token(&self, id: TokenId) -> Result<(), Error> {
        let unknown = || Error::NotFound(format!("no token {id}"));
        if let Some(node) = self.node() {
            let key = node.key(&Key::Token(id));
            let txn = Txn::new()
                .when([Compare::present(&key)])
                .and_then([Op::delete(&key)]);
            if !node.commit(txn).await?.succeeded {
                return Err(unknown());
            }
            tracing::info!(%id, "token revoked");
            return Ok(());
        }
        let Some(revoked) = self.inner.state.lock().tokens.remove(&id) else {
            return Err(unknown());
        };
        if let Err(err) = self.persist(persist::Subject::Token(id)).await {
            self.inner.state.lock().tokens.insert(id, revoked);
            return Err(err);
        }
        tracing::info!(%id, "token revoked");
        Ok(())
    }

    /// On a registry that checks credentials and accepts no admin token
    /// yet (its first start): makes one and writes it to `dir/admin.token`,
    /// readable by this user only, for the operator to make the others
    /// with. Answers the file's path when it made one. Nothing is ever
    /// made from a default: every token is random.
    pub async fn ensure_admin_token(
        &self,
        dir: &std::path::Path,
    ) -> anyhow::Result<Option<std::path::PathBuf>> {
        // A registry that has tokens is past its first start: one whose
        // admin tokens were all revoked is not given another behind its
        // operator's back.
        if !self.inner.config.auth.enabled || !self.tokens().is_empty() {
            return Ok(None);
        }
        let token = Token::generate();
        let path = dir.join(ADMIN_TOKEN_FILE);
        let cannot_write = |err: std::io::Error| {
            anyhow::anyhow!(
                "cannot write the first admin token to {}: {err}",
                path.display()
            )
        };
        // The token's own temporary file, so nodes of a cluster that share
        // a data dir (as `up --registries 3` does) never write over each
        // other's.
        let tmp = dir.join(format!("{ADMIN_TOKEN_FILE}.{}.tmp", token.id()));
        crate::auth::write_private(&tmp, &token.reveal()).map_err(cannot_write)?;
        // In memory the file goes in place first: a crash before the grant
        // is stored leaves a token nobody accepts, and the next start writes
        // another. On a cluster only the node whose grant etcd takes puts
        // its file in place.
        let clustered = self.node().is_some();
        if !clustered {
            crate::auth::publish(&tmp, &path).map_err(cannot_write)?;
        }
        match self
            .store_token_once(token, "admin (first start)", Scope::Admin)
            .await
        {
            Ok(Some(token)) => {
                if clustered {
                    crate::auth::publish(&tmp, &path).map_err(cannot_write)?;
                }
                tracing::warn!(
                    file = %path.display(),
                    id = %token.id(),
                    "made the first admin token; read it from this file (shop-mesh token create --token-file ...) and keep it safe"
                );
                Ok(Some(path))
            }
            Ok(None) => {
                let _ = std::fs::remove_file(&tmp);
                tracing::info!(
                    "the first admin token was made by another registry node; it is in that node's data dir"
                );
                Ok(None)
            }
            Err(err) => {
                let _ = std::fs::remove_file(if clustered { &tmp } else { &path });
                Err(anyhow::anyhow!("cannot store the first admin token: {err}"))
            }
        }
    }

    /// The lease that keeps the instance `addr` of `service` alive, if it
    /// is ephemeral.
    fn lease_of(
        &self,
        service: &crate::registry::model::ServiceKey,
        addr: &crate::registry::model::InstanceAddr,
    ) -> Option<crate::registry::model::LeaseId> {
        let instance = self.instance(service, addr)?;
        (instance.lease != 0).then_some(instance.lease)
    }

    /// Checks a registration of `spec` on `lease` (0: a new one, or the
    /// one the instance has): the token must cover its service and, when
    /// it joins a lease, every service that lease keeps.
    pub fn authorize_registration(
        &self,
        presented: Option<&str>,
        spec: &crate::registry::model::InstanceSpec,
        lease: crate::registry::model::LeaseId,
    ) -> Result<(), Error> {
        let need = Need::Write {
            namespace: &spec.service.namespace,
            service: &spec.service.name,
        };
        if self.authorize(presented, need)?.is_none() {
            return Ok(());
        }
        let joined = match lease {
            0 => self.lease_of(&spec.service, &spec.addr),
            lease => Some(lease),
        };
        match joined {
            Some(lease) => self.authorize_lease(presented, lease),
            None => Ok(()),
        }
    }

    /// Checks a call that keeps `lease` alive (a beat, or a registration
    /// joining it): the token must cover every service the lease keeps,
    /// so a lease id read elsewhere keeps nothing alive for a caller not
    /// allowed to write them, and a lease with no instance left keeps
    /// nothing alive for anyone. Nothing to look up when credentials are
    /// not checked.
    pub fn authorize_lease(
        &self,
        presented: Option<&str>,
        lease: crate::registry::model::LeaseId,
    ) -> Result<(), Error> {
        if !self.inner.config.auth.enabled {
            return Ok(());
        }
        let services: Vec<crate::registry::model::ServiceKey> = {
            let state = self.inner.state.lock();
            let members = state
                .leases
                .get(&lease)
                .map(|l| &l.members[..])
                .unwrap_or(&[]);
            members.iter().map(|m| (*m.service).clone()).collect()
        };
        if services.is_empty() {
            return Err(Error::PermissionDenied(format!(
                "lease {lease} keeps no instance this registry knows of; register with a token that may write its service, then beat it"
            )));
        }
        for service in &services {
            self.authorize(
                presented,
                Need::Write {
                    namespace: &service.namespace,
                    service: &service.name,
                },
            )?;
        }
        Ok(())
    }

    /// The grants of every token accepted now, oldest first.
    pub fn tokens(&self) -> Vec<Arc<Grant>> {
        let mut grants: Vec<Arc<Grant>> =
            self.inner.state.lock().tokens.values().cloned().collect();
        grants.sort_by_key(|g| (g.created_ms, g.id));
        grants
    }

    /// Checks a call: when the registry checks credentials, `presented`
    /// (the token the caller showed, if any) must be one it accepts, and
    /// its scope must cover `need`. Answers the grant it matched.
    pub fn authorize(
        &self,
        presented: Option<&str>,
        need: Need<'_>,
    ) -> Result<Option<Arc<Grant>>, Error> {
        let auth = &self.inner.config.auth;
        if !auth.enabled || (auth.open_reads && matches!(need, Need::Read { .. } | Need::Describe))
        {
            return Ok(None);
        }
        let Some(presented) = presented else {
            return Err(Error::Unauthenticated(
                "this registry needs a token: send it as `authorization: Bearer smt_...` (shop-mesh token create makes one)".into(),
            ));
        };
        let token: Token = presented.parse()?;
        let grant = self.inner.state.lock().tokens.get(&token.id()).cloned();
        // The digest is compared whether or not the id is known, so the
        // time taken tells nothing about which ids exist.
        let matched = match &grant {
            Some(grant) => grant.digest.matches(&token),
            None => {
                std::hint::black_box(Digest32::NONE.matches(&token));
                false
            }
        };
        // Not a stored token: a console session, perhaps.
        let grant = grant.filter(|_| matched);
        let grant = match grant {
            Some(grant) => Some(grant),
            None => self.inner.sessions.check(&token),
        };
        let grant = grant.ok_or_else(|| {
            Error::Unauthenticated(format!(
                "token {} is unknown or revoked; ask an administrator for another",
                token.id()
            ))
        })?;
        if !grant.scope.allows(need) {
            return Err(Error::PermissionDenied(format!(
                "token {} ({}) may touch {}; {} is outside it",
                grant.id,
                grant.name,
                grant.scope,
                describe(need)
            )));
        }
        Ok(Some(grant))
    }
}

/// The file the first admin token is written to, in the data dir.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

/// The key that says, on a cluster, that the first admin token was made.
const FIRST_ADMIN_KEY: &str = "first-admin-token";

/// What a call needed, as a refusal names it.
fn describe(need: Need<'_>) -> String {
    match need {
        Need::Read { namespace } => format!("reading namespace {namespace}"),
        Need::Write { namespace, service } => {
            format!("changing service {service} of namespace {namespace}")
        }
        Need::Admin => "managing tokens".into(),
        Need::Authenticated | Need::Describe => "calling this registry".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Config;

    fn guarded(enabled: bool) -> Registry {
        let mut config = Config::default();
        config.auth.enabled = enabled;
        Registry::in_memory(&config)
    }

    fn product() -> Scope {
        Scope::Services {
            namespace: "public".into(),
            services: vec!["server-product".into()],
        }
    }

    const WRITE_PRODUCT: Need<'static> = Need::Write {
        namespace: "public",
        service: "server-product",
    };

    #[tokio::test]
    async fn a_token_is_accepted_within_its_scope_until_it_is_revoked() {
        let registry = guarded(true);
        let token = registry.create_token("product", product()).await.unwrap();
        let text = token.reveal();
        let grant = registry.authorize(Some(&text), WRITE_PRODUCT).unwrap();
        assert_eq!(grant.unwrap().name, "product");
        let denied = registry
            .authorize(
                Some(&text),
                Need::Write {
                    namespace: "public",
                    service: "server-order",
                },
            )
            .unwrap_err();
        assert!(matches!(denied, Error::PermissionDenied(_)), "{denied:?}");
        assert!(denied.to_string().contains("server-order"), "{denied}");
        registry.revoke_token(token.id()).await.unwrap();
        let revoked = registry.authorize(Some(&text), WRITE_PRODUCT).unwrap_err();
        assert!(matches!(revoked, Error::Unauthenticated(_)), "{revoked:?}");
        assert!(!revoked.to_string().contains(&text));
        assert!(matches!(
            registry.revoke_token(token.id()).await,
            Err(Error::NotFound(_))
        ));
    }

    #[tokio::test]
    async fn no_token_or_a_forged_one_is_refused_and_nothing_is_needed_when_off() {
        let registry = guarded(true);
        let token = registry.create_token("product", product()).await.unwrap();
        assert!(matches!(
            registry.authorize(None, WRITE_PRODUCT),
            Err(Error::Unauthenticated(_))
        ));
        // The right id with another secret.
        let text = token.reveal();
        let forged = format!(
            "{}{}",
            &text[..text.len() - 1],
            if text.ends_with('0') { '1' } else { '0' }
        );
        assert!(matches!(
            registry.authorize(Some(&forged), WRITE_PRODUCT),
            Err(Error::Unauthenticated(_))
        ));
        assert!(
            guarded(false)
                .authorize(None, Need::Admin)
                .unwrap()
                .is_none()
        );
    }

    #[tokio::test]
    async fn tokens_survive_a_restart_and_a_revocation_does_too() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::default();
        config.auth.enabled = true;
        config.data_dir = dir.path().into();
        let (kept, revoked) = {
            let registry = Registry::open(&config).await.unwrap();
            let kept = registry.create_token("kept", Scope::Admin).await.unwrap();
            let revoked = registry.create_token("gone", Scope::Admin).await.unwrap();
            registry.revoke_token(revoked.id()).await.unwrap();
            registry.close();
            (kept, revoked)
        };
        let registry = Registry::open(&config).await.unwrap();
        assert!(
            registry
                .authorize(Some(&kept.reveal()), Need::Admin)
                .is_ok()
        );
        assert!(
            registry
                .authorize(Some(&revoked.reveal()), Need::Admin)
                .is_err()
        );
        assert_eq!(registry.tokens().len(), 1);
    }

    #[tokio::test]
    async fn the_first_start_writes_an_admin_token_only_its_owner_can_read() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::default();
        config.auth.enabled = true;
        config.data_dir = dir.path().into();
        let registry = Registry::open(&config).await.unwrap();
        let path = registry
            .ensure_admin_token(dir.path())
            .await
            .unwrap()
            .expect("made");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(registry.authorize(Some(text.trim()), Need::Admin).is_ok());
        // Not again while it is accepted.
        assert_eq!(registry.ensure_admin_token(dir.path()).await.unwrap(), None);
        assert_eq!(registry.tokens().len(), 1);
    }

    #[tokio::test]
    async fn bad_names_and_scopes_are_refused_and_the_count_is_bounded() {
        let mut config = Config::default();
        config.auth.max_tokens = 2;
        let registry = Registry::in_memory(&config);
        for name in ["", " ", "a\nb", &"x".repeat(129)] {
            assert!(matches!(
                registry.create_token(name, Scope::Admin).await,
                Err(Error::InvalidArgument { .. })
            ));
        }
        let empty = Scope::Services {
            namespace: "public".into(),
            services: vec![],
        };
        assert!(registry.create_token("x", empty).await.is_err());
        registry.create_token("a", Scope::Admin).await.unwrap();
        registry.create_token("b", Scope::Admin).await.unwrap();
        assert!(matches!(
            registry.create_token("c", Scope::Admin).await,
            Err(Error::ResourceExhausted(_))
        ));
        assert_eq!(registry.tokens().len(), 2);
    }
}
