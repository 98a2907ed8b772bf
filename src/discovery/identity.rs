//! Service identities as services use them (see
//! [`crate::auth::identity`]): a caller's, fetched from the registry for
//! each service it calls and renewed halfway through its life, and a
//! callee's check of who calls it, against the registry's public keys,
//! fetched once and again only when an identity names a key not seen yet.

use std::collections::HashMap;
use std::time::Duration;

use tokio::sync::{Mutex, RwLock};
use tokio::time::Instant;
use tonic::Request;
use tonic::metadata::{Ascii, MetadataValue};

use super::connector::Connector;
use crate::auth::identity::{IDENTITY_HEADER, PublicKey, Refusal, Verifier, now_ms};
use crate::error::Error;
use crate::pb::registry as pb;
use crate::shutdown::Shutdown;

/// How often a callee asks the registry for its keys at most: an identity
/// naming an unknown key costs the registry nothing more than this.
const KEYS_REFRESH_MIN: Duration = Duration::from_secs(1);

/// A service's own identities, one per service it calls.
pub struct Identities {
    connector: Connector,
    namespace: String,
    service: String,
    timeout: Duration,
    /// By audience: the identity, when it was fetched and when it expires
    /// (ms since the epoch).
    held: Mutex<HashMap<String, Held>>,
}

#[derive(Clone)]
struct Held {
    value: MetadataValue<Ascii>,
    fetched_ms: u64,
    expires_ms: u64,
}

impl Identities {
    /// Identities of `service` of `namespace`, fetched through `connector`
    /// (which shows the service's token), each fetch given `timeout`.
    pub fn new(connector: Connector, namespace: &str, service: &str, timeout: Duration) -> Self {
        Identities {
            connector,
            namespace: namespace.into(),
            service: service.into(),
            timeout,
            held: Mutex::new(HashMap::new()),
        }
    }

    /// Puts this service's identity for `audience` on `request`.
    pub async fn show<T>(&self, audience: &str, request: &mut Request<T>) -> Result<(), Error> {
        let value = self.for_audience(audience).await?;
        request.metadata_mut().insert(IDENTITY_HEADER, value);
        Ok(())
    }

    /// The identity for `audience`: the one held while it is in the first
    /// half of its life, else a new one (or, when the registry cannot make
    /// one now, the one held until it expires).
    async fn for_audience(&self, audience: &str) -> Result<MetadataValue<Ascii>, Error> {
        let mut held = self.held.lock().await;
        let now = now_ms();
        let current = held.get(audience).filter(|h| h.expires_ms > now).cloned();
        if let Some(h) = &current
            && now < h.fetched_ms + (h.expires_ms - h.fetched_ms) / 2
        {
            return Ok(h.value.clone());
        }
        match self.fetch(audience).await {
            Ok(fresh) => {
                let value = fresh.value.clone();
                held.insert(audience.into(), fresh);
                Ok(value)
            }
            Err(err) => match current {
                Some(h) => {
                    tracing::warn!(%audience, %err, "cannot renew this service's identity; using the one held until it expires");
                    Ok(h.value)
                }
                None => Err(err),
            },
        }
    }

    async fn fetch(&self, audience: &str) -> Result<Held, Error> {
        let request = pb::IssueIdentityRequest {
            namespace: self.namespace.clone(),
            service: self.service.clone(),
            audience: audience.into(),
        };
        let fetched_ms = now_ms();
        let answer = within(self.timeout, &self.connector, |mut client| async move {
            client.issue_identity(request).await
        })
        .await
        .map_err(|err| {
            Error::Unavailable(format!(
                "cannot get an identity of {} for {audience} from the registry: {err}",
                self.service
            ))
        })?;
        let value = answer.identity.parse().map_err(|_| {
            Error::Unavailable("the registry answered an identity that is not ASCII".into())
        })?;
        Ok(Held {
            value,
            fetched_ms,
            expires_ms: answer.expires_ms,
        })
    }
}

/// A service's check of the identities its callers show.
pub struct Callers {
    connector: Connector,
    namespace: String,
    /// This service: the audience an identity must name.
    me: String,
    timeout: Duration,
    verifier: RwLock<Verifier>,
    /// When the keys were last fetched: they are fetched again at most
    /// every [`KEYS_REFRESH_MIN`].
    fetched: Mutex<Option<Instant>>,
}

impl Callers {
    /// Checks identities shown to `me` of `namespace` with the keys of the
    /// registry `connector` reaches, each fetch given `timeout`.
    pub fn new(connector: Connector, namespace: &str, me: &str, timeout: Duration) -> Self {
        Callers {
            connector,
            namespace: namespace.into(),
            me: me.into(),
            timeout,
            verifier: RwLock::new(Verifier::default()),
            fetched: Mutex::new(None),
        }
    }

    /// Checks that `request` shows an identity of `caller`, made for this
    /// service. Refused: UNAUTHENTICATED with none, or a malformed, forged
    /// or expired one; PERMISSION_DENIED with another service's.
    pub async fn check<T>(&self, request: &Request<T>, caller: &str) -> Result<(), Error> {
        let Some(shown) = request.metadata().get(IDENTITY_HEADER) else {
            return Err(Error::Unauthenticated(format!(
                "only {caller} may call this: show its identity in `{IDENTITY_HEADER}` (the registry's IssueIdentity makes one)"
            )));
        };
        let text = shown.to_str().unwrap_or_default();
        let verified = self
            .verifier
            .read()
            .await
            .verify(text, &self.namespace, caller, &self.me);
        match verified {
            Ok(_) => Ok(()),
            Err(Refusal::Invalid(err)) => Err(err),
            Err(Refusal::UnknownKey(kid)) => {
                self.refresh_keys().await?;
                match self
                    .verifier
                    .read()
                    .await
                    .verify(text, &self.namespace, caller, &self.me)
                {
                    Ok(_) => Ok(()),
                    Err(Refusal::Invalid(err)) => Err(err),
                    Err(Refusal::UnknownKey(_)) => Err(Error::Unauthenticated(format!(
                        "the identity is signed with key {kid}, which the registry does not have"
                    ))),
                }
            }
        }
    }

    async fn refresh_keys(&self) -> Result<(), Error> {
        let mut fetched = self.fetched.lock().await;
        if fetched.is_some_and(|at| at.elapsed() < KEYS_REFRESH_MIN) {
            return Ok(());
        }
        let answer = within(self.timeout, &self.connector, |mut client| async move {
            client
                .get_identity_keys(pb::GetIdentityKeysRequest {})
                .await
        })
        .await
        .map_err(|err| {
            Error::Unavailable(format!(
                "cannot check the caller's identity: the registry's keys are out of reach: {err}"
            ))
        })?;
        *fetched = Some(Instant::now());
        *self.verifier.write().await = Verifier::new(answer.keys.into_iter().map(|k| PublicKey {
            id: k.id,
            key: k.ed25519,
        }));
        Ok(())
    }
}

/// One call to the registry, connection included, within `timeout`.
async fn within<T, F, Fut>(timeout: Duration, connector: &Connector, call: F) -> Result<T, String>
where
    F: FnOnce(super::RegistryClient) -> Fut,
    Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let attempt = async {
        let Some(client) = connector.connect(&Shutdown::new()).await else {
            return Err("the registry is out of reach".to_string());
        };
        call(client)
            .await
            .map(tonic::Response::into_inner)
            .map_err(|status| format!("{:?}: {}", status.code(), status.message()))
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")))
}
