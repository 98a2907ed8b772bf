//! The config centre's domain types, built only through parse functions
//! that name the field they reject, as the registry's are.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use md5::{Digest, Md5};
use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::registry::model::{GroupKey, parse_name};

/// An item's full name. Ordered by namespace, group, data id, so the items
/// of one group are adjacent.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ConfigKey {
    /// Namespace; `public` when a request leaves it empty.
    pub namespace: Arc<str>,
    /// Group within the namespace; `DEFAULT_GROUP` when left empty.
    pub group: Arc<str>,
    /// The item's own name; required.
    pub data_id: Arc<str>,
}

impl ConfigKey {
    /// Checks all three names; namespace and group default, the data id
    /// must be given.
    pub fn parse(namespace: &str, group: &str, data_id: &str) -> Result<ConfigKey, Error> {
        let GroupKey { namespace, group } = GroupKey::parse(namespace, group)?;
        Ok(ConfigKey {
            namespace,
            group,
            data_id: parse_name("data_id", data_id, None)?,
        })
    }

    /// Whether a watch or listing of `group` covers this item.
    pub fn in_group(&self, group: &GroupKey) -> bool {
        self.namespace == group.namespace && self.group == group.group
    }
}

impl fmt::Display for ConfigKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.namespace, self.group, self.data_id)
    }
}

/// How an item's content is read; a known type is checked when it is
/// published.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ContentType {
    /// Anything: taken as it is.
    #[default]
    Text,
    /// Java properties: `key=value` lines.
    Properties,
    /// YAML.
    Yaml,
    /// JSON.
    Json,
    /// TOML, as shop-mesh's own configuration is written.
    Toml,
}

impl ContentType {
    /// Every type, by the name the CLI, the JSON API and Nacos use.
    pub const ALL: [ContentType; 5] = [
        ContentType::Text,
        ContentType::Properties,
        ContentType::Yaml,
        ContentType::Json,
        ContentType::Toml,
    ];

    /// Its name: `text`, `properties`, `yaml`, `json`, `toml`.
    pub fn name(self) -> &'static str {
        match self {
            ContentType::Text => "text",
            ContentType::Properties => "properties",
            ContentType::Yaml => "yaml",
            ContentType::Json => "json",
            ContentType::Toml => "toml",
        }
    }

    /// The type named `name` (any case; `yml` too).
    pub fn parse(field: &str, name: &str) -> Result<ContentType, Error> {
        let lower = name.to_ascii_lowercase();
        let lower = if lower == "yml" { "yaml" } else { &lower };
        ContentType::ALL
            .into_iter()
            .find(|t| t.name() == lower)
            .ok_or_else(|| {
                let names: Vec<&str> = ContentType::ALL.iter().map(|t| t.name()).collect();
                Error::invalid(
                    field,
                    format!(
                        "{} is not a content type; one of {}",
                        crate::quote::quoted(name),
                        names.join(", ")
                    ),
                )
            })
    }

    /// Checks that `content` reads as this type; the refusal says where
    /// it does not.
    pub fn check(self, content: &str) -> Result<(), Error> {
        let reason = match self {
            ContentType::Text => return Ok(()),
            ContentType::Json => serde_json::from_str::<serde::de::IgnoredAny>(content)
                .err()
                .map(|err| err.to_string()),
            ContentType::Toml => toml::from_str::<toml::Table>(content)
                .err()
                .map(|err| err.message().to_owned() + &toml_place(content, err.span())),
            ContentType::Yaml => yaml_rust2::YamlLoader::load_from_str(content)
                .err()
                .map(|err| err.to_string()),
            ContentType::Properties => properties_error(content),
        };
        match reason {
            None => Ok(()),
            Some(reason) => Err(Error::invalid(
                "content",
                format!("is not valid {}: {reason}", self.name()),
            )),
        }
    }
}

/// " at line L" for a TOML error's span.
fn toml_place(content: &str, span: Option<std::ops::Range<usize>>) -> String {
    match span {
        Some(span) => {
            let line = content[..span.start.min(content.len())]
                .matches('\n')
                .count()
                + 1;
            format!(" (line {line})")
        }
        None => String::new(),
    }
}

/// Why `content` is not Java properties: a logical line with no key.
fn properties_error(content: &str) -> Option<String> {
    let mut continued = false;
    for (n, line) in content.lines().enumerate() {
        let trimmed = line.trim_start();
        let starts = !continued;
        continued = line.chars().rev().take_while(|c| *c == '\\').count() % 2 == 1;
        if !starts || trimmed.is_empty() || trimmed.starts_with(['#', '!']) {
            continue;
        }
        if trimmed.starts_with(['=', ':']) {
            return Some(format!("line {} has a value but no key", n + 1));
        }
    }
    None
}

/// An item's content's digest as Nacos gives it: MD5, lowercase hex.
pub fn md5_hex(content: &str) -> String {
    let digest = Md5::digest(content.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// One version of an item: what it held and who made it when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Version {
    /// The config revision at which it was published.
    pub version: u64,
    /// What it holds.
    pub content: Arc<str>,
    /// How that is read.
    pub content_type: ContentType,
    /// Its content's MD5, lowercase hex.
    pub md5: String,
    /// The name of the credential that published it; empty when
    /// credentials are off.
    pub by: String,
    /// When it was published, in milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// The version it restores, when it came from a rollback.
    #[serde(default)]
    pub rolled_back_from: u64,
}

impl Version {
    /// This version's content made a new version by `by`, now (numbered
    /// by the change that makes it); `rolled_back_from` names the version
    /// a rollback restores, 0 for none.
    pub fn again(&self, by: String, rolled_back_from: u64) -> Version {
        Version {
            version: 0,
            content: self.content.clone(),
            content_type: self.content_type,
            md5: self.md5.clone(),
            by,
            at_ms: crate::auth::identity::now_ms(),
            rolled_back_from,
        }
    }
}

/// An item as the centre holds it: its current version first, then the
/// older versions kept, newest first; and a gray version beside them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Item {
    /// Its name.
    pub key: ConfigKey,
    /// Never empty: the current version is `versions[0]`.
    pub versions: Vec<Arc<Version>>,
    /// A version for some clients only, until promoted or abandoned.
    #[serde(default)]
    pub gray: Option<Arc<Gray>>,
}

impl Item {
    /// The current version.
    pub fn current(&self) -> &Arc<Version> {
        &self.versions[0]
    }

    /// The kept version `version`, if it is kept.
    pub fn version(&self, version: u64) -> Option<&Arc<Version>> {
        self.versions.iter().find(|v| v.version == version)
    }

    /// The item as `client` reads it: the gray version when its rule
    /// picks the client, else the current one.
    pub fn seen_by(&self, client: &Client) -> Seen {
        Seen::of(self.key.clone(), self.current(), self.gray.as_ref(), client)
    }
}

/// A version for the clients a rule picks, beside an item's current one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gray {
    /// What those clients read.
    pub version: Arc<Version>,
    /// Which clients.
    pub rule: GrayRule,
}

impl Gray {
    /// This version as the clients it picks read it.
    pub fn seen(&self, key: ConfigKey) -> Seen {
        Seen {
            key,
            version: self.version.clone(),
            gray_rule: Some(self.rule.clone()),
            gray_version: 0,
        }
    }
}

/// The clients a gray version is for: those at one of `ips`, and those
/// whose labels include every one of `labels`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct GrayRule {
    /// Client addresses.
    pub ips: Vec<IpAddr>,
    /// Labels a client must all have.
    pub labels: BTreeMap<String, String>,
}

/// Most addresses one gray rule may list.
pub const MAX_GRAY_IPS: usize = 1000;

impl GrayRule {
    /// Checks a rule as a request gives it: at least one address or
    /// label, each address an IP, labels as metadata is checked.
    pub fn parse(ips: &[String], labels: HashMap<String, String>) -> Result<GrayRule, Error> {
        if ips.is_empty() && labels.is_empty() {
            return Err(Error::invalid(
                "gray",
                "name the clients: at least one ip or label",
            ));
        }
        if ips.len() > MAX_GRAY_IPS {
            return Err(Error::invalid(
                "gray.ips",
                format!("{} addresses; at most {MAX_GRAY_IPS}", ips.len()),
            ));
        }
        let ips = ips
            .iter()
            .map(|ip| {
                ip.trim().parse::<IpAddr>().map_err(|_| {
                    Error::invalid(
                        "gray.ips",
                        format!("{} is not an IP address", crate::quote::quoted(ip)),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let labels = crate::registry::model::parse_metadata("gray.labels", labels)?;
        Ok(GrayRule {
            ips,
            labels: labels.into_iter().collect(),
        })
    }

    /// Whether this rule picks `client`.
    pub fn picks(&self, client: &Client) -> bool {
        let by_ip = client.ip.is_some_and(|ip| self.ips.contains(&ip));
        let by_labels = !self.labels.is_empty()
            && self
                .labels
                .iter()
                .all(|(k, v)| client.labels.get(k) == Some(v));
        by_ip || by_labels
    }
}

/// Who reads or watches, for gray rules to pick from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Client {
    /// Its address, when it gave one.
    pub ip: Option<IpAddr>,
    /// Its labels.
    pub labels: HashMap<String, String>,
}

impl Client {
    /// Checks a client as a request describes it.
    pub fn parse(ip: &str, labels: HashMap<String, String>) -> Result<Client, Error> {
        let ip = match ip.trim() {
            "" => None,
            ip => Some(ip.parse::<IpAddr>().map_err(|_| {
                Error::invalid(
                    "client.ip",
                    format!("{} is not an IP address", crate::quote::quoted(ip)),
                )
            })?),
        };
        let labels = crate::registry::model::parse_metadata("client.labels", labels)?;
        Ok(Client {
            ip,
            labels: labels.into_iter().collect(),
        })
    }
}

/// An item as one client reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    /// The item.
    pub key: ConfigKey,
    /// The version this client reads.
    pub version: Arc<Version>,
    /// When that is the gray version: its rule.
    pub gray_rule: Option<GrayRule>,
    /// When it is the current version and a gray one is beside it: the
    /// gray one's version (0: none).
    pub gray_version: u64,
}

impl Seen {
    /// `current` (or `gray`, when it picks `client`) as `client` reads it.
    pub fn of(
        key: ConfigKey,
        current: &Arc<Version>,
        gray: Option<&Arc<Gray>>,
        client: &Client,
    ) -> Seen {
        match gray {
            Some(gray) if gray.rule.picks(client) => gray.seen(key),
            _ => Seen {
                key,
                version: current.clone(),
                gray_rule: None,
                gray_version: gray.map_or(0, |g| g.version.version),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_known_type_is_checked_and_text_is_not() {
        let good = [
            (ContentType::Json, r#"{"a": [1, 2]}"#),
            (ContentType::Toml, "[shop]\nmax_order_count = 5\n"),
            (ContentType::Yaml, "a:\n  - 1\n  - 2\n"),
            (
                ContentType::Properties,
                "# c\na=1\nb: 2\nc 3\nd=multi\\\n  =line\n",
            ),
            (ContentType::Text, "{ not json"),
        ];
        for (kind, content) in good {
            assert!(kind.check(content).is_ok(), "{kind:?}: {content}");
        }
        let bad = [
            (ContentType::Json, "{ not json", "not valid json"),
            (ContentType::Toml, "a = 1\nb = = 2\n", "line 2"),
            (ContentType::Yaml, "a: [1, 2\n", "not valid yaml"),
            (ContentType::Properties, "a=1\n=2\n", "line 2"),
        ];
        for (kind, content, says) in bad {
            let err = kind.check(content).unwrap_err().to_string();
            assert!(
                err.starts_with("content:") && err.contains(says),
                "{kind:?}: {err}"
            );
        }
    }

    #[test]
    fn types_are_named_as_nacos_names_them() {
        assert_eq!(
            ContentType::parse("type", "YML").unwrap(),
            ContentType::Yaml
        );
        let err = ContentType::parse("type", "xml").unwrap_err().to_string();
        assert!(err.contains("text, properties, yaml, json, toml"), "{err}");
    }

    #[test]
    fn the_digest_is_nacos_md5() {
        assert_eq!(md5_hex(""), "d41d8cd98f00b204e9800998ecf8427e");
        assert_eq!(md5_hex("hello"), "5d41402abc4b2a76b9719d911017c592");
    }

    #[test]
    fn a_gray_rule_picks_by_address_or_by_every_label() {
        let rule = GrayRule::parse(
            &["10.0.0.7".into()],
            [("zone".to_string(), "a".to_string())].into(),
        )
        .unwrap();
        let client = |ip: &str, labels: &[(&str, &str)]| {
            Client::parse(
                ip,
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            )
            .unwrap()
        };
        assert!(rule.picks(&client("10.0.0.7", &[])));
        assert!(rule.picks(&client("10.0.0.8", &[("zone", "a"), ("x", "y")])));
        assert!(!rule.picks(&client("10.0.0.8", &[("zone", "b")])));
        assert!(!rule.picks(&client("", &[])));
        let err = GrayRule::parse(&[], HashMap::new())
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("gray:"), "{err}");
        let err = GrayRule::parse(&["nope".into()], HashMap::new())
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("gray.ips:"), "{err}");
    }

    #[test]
    fn a_data_id_is_a_name() {
        assert!(ConfigKey::parse("", "", "server-order").is_ok());
        let err = ConfigKey::parse("", "", "a b").unwrap_err().to_string();
        assert!(err.starts_with("data_id:"), "{err}");
    }
}
