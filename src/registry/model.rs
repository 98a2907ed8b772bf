//! The registry's domain: services, instances and their validated parts.
//! Every value here is built through a parse function that names the field
//! it rejects, so the rest of the registry only sees valid data.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Error;
use crate::quote::quoted;

pub const DEFAULT_NAMESPACE: &str = "public";
pub const DEFAULT_GROUP: &str = "DEFAULT_GROUP";
pub const DEFAULT_CLUSTER: &str = "DEFAULT";

/// Longest namespace, group, service or cluster name, in bytes.
pub const MAX_NAME_LEN: usize = 128;
/// Largest instance weight. Weights are relative; 0 takes no traffic.
pub const MAX_WEIGHT: f64 = 10_000.0;
pub const MAX_METADATA_ENTRIES: usize = 64;
pub const MAX_METADATA_KEY_LEN: usize = 128;
pub const MAX_METADATA_VALUE_LEN: usize = 1024;

/// A lease id; 0 means "none" on the wire.
pub type LeaseId = u64;

/// Checks a name: 1 to [`MAX_NAME_LEN`] bytes of `[A-Za-z0-9._:@-]`.
/// An empty value takes `default` when there is one.
pub fn parse_name(field: &str, value: &str, default: Option<&str>) -> Result<Arc<str>, Error> {
    let value = match (value.is_empty(), default) {
        (true, Some(default)) => default,
        (true, None) => return Err(Error::invalid(field, "must not be empty")),
        (false, _) => value,
    };
    if value.len() > MAX_NAME_LEN {
        return Err(Error::invalid(
            field,
            format!(
                "is {} bytes long; at most {MAX_NAME_LEN} are allowed",
                value.len()
            ),
        ));
    }
    if let Some(bad) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '@' | '-')))
    {
        return Err(Error::invalid(
            field,
            format!("contains {bad:?}; only letters, digits and . _ : @ - are allowed"),
        ));
    }
    Ok(Arc::from(value))
}

/// A namespace and a group: the scope of service listings and group watches.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct GroupKey {
    pub namespace: Arc<str>,
    pub group: Arc<str>,
}

impl GroupKey {
    pub fn parse(namespace: &str, group: &str) -> Result<Self, Error> {
        Ok(Self {
            namespace: parse_name("namespace", namespace, Some(DEFAULT_NAMESPACE))?,
            group: parse_name("group", group, Some(DEFAULT_GROUP))?,
        })
    }
}

impl fmt::Display for GroupKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.group)
    }
}

/// A service's full name. Ordered by namespace, group, name, so that the
/// services of one group are adjacent.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ServiceKey {
    pub namespace: Arc<str>,
    pub group: Arc<str>,
    pub name: Arc<str>,
}

impl ServiceKey {
    pub fn parse(namespace: &str, group: &str, service: &str) -> Result<Self, Error> {
        let GroupKey { namespace, group } = GroupKey::parse(namespace, group)?;
        Ok(Self {
            namespace,
            group,
            name: parse_name("service", service, None)?,
        })
    }

    pub fn group_key(&self) -> GroupKey {
        GroupKey {
            namespace: self.namespace.clone(),
            group: self.group.clone(),
        }
    }

    pub fn in_group(&self, group: &GroupKey) -> bool {
        self.namespace == group.namespace && self.group == group.group
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.namespace, self.group, self.name)
    }
}

/// Where an instance is, within its service: its identity.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct InstanceAddr {
    pub cluster: Arc<str>,
    pub ip: IpAddr,
    pub port: u16,
}

impl InstanceAddr {
    pub fn parse(cluster: &str, ip: &str, port: u32) -> Result<Self, Error> {
        let cluster = parse_name("cluster", cluster, Some(DEFAULT_CLUSTER))?;
        if ip.is_empty() {
            return Err(Error::invalid("ip", "must not be empty"));
        }
        let ip: IpAddr = ip.parse().map_err(|_| {
            Error::invalid(
                "ip",
                format!("{} is not an IPv4 or IPv6 address", quoted(ip)),
            )
        })?;
        let ip = ip.to_canonical();
        if let Some(what) = never_a_service(ip) {
            return Err(Error::invalid(
                "ip",
                format!("{ip} is {what}, not an address a service can be reached at"),
            ));
        }
        let port = match u16::try_from(port) {
            Ok(port) if port != 0 => port,
            _ => {
                return Err(Error::invalid(
                    "port",
                    format!("{port} is outside 1..65535"),
                ));
            }
        };
        Ok(Self { cluster, ip, port })
    }
}

/// What kind of address `ip` is when no service can listen on it.
fn never_a_service(ip: IpAddr) -> Option<&'static str> {
    if ip.is_unspecified() {
        return Some("the unspecified address");
    }
    if ip.is_multicast() {
        return Some("a multicast address");
    }
    match ip {
        IpAddr::V4(v4) if v4.is_broadcast() => Some("the broadcast address"),
        _ => None,
    }
}

/// A link-local address (169.254.0.0/16, fe80::/10): reachable only on
/// one link, so a registry refuses it unless configured to accept it.
pub fn is_link_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => v6.is_unicast_link_local(),
    }
}

/// Checks a weight: finite, 0 to [`MAX_WEIGHT`]; 1 when unset.
pub fn parse_weight(weight: Option<f64>) -> Result<f64, Error> {
    match weight {
        None => Ok(1.0),
        Some(w) if w.is_finite() && (0.0..=MAX_WEIGHT).contains(&w) => Ok(w),
        Some(w) => Err(Error::invalid(
            "weight",
            format!("{w} is outside 0 to {MAX_WEIGHT}"),
        )),
    }
}

/// Instance or service metadata, within the limits above.
pub type Metadata = BTreeMap<String, String>;

pub fn parse_metadata(
    field: &str,
    entries: impl IntoIterator<Item = (String, String)>,
) -> Result<Metadata, Error> {
    let mut metadata = Metadata::new();
    for (key, value) in entries {
        if metadata.len() == MAX_METADATA_ENTRIES {
            return Err(Error::invalid(
                field,
                format!("has more than {MAX_METADATA_ENTRIES} entries"),
            ));
        }
        if key.is_empty() || key.len() > MAX_METADATA_KEY_LEN {
            return Err(Error::invalid(
                field,
                format!(
                    "key {} must be 1 to {MAX_METADATA_KEY_LEN} bytes",
                    quoted(&key)
                ),
            ));
        }
        if value.len() > MAX_METADATA_VALUE_LEN {
            return Err(Error::invalid(
                field,
                format!(
                    "value of {} is {} bytes; at most {MAX_METADATA_VALUE_LEN} are allowed",
                    quoted(&key),
                    value.len()
                ),
            ));
        }
        metadata.insert(key, value);
    }
    Ok(metadata)
}

/// An instance's liveness timings, in milliseconds (kept small: there is
/// one per instance).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timings {
    pub heartbeat_interval_ms: u32,
    pub unhealthy_timeout_ms: u32,
    pub delete_timeout_ms: u32,
}

impl Timings {
    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(self.heartbeat_interval_ms.into())
    }
}

/// Per-instance timing overrides, as asked; the registry checks them
/// against its bounds and fills in its defaults.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TimingOverrides {
    pub heartbeat_interval_ms: Option<u64>,
    pub unhealthy_timeout_ms: Option<u64>,
    pub delete_timeout_ms: Option<u64>,
}

/// What a caller asks to register.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceSpec {
    pub service: ServiceKey,
    pub addr: InstanceAddr,
    pub weight: f64,
    pub enabled: bool,
    pub ephemeral: bool,
    pub metadata: Metadata,
    pub timings: TimingOverrides,
}

/// A registered instance. Immutable once built: a change makes a new one,
/// so snapshots and watch events share it without copying.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Instance {
    pub service: Arc<ServiceKey>,
    pub addr: InstanceAddr,
    pub weight: f64,
    pub enabled: bool,
    pub healthy: bool,
    pub ephemeral: bool,
    pub metadata: Metadata,
    pub timings: Timings,
    /// The lease that keeps an ephemeral instance alive; 0 for persistent.
    pub lease: LeaseId,
}

impl Instance {
    /// Roughly the bytes this instance holds: what a watcher's queue
    /// counts against its budget for each change it has not yet read.
    pub fn footprint(&self) -> usize {
        /// A metadata entry's own cost: two `String`s and the map's node
        /// share.
        const ENTRY: usize = 2 * std::mem::size_of::<String>() + 16;
        let metadata: usize = self
            .metadata
            .iter()
            .map(|(key, value)| key.len() + value.len() + ENTRY)
            .sum();
        std::mem::size_of::<Instance>() + self.addr.cluster.len() + metadata
    }

    /// Nacos's form: `ip#port#cluster#group@@service`.
    pub fn id(&self) -> String {
        format!(
            "{}#{}#{}#{}@@{}",
            self.addr.ip, self.addr.port, self.addr.cluster, self.service.group, self.service.name
        )
    }
}

/// A service's own settings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ServiceSettings {
    /// 0.0 to 1.0: when the healthy share falls below it, healthy-only
    /// queries answer every instance, so one bad health signal cannot
    /// empty a service.
    pub protect_threshold: f64,
    pub metadata: Metadata,
}

impl ServiceSettings {
    pub fn parse(
        protect_threshold: f64,
        metadata: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, Error> {
        if !(0.0..=1.0).contains(&protect_threshold) {
            return Err(Error::invalid(
                "protect_threshold",
                format!("{protect_threshold} is outside 0.0 to 1.0"),
            ));
        }
        Ok(Self {
            protect_threshold,
            metadata: parse_metadata("metadata", metadata)?,
        })
    }
}

/// One line of a service listing.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceSummary {
    pub key: ServiceKey,
    pub instance_count: usize,
    pub healthy_count: usize,
    pub protect_threshold: f64,
}

/// A service's instances as asked for.
#[derive(Debug, Clone)]
pub struct ServiceView {
    pub key: ServiceKey,
    pub instances: Vec<Arc<Instance>>,
    pub revision: u64,
    pub protect_threshold: f64,
    pub protection_triggered: bool,
}

/// A page of a service listing.
#[derive(Debug, Clone)]
pub struct ServicePage {
    pub services: Vec<ServiceSummary>,
    pub total: usize,
    pub revision: u64,
}

/// What a registration answers.
#[derive(Debug, Clone, PartialEq)]
pub struct Registered {
    pub instance_id: String,
    pub lease: LeaseId,
    pub revision: u64,
    pub heartbeat_interval: Duration,
}

/// One change, with the revision it made.
#[derive(Debug, Clone)]
pub struct Event {
    pub revision: u64,
    pub kind: ChangeKind,
    pub instance: Arc<Instance>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// Added or changed: the full instance.
    Put,
    Removed,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_default_and_reject_what_they_must() {
        assert_eq!(
            &*parse_name("group", "", Some(DEFAULT_GROUP)).unwrap(),
            DEFAULT_GROUP
        );
        assert!(parse_name("service", "server-user.v1:a@b_c", None).is_ok());
        for bad in ["", "a b", "a/b", "ü", &"x".repeat(MAX_NAME_LEN + 1)] {
            let err = parse_name("service", bad, None).unwrap_err();
            assert!(err.to_string().starts_with("service: "), "{err}");
        }
    }

    #[test]
    fn addresses_and_weights_are_checked() {
        assert!(InstanceAddr::parse("", "::1", 8080).is_ok());
        assert!(InstanceAddr::parse("", "10.0.0.1", 65535).is_ok());
        for (ip, port, field) in [
            ("10.0.0.1", 0, "port"),
            ("10.0.0.1", 65536, "port"),
            ("10.0.0", 80, "ip"),
            ("0.0.0.0", 80, "ip"),
            ("::", 80, "ip"),
            ("255.255.255.255", 80, "ip"),
            ("224.0.0.1", 80, "ip"),
            ("ff02::1", 80, "ip"),
            ("::ffff:0.0.0.0", 80, "ip"),
            ("", 80, "ip"),
        ] {
            let err = InstanceAddr::parse("", ip, port).unwrap_err();
            assert!(err.to_string().starts_with(field), "{err}");
        }
        assert_eq!(parse_weight(None).unwrap(), 1.0);
        assert_eq!(parse_weight(Some(0.0)).unwrap(), 0.0);
        for bad in [-1.0, f64::NAN, f64::INFINITY, 10_000.5] {
            assert!(parse_weight(Some(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn metadata_limits() {
        let many = (0..=MAX_METADATA_ENTRIES).map(|i| (format!("k{i}"), String::new()));
        assert!(parse_metadata("metadata", many).is_err());
        let long = [("k".to_string(), "v".repeat(MAX_METADATA_VALUE_LEN + 1))];
        assert!(parse_metadata("metadata", long).is_err());
        let empty_key = [(String::new(), "v".to_string())];
        assert!(parse_metadata("metadata", empty_key).is_err());
    }
}
