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

/// Namespace of a request that names none.
pub const DEFAULT_NAMESPACE: &str = "public";
/// Group of a request that names none (Nacos's default group).
pub const DEFAULT_GROUP: &str = "DEFAULT_GROUP";
/// Cluster of an instance that names none.
pub const DEFAULT_CLUSTER: &str = "DEFAULT";

/// Longest namespace, group, service or cluster name, in bytes.
pub const MAX_NAME_LEN: usize = 128;
/// Largest instance weight. Weights are relative; 0 takes no traffic.
pub const MAX_WEIGHT: f64 = 10_000.0;
/// Most entries one metadata map may have.
pub const MAX_METADATA_ENTRIES: usize = 64;
/// Longest metadata key, in bytes; keys must not be empty.
pub const MAX_METADATA_KEY_LEN: usize = 128;
/// Longest metadata value, in bytes.
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
    /// Namespace; [`DEFAULT_NAMESPACE`] when a request leaves it empty.
    pub namespace: Arc<str>,
    /// Group within the namespace; [`DEFAULT_GROUP`] when a request leaves it
    /// empty.
    pub group: Arc<str>,
}

impl GroupKey {
    /// Checks both names, filling in the defaults for empty ones.
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
    /// Namespace; [`DEFAULT_NAMESPACE`] when a request leaves it empty.
    pub namespace: Arc<str>,
    /// Group within the namespace; [`DEFAULT_GROUP`] when a request leaves it
    /// empty.
    pub group: Arc<str>,
    /// The service's own name; required.
    pub name: Arc<str>,
}

impl ServiceKey {
    /// Checks all three names; namespace and group default, the service name
    /// must be given.
    pub fn parse(namespace: &str, group: &str, service: &str) -> Result<Self, Error> {
        let GroupKey { namespace, group } = GroupKey::parse(namespace, group)?;
        Ok(Self {
            namespace,
            group,
            name: parse_name("service", service, None)?,
        })
    }

    /// The group this service is listed and group-watched under.
    pub fn group_key(&self) -> GroupKey {
        GroupKey {
            namespace: self.namespace.clone(),
            group: self.group.clone(),
        }
    }

    /// Whether a watch or listing of `group` covers this service.
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
    /// Cluster within the service; [`DEFAULT_CLUSTER`] when a request leaves it
    /// empty.
    pub cluster: Arc<str>,
    /// Address callers reach the instance at, in canonical form (an IPv4-mapped
    /// IPv6 address becomes IPv4), so one instance has one key.
    pub ip: IpAddr,
    /// Port callers reach the instance at; never 0.
    pub port: u16,
}

impl InstanceAddr {
    /// Checks a cluster, IP and port as sent; refuses addresses no service can
    /// listen on (unspecified, multicast, broadcast) and ports outside
    /// 1..65535.
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

/// What UpdateInstance changes of an instance: each value set, checked.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct InstanceChange {
    /// Its new weight.
    pub weight: Option<f64>,
    /// Whether it takes traffic.
    pub enabled: Option<bool>,
    /// Its labels, all of them.
    pub metadata: Option<Metadata>,
}

impl InstanceChange {
    /// `instance` with this change made.
    pub fn apply(&self, instance: &Instance) -> Instance {
        let mut changed = instance.clone();
        if let Some(weight) = self.weight {
            changed.weight = weight;
        }
        if let Some(enabled) = self.enabled {
            changed.enabled = enabled;
        }
        if let Some(metadata) = &self.metadata {
            changed.metadata = metadata.clone();
        }
        changed
    }
}

/// Instance or service metadata, within the limits above.
pub type Metadata = BTreeMap<String, String>;

/// Checks metadata against [`MAX_METADATA_ENTRIES`], [`MAX_METADATA_KEY_LEN`]
/// and [`MAX_METADATA_VALUE_LEN`]; errors name `field`.
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
    /// How often the instance's client must send a heartbeat.
    pub heartbeat_interval_ms: u32,
    /// Time without a heartbeat after which the instance is marked unhealthy.
    pub unhealthy_timeout_ms: u32,
    /// Time without a heartbeat after which the instance is removed.
    pub delete_timeout_ms: u32,
}

impl Timings {
    /// The heartbeat interval as a `Duration`, as registration answers it.
    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(self.heartbeat_interval_ms.into())
    }
}

/// Per-instance timing overrides, as asked; the registry checks them
/// against its bounds and fills in its defaults.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TimingOverrides {
    /// Heartbeat interval asked for; `None` takes the registry's default.
    pub heartbeat_interval_ms: Option<u64>,
    /// Unhealthy timeout asked for; `None` takes the registry's default.
    pub unhealthy_timeout_ms: Option<u64>,
    /// Delete timeout asked for; `None` takes the registry's default.
    pub delete_timeout_ms: Option<u64>,
}

/// What a caller asks to register.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceSpec {
    /// Service to register into; created if it does not exist.
    pub service: ServiceKey,
    /// The instance's identity: registering the same address again replaces it.
    pub addr: InstanceAddr,
    /// Relative share of traffic, 0 to [`MAX_WEIGHT`]; 0 takes none.
    pub weight: f64,
    /// `false` keeps the instance listed but tells callers not to send it
    /// traffic.
    pub enabled: bool,
    /// Kept alive by a lease and heartbeats, and gone with them; otherwise
    /// persistent: stored on disk and health-probed.
    pub ephemeral: bool,
    /// Caller-defined labels, returned as given.
    pub metadata: Metadata,
    /// Liveness timings asked for, checked against the registry's bounds.
    pub timings: TimingOverrides,
}

/// A registered instance. Immutable once built: a change makes a new one,
/// so snapshots and watch events share it without copying.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Instance {
    /// Service the instance belongs to, shared by its instances.
    pub service: Arc<ServiceKey>,
    /// The instance's identity within its service.
    pub addr: InstanceAddr,
    /// Relative share of traffic, 0 to [`MAX_WEIGHT`]; 0 takes none.
    pub weight: f64,
    /// `false` keeps the instance listed but tells callers not to send it
    /// traffic.
    pub enabled: bool,
    /// Last verdict of heartbeats (ephemeral) or probes (persistent);
    /// healthy-only queries skip unhealthy instances unless protection is
    /// triggered.
    pub healthy: bool,
    /// Kept alive by a lease and heartbeats; otherwise persistent: stored on
    /// disk and health-probed.
    pub ephemeral: bool,
    /// Caller-defined labels, returned as given.
    pub metadata: Metadata,
    /// Liveness timings, the registry's defaults filled in.
    pub timings: Timings,
    /// The lease that keeps an ephemeral instance alive; 0 for persistent.
    pub lease: LeaseId,
}

impl Instance {
    /// The instance a registration of `spec` stores, under `service` (the
    /// registry's shared key), replacing `existing` if any. A
    /// registration is a sign of life; a persistent instance keeps what
    /// its probe last said.
    pub fn registered(
        spec: InstanceSpec,
        service: Arc<ServiceKey>,
        timings: Timings,
        lease: LeaseId,
        existing: Option<&Instance>,
    ) -> Instance {
        Instance {
            service,
            addr: spec.addr,
            weight: spec.weight,
            enabled: spec.enabled,
            healthy: spec.ephemeral || existing.is_some_and(|e| e.healthy),
            ephemeral: spec.ephemeral,
            metadata: spec.metadata,
            timings,
            lease,
        }
    }

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
        self.id_at(&self.addr.ip.to_string())
    }

    /// [`Instance::id`] with its IP already spelt `ip` (answers spell it
    /// once for both).
    pub fn id_at(&self, ip: &str) -> String {
        use std::fmt::Write;
        let (cluster, group, name) = (
            &*self.addr.cluster,
            &*self.service.group,
            &*self.service.name,
        );
        let mut id =
            String::with_capacity(ip.len() + cluster.len() + group.len() + name.len() + 12);
        id.push_str(ip);
        let _ = write!(id, "#{}#", self.addr.port);
        id.push_str(cluster);
        id.push('#');
        id.push_str(group);
        id.push_str("@@");
        id.push_str(name);
        id
    }
}

/// A service's own settings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ServiceSettings {
    /// 0.0 to 1.0: when the healthy share falls below it, healthy-only
    /// queries answer every instance, so one bad health signal cannot
    /// empty a service.
    pub protect_threshold: f64,
    /// Caller-defined labels for the service, returned as given.
    pub metadata: Metadata,
}

impl ServiceSettings {
    /// Checks the threshold (0.0 to 1.0) and the metadata.
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
    /// Which service this line is about.
    pub key: ServiceKey,
    /// Instances registered, healthy or not.
    pub instance_count: usize,
    /// Instances currently healthy.
    pub healthy_count: usize,
    /// The service's protect threshold (see
    /// [`ServiceSettings::protect_threshold`]).
    pub protect_threshold: f64,
}

/// A service's instances as asked for.
#[derive(Debug, Clone)]
pub struct ServiceView {
    /// Which service was asked for.
    pub key: ServiceKey,
    /// Matching instances, sorted by address.
    pub instances: Vec<Arc<Instance>>,
    /// Registry revision the view was taken at; a watch started from it misses
    /// no change.
    pub revision: u64,
    /// The service's protect threshold (see
    /// [`ServiceSettings::protect_threshold`]).
    pub protect_threshold: f64,
    /// The healthy share fell below the threshold on a healthy-only query, so
    /// unhealthy instances were answered too.
    pub protection_triggered: bool,
    /// The service's own labels.
    pub metadata: Metadata,
}

/// A page of a service listing.
#[derive(Debug, Clone)]
pub struct ServicePage {
    /// This page's services, in name order.
    pub services: Vec<ServiceSummary>,
    /// Services in the whole listing, over all pages.
    pub total: usize,
    /// Registry revision the listing was taken at.
    pub revision: u64,
}

/// What a registration answers.
#[derive(Debug, Clone, PartialEq)]
pub struct Registered {
    /// Nacos-form id of the instance (see [`Instance::id`]).
    pub instance_id: String,
    /// Lease the caller must keep alive with heartbeats; 0 for a persistent
    /// instance.
    pub lease: LeaseId,
    /// Registry revision of the registration.
    pub revision: u64,
    /// How often the caller must send a heartbeat, the registry's default
    /// filled in.
    pub heartbeat_interval: Duration,
}

/// One change, with the revision it made.
#[derive(Debug, Clone)]
pub struct Event {
    /// Registry revision this change made; watchers resume after it.
    pub revision: u64,
    /// Whether the instance was put or removed.
    pub kind: ChangeKind,
    /// The instance as it is now, or as it was when removed.
    pub instance: Arc<Instance>,
}

/// What a change did to an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// Added or changed: the full instance.
    Put,
    /// Deregistered, expired or deleted: the instance as it was last.
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
