//! The config centre's domain types, built only through parse functions
//! that name the field they reject, as the registry's are.

use std::fmt;
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

/// An item as the centre holds it: its current version first, then the
/// older versions kept, newest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Item {
    /// Its name.
    pub key: ConfigKey,
    /// Never empty: the current version is `versions[0]`.
    pub versions: Vec<Arc<Version>>,
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
    fn a_data_id_is_a_name() {
        assert!(ConfigKey::parse("", "", "server-order").is_ok());
        let err = ConfigKey::parse("", "", "a b").unwrap_err().to_string();
        assert!(err.starts_with("data_id:"), "{err}");
    }
}
