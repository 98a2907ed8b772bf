//! Service identities: short-lived, signed statements that the registry
//! makes for a service and that the service shows to another one.
//!
//! A token proves who a caller is to the registry, but must not be shown
//! to a peer: the product service would then hold the order service's
//! token and could register as `server-order`. So the order service asks
//! the registry, with its own token, for an identity that says "this is
//! `server-order` of namespace `public`, for `server-product` only, until
//! T", signed with the registry's Ed25519 key. The product service checks
//! it with the registry's public key, which it fetches once: no call to
//! the registry per request, and nothing the product service receives is
//! good for anything but calling the product service until T (the scheme
//! of SPIFFE's JWT identities, without JWT's choice of algorithm).
//!
//! An identity's text is `smi_<claims>.<signature>`, both base64url; the
//! claims are JSON, and the signature covers the claims' base64 text.

use std::collections::HashMap;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ring::signature::{self, Ed25519KeyPair, KeyPair};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::Error;

/// The prefix of every identity's text.
pub const IDENTITY_PREFIX: &str = "smi_";

/// The gRPC metadata key an identity travels in.
pub const IDENTITY_HEADER: &str = "x-shop-mesh-identity";

/// The longest identity text accepted: claims are a few short names.
const MAX_IDENTITY_LEN: usize = 2048;

/// What an identity says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The key that signed it.
    pub kid: String,
    /// The namespace of the service it names.
    pub ns: String,
    /// The service it names: who shows it.
    pub sub: String,
    /// The service it is for: who may accept it.
    pub aud: String,
    /// When it stops being good, in milliseconds since the Unix epoch.
    pub exp: u64,
}

/// The registry's signing key.
pub struct Signer {
    pair: Ed25519KeyPair,
    /// The key as it is stored: PKCS#8.
    pkcs8: Vec<u8>,
    kid: String,
}

impl fmt::Debug for Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signer({}, key hidden)", self.kid)
    }
}

impl Signer {
    /// A new key from the operating system's generator.
    pub fn generate() -> Signer {
        let rng = ring::rand::SystemRandom::new();
        // Fails only when the system has no randomness, which nothing here
        // could go on without.
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).expect("the system's random generator");
        Signer::from_pkcs8(pkcs8.as_ref()).expect("a key just generated reads back")
    }

    /// The key stored as `pkcs8`.
    pub fn from_pkcs8(pkcs8: &[u8]) -> Result<Signer, String> {
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8).map_err(|err| format!("{err}"))?;
        let kid = key_id(pair.public_key().as_ref());
        Ok(Signer {
            pair,
            pkcs8: pkcs8.to_vec(),
            kid,
        })
    }

    /// The key as it is stored.
    pub fn pkcs8(&self) -> &[u8] {
        &self.pkcs8
    }

    /// The public half, as [`Verifier`]s are given it.
    pub fn public(&self) -> PublicKey {
        PublicKey {
            id: self.kid.clone(),
            key: self.pair.public_key().as_ref().to_vec(),
        }
    }

    /// An identity of `sub` (of `ns`) for `aud`, good for `ttl` from now.
    pub fn issue(&self, ns: &str, sub: &str, aud: &str, ttl: Duration) -> (String, u64) {
        let exp = now_ms().saturating_add(ttl.as_millis() as u64);
        let claims = Claims {
            kid: self.kid.clone(),
            ns: ns.into(),
            sub: sub.into(),
            aud: aud.into(),
            exp,
        };
        let payload = B64.encode(serde_json::to_vec(&claims).expect("claims serialise"));
        let sig = B64.encode(self.pair.sign(payload.as_bytes()));
        (format!("{IDENTITY_PREFIX}{payload}.{sig}"), exp)
    }
}

/// A public key of the registry's, by its id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    /// Its id: the first 8 bytes of its SHA-256, in hex.
    pub id: String,
    /// The Ed25519 public key's 32 bytes.
    pub key: Vec<u8>,
}

/// The id of a public key.
fn key_id(public: &[u8]) -> String {
    Sha256::digest(public)[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Checks identities against the registry's public keys.
#[derive(Debug, Default, Clone)]
pub struct Verifier {
    keys: HashMap<String, Vec<u8>>,
}

/// Why an identity was not accepted.
#[derive(Debug)]
pub enum Refusal {
    /// Signed by a key this verifier does not have (yet): fetch the
    /// registry's keys and try again.
    UnknownKey(String),
    /// Not acceptable, and never will be.
    Invalid(Error),
}

impl Refusal {
    /// The refusal as its caller is answered: a key still unknown once
    /// the registry's keys were fetched is one the registry does not have.
    pub fn into_error(self) -> Error {
        match self {
            Refusal::Invalid(err) => err,
            Refusal::UnknownKey(kid) => Error::Unauthenticated(format!(
                "the identity is signed with key {kid}, which the registry does not have"
            )),
        }
    }
}

impl Verifier {
    /// A verifier that trusts `keys`.
    pub fn new(keys: impl IntoIterator<Item = PublicKey>) -> Verifier {
        Verifier {
            keys: keys.into_iter().map(|k| (k.id, k.key)).collect(),
        }
    }

    /// Whether it has any key.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Checks that `text` is an unexpired identity of `sub` of `ns`, made
    /// for `aud` and signed by a key of this verifier.
    pub fn verify(&self, text: &str, ns: &str, sub: &str, aud: &str) -> Result<Claims, Refusal> {
        let refuse = |message: String| Refusal::Invalid(Error::PermissionDenied(message));
        let malformed = || {
            Refusal::Invalid(Error::Unauthenticated(format!(
                "the identity is malformed: expected {IDENTITY_PREFIX}<claims>.<signature>, as the registry's IssueIdentity makes it"
            )))
        };
        if text.len() > MAX_IDENTITY_LEN {
            return Err(malformed());
        }
        let (payload, sig) = text
            .strip_prefix(IDENTITY_PREFIX)
            .and_then(|rest| rest.split_once('.'))
            .ok_or_else(malformed)?;
        let claims: Claims = B64
            .decode(payload)
            .ok()
            .and_then(|json| serde_json::from_slice(&json).ok())
            .ok_or_else(malformed)?;
        let sig = B64.decode(sig).map_err(|_| malformed())?;
        let Some(key) = self.keys.get(&claims.kid) else {
            return Err(Refusal::UnknownKey(claims.kid));
        };
        signature::UnparsedPublicKey::new(&signature::ED25519, key)
            .verify(payload.as_bytes(), &sig)
            .map_err(|_| {
                Refusal::Invalid(Error::Unauthenticated(
                    "the identity's signature is not the registry's".into(),
                ))
            })?;
        if claims.exp <= now_ms() {
            return Err(Refusal::Invalid(Error::Unauthenticated(
                "the identity has expired; the caller should fetch a new one from the registry"
                    .into(),
            )));
        }
        if claims.aud != aud {
            return Err(refuse(format!(
                "the identity is for {}, not for {aud}",
                claims.aud
            )));
        }
        if claims.ns != ns || claims.sub != sub {
            return Err(refuse(format!(
                "only {sub} of namespace {ns} may call this; the caller is {} of namespace {}",
                claims.sub, claims.ns
            )));
        }
        Ok(claims)
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(60);

    fn invalid(refusal: Refusal) -> Error {
        match refusal {
            Refusal::Invalid(err) => err,
            Refusal::UnknownKey(kid) => panic!("unknown key {kid}"),
        }
    }

    #[test]
    fn an_identity_is_accepted_only_by_its_audience_from_its_subject() {
        let signer = Signer::generate();
        let verifier = Verifier::new([signer.public()]);
        let (text, _) = signer.issue("public", "server-order", "server-product", TTL);
        let claims = verifier
            .verify(&text, "public", "server-order", "server-product")
            .unwrap();
        assert_eq!(claims.sub, "server-order");

        let err = invalid(
            verifier
                .verify(&text, "public", "server-order", "server-user")
                .unwrap_err(),
        );
        assert!(matches!(err, Error::PermissionDenied(_)), "{err:?}");
        let (other, _) = signer.issue("public", "server-user", "server-product", TTL);
        let err = invalid(
            verifier
                .verify(&other, "public", "server-order", "server-product")
                .unwrap_err(),
        );
        assert!(
            err.to_string().contains("the caller is server-user"),
            "{err}"
        );
        let (elsewhere, _) = signer.issue("staging", "server-order", "server-product", TTL);
        assert!(
            verifier
                .verify(&elsewhere, "public", "server-order", "server-product")
                .is_err()
        );
    }

    #[test]
    fn a_forged_altered_expired_or_foreign_identity_is_refused() {
        let signer = Signer::generate();
        let verifier = Verifier::new([signer.public()]);
        let (text, _) = signer.issue("public", "server-user", "server-product", TTL);
        // Claims rewritten to name the order service, signature kept.
        let (_, sig) = text.split_once('.').unwrap();
        let (forged_from, _) = signer.issue("public", "server-order", "server-product", TTL);
        let (payload, _) = forged_from.split_once('.').unwrap();
        let (_, real_sig) = forged_from.split_once('.').unwrap();
        assert_ne!(sig, real_sig);
        let forged = format!("{payload}.{sig}");
        let err = invalid(
            verifier
                .verify(&forged, "public", "server-order", "server-product")
                .unwrap_err(),
        );
        assert!(matches!(err, Error::Unauthenticated(_)), "{err:?}");

        let (expired, _) = signer.issue("public", "server-order", "server-product", Duration::ZERO);
        let err = invalid(
            verifier
                .verify(&expired, "public", "server-order", "server-product")
                .unwrap_err(),
        );
        assert!(err.to_string().contains("expired"), "{err}");

        for garbage in ["", "smi_", "smi_x.y", "bearer", &"smi_a".repeat(1000)] {
            let err = invalid(
                verifier
                    .verify(garbage, "public", "server-order", "server-product")
                    .unwrap_err(),
            );
            assert!(err.to_string().contains("malformed"), "{err}");
        }

        // Signed by another registry's key: unknown here.
        let stranger = Signer::generate();
        let (foreign, _) = stranger.issue("public", "server-order", "server-product", TTL);
        let refusal = verifier
            .verify(&foreign, "public", "server-order", "server-product")
            .unwrap_err();
        assert!(
            matches!(&refusal, Refusal::UnknownKey(kid) if *kid == stranger.public().id),
            "{refusal:?}"
        );
    }

    #[test]
    fn a_stored_key_reads_back_as_the_same_signer() {
        let signer = Signer::generate();
        let again = Signer::from_pkcs8(signer.pkcs8()).unwrap();
        assert_eq!(signer.public(), again.public());
        assert!(Signer::from_pkcs8(b"not a key").is_err());
        assert!(!format!("{signer:?}").contains("key:"));
    }
}
