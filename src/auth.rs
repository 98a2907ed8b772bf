//! Credentials: tokens, and what each may touch.
//!
//! A token is `smt_<id>_<secret>`: a 64-bit id, by which the registry
//! finds what was granted to it, and a 256-bit secret from the operating
//! system's generator. The registry keeps only the secret's SHA-256 (a
//! secret this long needs no slow hash: nobody can guess one) and compares
//! it in constant time. A token's text is printed once, when it is made;
//! [`Token`]'s `Debug` never shows the secret, so a token cannot reach a
//! log by accident.
//!
//! A [`Scope`] says what a token may touch: everything ([`Scope::Admin`]),
//! reads only, or reads and writes of the services of one namespace whose
//! names match its patterns (`server-product`, or a prefix: `server-*`).

pub mod identity;
pub mod session;

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::Error;

/// The prefix every token's text starts with, so one found in a file or a
/// leaked log is recognisable (and a secret scanner can look for it).
pub const TOKEN_PREFIX: &str = "smt_";

/// A token's id: public, the key its grant is stored under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TokenId(pub u64);

impl fmt::Display for TokenId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl FromStr for TokenId {
    type Err = Error;

    fn from_str(text: &str) -> Result<TokenId, Error> {
        if text.len() != 16 {
            return Err(Error::invalid(
                "id",
                format!("{text:?} is not a token id (16 hex digits)"),
            ));
        }
        u64::from_str_radix(text, 16).map(TokenId).map_err(|_| {
            Error::invalid("id", format!("{text:?} is not a token id (16 hex digits)"))
        })
    }
}

/// A secret in configuration (a token): shown by neither `Debug` nor
/// `--print-config`, which print only whether it is set.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// The secret itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether it is set.
    pub fn is_set(&self) -> bool {
        !self.0.trim().is_empty()
    }
}

impl From<String> for Secret {
    fn from(secret: String) -> Secret {
        Secret(secret)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.is_set() {
            "Secret(hidden)"
        } else {
            "Secret(unset)"
        })
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(if self.is_set() { "(hidden)" } else { "" })
    }
}

/// A token as its holder has it: id and secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    id: TokenId,
    secret: [u8; 32],
}

impl Token {
    /// A new token with a random id and secret.
    pub fn generate() -> Token {
        Token {
            id: TokenId(rand::random()),
            secret: rand::random(),
        }
    }

    /// Its id.
    pub fn id(&self) -> TokenId {
        self.id
    }

    /// What the registry keeps of its secret.
    pub fn digest(&self) -> Digest32 {
        Digest32(Sha256::digest(self.secret).into())
    }

    /// Its text, to hand to its holder. The one way to see the secret.
    pub fn reveal(&self) -> String {
        let mut text = format!("{TOKEN_PREFIX}{}_", self.id);
        for byte in self.secret {
            text.push_str(&format!("{byte:02x}"));
        }
        text
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token({}, secret hidden)", self.id)
    }
}

impl FromStr for Token {
    type Err = Error;

    /// Reads a token's text; the error never quotes it.
    fn from_str(text: &str) -> Result<Token, Error> {
        let malformed = || {
            Error::Unauthenticated(format!(
                "the token is malformed: expected {TOKEN_PREFIX}<16 hex digits>_<64 hex digits>, as `shop-mesh token create` prints it"
            ))
        };
        let rest = text
            .trim()
            .strip_prefix(TOKEN_PREFIX)
            .ok_or_else(malformed)?;
        let (id, secret) = rest.split_once('_').ok_or_else(malformed)?;
        let id = id.parse().map_err(|_| malformed())?;
        if secret.len() != 64 || !secret.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(malformed());
        }
        let mut bytes = [0u8; 32];
        for (i, byte) in bytes.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&secret[2 * i..2 * i + 2], 16).map_err(|_| malformed())?;
        }
        Ok(Token { id, secret: bytes })
    }
}

/// Writes `text` to a new file at `path` that only its owner may read
/// (never to one left behind, nor to what a link points at), durably.
pub fn write_private(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(path.parent().unwrap_or(path))?;
    match std::fs::remove_file(path) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => return Err(err),
        _ => {}
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    writeln!(file, "{text}")?;
    file.sync_all()
}

/// Renames `tmp` over `path`, durably.
pub fn publish(tmp: &std::path::Path, path: &std::path::Path) -> std::io::Result<()> {
    std::fs::rename(tmp, path)?;
    std::fs::File::open(path.parent().unwrap_or(path))?.sync_all()
}

/// A SHA-256 digest of a token's secret.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Digest32(#[serde(with = "hex_bytes")] pub [u8; 32]);

impl fmt::Debug for Digest32 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Digest32(..)")
    }
}

impl Digest32 {
    /// Whether `token`'s secret is the one this is the digest of, in time
    /// that does not depend on where they differ.
    pub fn matches(&self, token: &Token) -> bool {
        self.0.ct_eq(&token.digest().0).into()
    }

    /// A digest no secret has (as far as anyone can tell): what a token
    /// of an unknown id is compared with, so that costs what a known one
    /// does.
    pub const NONE: Digest32 = Digest32([0; 32]);
}

/// What a token may touch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Scope {
    /// Everything: every namespace and service, and the tokens themselves.
    Admin,
    /// Reads of one namespace (`*`: every namespace), no writes.
    Read {
        /// The namespace, or `*`.
        namespace: String,
    },
    /// Reads of one namespace, and writes to its services whose names
    /// match one of `services` (a name, or a prefix ending in `*`).
    Services {
        /// The namespace.
        namespace: String,
        /// Names or prefixes (`server-*`).
        services: Vec<String>,
    },
}

/// What a request needs to be allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need<'a> {
    /// To read `namespace`.
    Read {
        /// The namespace read.
        namespace: &'a str,
    },
    /// To change `service` of `namespace`.
    Write {
        /// The namespace written to.
        namespace: &'a str,
        /// The service changed.
        service: &'a str,
    },
    /// To manage tokens, or anything else that spans namespaces.
    Admin,
    /// Only to be a caller the registry knows (a KeepAlive stream before
    /// its first beat).
    Authenticated,
    /// To read what the registry says of itself (its cluster): open to
    /// every token, and to anyone when reads are open.
    Describe,
}

impl Scope {
    /// Whether this scope allows `need`.
    pub fn allows(&self, need: Need<'_>) -> bool {
        match (self, need) {
            (Scope::Admin, _) | (_, Need::Authenticated | Need::Describe) => true,
            (_, Need::Admin) => false,
            (Scope::Read { namespace }, Need::Read { namespace: asked }) => {
                namespace == "*" || namespace == asked
            }
            (Scope::Read { .. }, Need::Write { .. }) => false,
            (Scope::Services { namespace, .. }, Need::Read { namespace: asked }) => {
                namespace == asked
            }
            (
                Scope::Services {
                    namespace,
                    services,
                },
                Need::Write {
                    namespace: asked,
                    service,
                },
            ) => namespace == asked && services.iter().any(|p| pattern_matches(p, service)),
        }
    }

    /// Checks a scope as a request to create a token gives it.
    pub fn validate(&self) -> Result<(), Error> {
        match self {
            Scope::Admin => Ok(()),
            Scope::Read { namespace } if namespace == "*" => Ok(()),
            Scope::Read { namespace } => {
                crate::registry::model::parse_name("namespace", namespace, None).map(drop)
            }
            Scope::Services {
                namespace,
                services,
            } => {
                crate::registry::model::parse_name("namespace", namespace, None)?;
                if services.is_empty() || services.len() > MAX_PATTERNS {
                    return Err(Error::invalid(
                        "services",
                        format!(
                            "name 1 to {MAX_PATTERNS} services (a name, a prefix such as server-*, or * for every service of the namespace)"
                        ),
                    ));
                }
                for pattern in services {
                    if pattern == "*" {
                        continue;
                    }
                    let name = pattern.strip_suffix('*').unwrap_or(pattern);
                    crate::registry::model::parse_name("services", name, None)?;
                }
                Ok(())
            }
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::Admin => f.write_str("admin"),
            Scope::Read { namespace } => write!(f, "read {namespace}"),
            Scope::Services {
                namespace,
                services,
            } => write!(f, "services {namespace}/{}", services.join(",")),
        }
    }
}

/// The most service patterns one token's scope may name.
pub const MAX_PATTERNS: usize = 64;

/// A name, or a prefix ending in `*`.
fn pattern_matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => pattern == name,
    }
}

/// What the registry keeps of a token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// The token's id.
    pub id: TokenId,
    /// Who or what it is for, as its maker named it.
    pub name: String,
    /// What it may touch.
    pub scope: Scope,
    /// The digest of its secret.
    pub digest: Digest32,
    /// When it was made, in milliseconds since the Unix epoch.
    pub created_ms: u64,
}

mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        let text: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        s.serialize_str(&text)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let text = String::deserialize(d)?;
        let mut bytes = [0u8; 32];
        if text.len() != 64 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(serde::de::Error::custom("a digest is 64 hex digits"));
        }
        for (i, byte) in bytes.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16)
                .map_err(|_| serde::de::Error::custom("a digest is 64 hex digits"))?;
        }
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_reads_back_from_its_text_and_its_debug_hides_the_secret() {
        let token = Token::generate();
        let text = token.reveal();
        assert!(text.starts_with(TOKEN_PREFIX), "{text}");
        assert_eq!(text.parse::<Token>().unwrap(), token);
        let debug = format!("{token:?}");
        let secret = text.rsplit('_').next().unwrap();
        assert!(!debug.contains(secret), "{debug}");
        assert!(debug.contains(&token.id().to_string()), "{debug}");
    }

    #[test]
    fn malformed_tokens_are_refused_without_quoting_them() {
        let good = Token::generate().reveal();
        for bad in [
            String::new(),
            "Bearer x".into(),
            good.replacen(TOKEN_PREFIX, "xyz_", 1),
            good[..good.len() - 1].to_string(),
            format!("{good}0"),
            good.replace('_', "-"),
            format!("{}g", &good[..good.len() - 1]),
        ] {
            let err = bad.parse::<Token>().unwrap_err();
            assert!(matches!(err, Error::Unauthenticated(_)), "{bad}: {err:?}");
            if !bad.is_empty() {
                assert!(!err.to_string().contains(&bad), "{err}");
            }
        }
    }

    #[test]
    fn a_secret_in_configuration_is_never_printed() {
        let text = Token::generate().reveal();
        let secret = Secret::from(text.clone());
        assert!(!format!("{secret:?}").contains(&text));
        assert!(!serde_json::to_string(&secret).unwrap().contains(&text));
        assert_eq!(secret.expose(), text);
        assert!(!Secret::default().is_set());
    }

    #[test]
    fn a_digest_that_is_not_hex_is_refused_not_a_panic() {
        let bad = format!("\"{}\u{e9}{}\"", "0".repeat(31), "0".repeat(31));
        assert!(serde_json::from_str::<Digest32>(&bad).is_err());
        let short = format!("\"{}\"", "0".repeat(62));
        assert!(serde_json::from_str::<Digest32>(&short).is_err());
    }

    #[test]
    fn a_digest_matches_its_own_token_only() {
        let token = Token::generate();
        let digest = token.digest();
        assert!(digest.matches(&token));
        let mut other = token.clone();
        other.secret[31] ^= 1;
        assert!(!digest.matches(&other));
        let json = serde_json::to_string(&digest).unwrap();
        assert_eq!(serde_json::from_str::<Digest32>(&json).unwrap(), digest);
    }

    #[test]
    fn scopes_allow_what_they_name_and_nothing_else() {
        let product = Scope::Services {
            namespace: "public".into(),
            services: vec!["server-product".into()],
        };
        let servers = Scope::Services {
            namespace: "public".into(),
            services: vec!["server-*".into()],
        };
        let read_all = Scope::Read {
            namespace: "*".into(),
        };
        let write = |service| Need::Write {
            namespace: "public",
            service,
        };
        let read = |namespace| Need::Read { namespace };
        assert!(product.allows(write("server-product")));
        assert!(!product.allows(write("server-order")));
        assert!(!product.allows(write("server-product-2")));
        assert!(!product.allows(Need::Write {
            namespace: "dev",
            service: "server-product"
        }));
        assert!(product.allows(read("public")) && !product.allows(read("dev")));
        assert!(!product.allows(Need::Admin));
        assert!(servers.allows(write("server-order")) && !servers.allows(write("db")));
        assert!(read_all.allows(read("dev")) && !read_all.allows(write("server-order")));
        assert!(!read_all.allows(Need::Admin));
        assert!(Scope::Admin.allows(Need::Admin) && Scope::Admin.allows(write("x")));
    }

    #[test]
    fn a_scope_with_a_bad_name_or_no_service_is_refused() {
        let services = |namespace: &str, services: &[&str]| Scope::Services {
            namespace: namespace.into(),
            services: services.iter().map(|s| s.to_string()).collect(),
        };
        assert!(services("public", &["server-*", "db"]).validate().is_ok());
        assert!(services("public", &[]).validate().is_err());
        assert!(services("public", &["a b"]).validate().is_err());
        assert!(services("", &["db"]).validate().is_err());
        assert!(services("public", &["*"]).validate().is_ok());
        assert!(services("public", &[""]).validate().is_err());
        let many: Vec<String> = (0..=MAX_PATTERNS).map(|i| format!("s{i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert!(services("public", &many).validate().is_err());
        assert!(
            Scope::Read {
                namespace: "*".into()
            }
            .validate()
            .is_ok()
        );
    }
}
