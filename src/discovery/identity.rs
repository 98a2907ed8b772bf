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
    /// By audience: the identity held, read by every call.
    held: parking_lot::Mutex<HashMap<String, Held>>,
    /// One fetch at a time; calls that find an identity still good use it
    /// rather than wait for a renewal.
    fetching: Mutex<()>,
}

#[derive(Clone)]
struct Held {
    value: MetadataValue<Ascii>,
    /// When it was fetched and when it expires, on this host's clock
    /// (the registry's expiry, moved by how far the clocks disagree).
    fetched: Instant,
    expires: Instant,
    /// No renewal is tried before this, after one failed.
    retry_after: Option<Instant>,
}

impl Held {
    fn good(&self, now: Instant) -> bool {
        now < self.expires
    }

    fn due(&self, now: Instant) -> bool {
        now >= self.fetched + (self.expires - self.fetched) / 2
            && self.retry_after.is_none_or(|at| now >= at)
    }
}

/// How long a failed renewal waits before the next, while the identity
/// held is still good.
const RENEW_RETRY: Duration = Duration::from_secs(1);

impl Identities {
    /// Identities of `service` of `namespace`, fetched through `connector`
    /// (which shows the service's token), each fetch given `timeout`.
    pub fn new(connector: Connector, namespace: &str, service: &str, timeout: Duration) -> Self {
        Identities {
            connector,
            namespace: namespace.into(),
            service: service.into(),
            timeout,
            held: parking_lot::Mutex::new(HashMap::new()),
            fetching: Mutex::new(()),
        }
    }

    /// Puts this service's identity for `audience` on `request`.
    pub async fn show<T>(&self, audience: &str, request: &mut Request<T>) -> Result<(), Error> {
        let value = self.for_audience(audience).await?;
        request.metadata_mut().insert(IDENTITY_HEADER, value);
        Ok(())
    }

    /// Drops the identity held for `audience` (its audience refused it),
    /// so the next call fetches a new one.
    pub fn forget(&self, audience: &str) {
        self.held.lock().remove(audience);
    }

    /// The identity for `audience`: the one held while it is in the first
    /// half of its life; past that, a renewal by one call while the others
    /// go on with the one held, until it expires.
    async fn for_audience(&self, audience: &str) -> Result<MetadataValue<Ascii>, Error> {
        let held = self.held.lock().get(audience).cloned();
        let now = Instant::now();
        if let Some(h) = &held
            && h.good(now)
        {
            if !h.due(now) {
                return Ok(h.value.clone());
            }
            // Someone is renewing it: this call does not wait.
            let Ok(_fetching) = self.fetching.try_lock() else {
                return Ok(h.value.clone());
            };
            return Ok(self.renew(audience, h.clone()).await);
        }
        let _fetching = self.fetching.lock().await;
        // Fetched by another call meanwhile?
        if let Some(h) = self.held.lock().get(audience)
            && h.good(Instant::now())
        {
            return Ok(h.value.clone());
        }
        let fresh = self.fetch(audience).await?;
        let value = fresh.value.clone();
        self.held.lock().insert(audience.into(), fresh);
        Ok(value)
    }

    /// A renewal of `held`, which is still good: on failure it is kept
    /// (and no renewal tried for a while).
    async fn renew(&self, audience: &str, held: Held) -> MetadataValue<Ascii> {
        match self.fetch(audience).await {
            Ok(fresh) => {
                let value = fresh.value.clone();
                self.held.lock().insert(audience.into(), fresh);
                value
            }
            Err(err) => {
                tracing::warn!(%audience, %err, "cannot renew this service's identity; using the one held until it expires");
                let mut held = held;
                held.retry_after = Some(Instant::now() + RENEW_RETRY);
                let value = held.value.clone();
                self.held.lock().insert(audience.into(), held);
                value
            }
        }
    }

    async fn fetch(&self, audience: &str) -> Result<Held, Error> {
        let request = pb::IssueIdentityRequest {
            namespace: self.namespace.clone(),
            service: self.service.clone(),
            audience: audience.into(),
        };
        let (fetched, fetched_ms) = (Instant::now(), now_ms());
        let answer = within(self.timeout, &self.connector, |mut client| async move {
            client.issue_identity(request).await
        })
        .await
        .map_err(|err| match err {
            // Refused: the token does not make this service this service.
            Called::Refused(code, message) => Error::FailedPrecondition(format!(
                "the registry refuses {} an identity for {audience} ({code:?}: {message}); give it a token that may register {}",
                self.service, self.service
            )),
            Called::Failed(err) => Error::Unavailable(format!(
                "cannot get an identity of {} for {audience} from the registry: {err}",
                self.service
            )),
        })?;
        let mut value: MetadataValue<Ascii> = answer.identity.parse().map_err(|_| {
            Error::Unavailable("the registry answered an identity that is not ASCII".into())
        })?;
        // Kept out of debug output and of HPACK's shared table, as tokens are.
        value.set_sensitive(true);
        let life = Duration::from_millis(answer.expires_ms.saturating_sub(fetched_ms));
        Ok(Held {
            value,
            fetched,
            expires: fetched + life,
            retry_after: None,
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
        let verify = |verifier: &Verifier| {
            verifier
                .verify(text, &self.namespace, caller, &self.me)
                .map(drop)
        };
        // Bound first, so the read lock is let go before a refresh writes.
        let first = verify(&*self.verifier.read().await);
        match first {
            Err(Refusal::UnknownKey(_)) => self.refresh_keys().await?,
            checked => return checked.map_err(Refusal::into_error),
        }
        let second = verify(&*self.verifier.read().await);
        second.map_err(Refusal::into_error)
    }

    async fn refresh_keys(&self) -> Result<(), Error> {
        let mut fetched = self.fetched.lock().await;
        if fetched.is_some_and(|at| at.elapsed() < KEYS_REFRESH_MIN) {
            return Ok(());
        }
        // Stamped before the call, so a failing registry is asked no more
        // often than a working one, however many forged key ids arrive.
        *fetched = Some(Instant::now());
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
        *self.verifier.write().await = Verifier::new(answer.keys.into_iter().map(|k| PublicKey {
            id: k.id,
            key: k.ed25519,
        }));
        Ok(())
    }
}

/// Why a call to the registry got no answer.
enum Called {
    /// The registry refused the caller's credential.
    Refused(tonic::Code, String),
    /// It could not be reached, or failed otherwise.
    Failed(String),
}

impl std::fmt::Display for Called {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Called::Refused(code, message) => write!(f, "{code:?}: {message}"),
            Called::Failed(err) => f.write_str(err),
        }
    }
}

/// One call to the registry, connection included, within `timeout`.
async fn within<T, F, Fut>(timeout: Duration, connector: &Connector, call: F) -> Result<T, Called>
where
    F: FnOnce(super::RegistryClient) -> Fut,
    Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let attempt = async {
        let Some(client) = connector.connect(&Shutdown::new()).await else {
            return Err(Called::Failed("the registry is out of reach".to_string()));
        };
        call(client)
            .await
            .map(tonic::Response::into_inner)
            .map_err(|status| match status.code() {
                tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => {
                    Called::Refused(status.code(), status.message().to_owned())
                }
                code => Called::Failed(format!("{code:?}: {}", status.message())),
            })
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .unwrap_or_else(|_| Err(Called::Failed(format!("no answer within {timeout:?}"))))
}
