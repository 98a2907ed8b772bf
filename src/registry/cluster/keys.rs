//! Where each part of the registry's state lives in etcd, and back: one
//! key a service's settings, one key an instance, one key a live lease,
//! one key a registry node that is up, one key a config item's head and
//! one key each version it keeps.
//! Names allow only letters, digits and `. _ : @ -` (see
//! [`crate::registry::model::parse_name`]), so `/` separates the parts
//! without escaping, and a service's instances share a key prefix that a
//! range or a watch can cover.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use crate::auth::TokenId;
use crate::registry::configs::model::ConfigKey;
use crate::registry::model::{InstanceAddr, LeaseId, ServiceKey};

/// What one key under the registry's prefix holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    /// A service's own settings, set explicitly.
    Settings(ServiceKey),
    /// An instance: its record; when it is ephemeral, attached to the
    /// instances' etcd lease of the node that holds its registry lease
    /// (see [`super::holds`]).
    Instance(ServiceKey, InstanceAddr),
    /// A registry lease whose client has been heard from within its
    /// unhealthy timeout, attached to the alive keys' etcd lease of the
    /// node that holds it: its deletion (by that node, or by etcd when
    /// that node's lease expires) is what turns the lease's instances
    /// unhealthy on every node at once.
    Alive(LeaseId),
    /// A token's grant (see [`crate::auth`]).
    Token(TokenId),
    /// A config item's head: which of its versions it keeps, and its gray
    /// one (see [`crate::registry::configs::replicated`]). Every change
    /// of the item rewrites it, so its mod revision is what a change
    /// compares.
    Config(ConfigKey),
    /// One version of a config item, by its place in the item's own
    /// sequence; written once, so its create revision is its version.
    ConfigVersion(ConfigKey, u64),
    /// A registry node that is up, attached to that node's own etcd
    /// lease (see [`super::announce`]). Read when GetCluster asks, not
    /// kept in the view.
    Node {
        /// Where it listens.
        addr: SocketAddr,
        /// Its run's own: two nodes may listen on one address (0.0.0.0:8848
        /// on two hosts) and must not share a key.
        id: u64,
    },
}

impl Key {
    /// The key's bytes under `prefix` (which has no trailing `/`).
    pub fn encode(&self, prefix: &str) -> String {
        match self {
            Key::Settings(service) => format!("{prefix}/s/{}", service_path(service)),
            Key::Instance(service, addr) => format!(
                "{prefix}/i/{}/{}/{}/{}",
                service_path(service),
                addr.cluster,
                addr.ip,
                addr.port
            ),
            Key::Alive(lease) => format!("{prefix}/a/{lease:016x}"),
            Key::Token(id) => format!("{prefix}/t/{id}"),
            Key::Config(key) => format!("{prefix}/c/{}", config_path(key)),
            Key::ConfigVersion(key, seq) => {
                format!("{}{seq:016x}", versions_of(prefix, key))
            }
            Key::Node { addr, id } => format!("{prefix}/n/{addr}/{id:016x}"),
        }
    }

    /// Reads a key back; None for a key this registry did not write (a
    /// key of another tool under the same prefix is ignored, not fatal).
    pub fn decode(prefix: &str, key: &[u8]) -> Option<Key> {
        let key = std::str::from_utf8(key).ok()?;
        let rest = key.strip_prefix(prefix)?.strip_prefix('/')?;
        let (kind, rest) = rest.split_once('/')?;
        let parts: Vec<&str> = rest.split('/').collect();
        match (kind, parts.as_slice()) {
            ("s", [namespace, group, name]) => Some(Key::Settings(service(namespace, group, name))),
            ("i", [namespace, group, name, cluster, ip, port]) => Some(Key::Instance(
                service(namespace, group, name),
                InstanceAddr {
                    cluster: Arc::from(*cluster),
                    ip: ip.parse::<IpAddr>().ok()?,
                    port: port.parse().ok().filter(|port| *port != 0)?,
                },
            )),
            ("a", [lease]) if lease.len() == 16 => {
                u64::from_str_radix(lease, 16).ok().map(Key::Alive)
            }
            ("t", [id]) => id.parse().ok().map(Key::Token),
            ("c", [namespace, group, data_id]) => {
                Some(Key::Config(config(namespace, group, data_id)))
            }
            ("cv", [namespace, group, data_id, seq]) if seq.len() == 16 => {
                Some(Key::ConfigVersion(
                    config(namespace, group, data_id),
                    u64::from_str_radix(seq, 16).ok()?,
                ))
            }
            ("n", [addr, id]) if id.len() == 16 => Some(Key::Node {
                addr: addr.parse().ok()?,
                id: u64::from_str_radix(id, 16).ok()?,
            }),
            _ => None,
        }
    }
}

/// The prefix every instance of `service` shares.
pub fn instances_of(prefix: &str, service: &ServiceKey) -> String {
    format!("{prefix}/i/{}/", service_path(service))
}

/// The prefix every kept version of the config item `key` shares.
pub fn versions_of(prefix: &str, key: &ConfigKey) -> String {
    format!("{prefix}/cv/{}/", config_path(key))
}

/// Whether `key` is a config item's ([`Key::Config`] or
/// [`Key::ConfigVersion`]), told from its bytes alone: the config
/// centre's part of the cluster's feed is picked out of every change
/// without decoding the others.
pub fn is_config(prefix: &str, key: &[u8]) -> bool {
    key.strip_prefix(prefix.as_bytes())
        .is_some_and(|rest| rest.starts_with(b"/c/") || rest.starts_with(b"/cv/"))
}

/// The prefix every registry node's [`Key::Node`] shares.
pub fn nodes(prefix: &str) -> String {
    format!("{prefix}/n/")
}

/// The key whose holder probes the persistent instances (see
/// [`super::election`]). Not a [`Key`]: the view has nothing to apply
/// from it, and skips it.
pub fn prober(prefix: &str) -> String {
    format!("{prefix}/prober")
}

fn service_path(service: &ServiceKey) -> String {
    format!("{}/{}/{}", service.namespace, service.group, service.name)
}

fn config_path(key: &ConfigKey) -> String {
    format!("{}/{}/{}", key.namespace, key.group, key.data_id)
}

fn config(namespace: &str, group: &str, data_id: &str) -> ConfigKey {
    ConfigKey {
        namespace: Arc::from(namespace),
        group: Arc::from(group),
        data_id: Arc::from(data_id),
    }
}

fn service(namespace: &str, group: &str, name: &str) -> ServiceKey {
    ServiceKey {
        namespace: Arc::from(namespace),
        group: Arc::from(group),
        name: Arc::from(name),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> ServiceKey {
        ServiceKey::parse("public", "DEFAULT_GROUP", "server-user").unwrap()
    }

    #[test]
    fn every_key_reads_back_as_itself() {
        let v6 = InstanceAddr::parse("c-1", "fd00::7", 8080).unwrap();
        let v4 = InstanceAddr::parse("", "10.0.0.1", 1).unwrap();
        for written in [
            Key::Settings(key()),
            Key::Instance(key(), v6),
            Key::Instance(key(), v4),
            Key::Alive(u64::MAX),
            Key::Alive(1),
            Key::Token(TokenId(0x0123_4567_89ab_cdef)),
            Key::Config(config("public", "shop-mesh", "server-order")),
            Key::ConfigVersion(config("public", "shop-mesh", "server-order"), 0),
            Key::ConfigVersion(config("dev", "g", "a.toml"), u64::MAX),
            Key::Node {
                addr: "127.0.0.1:8848".parse().unwrap(),
                id: 1,
            },
            Key::Node {
                addr: "[fd00::7]:8848".parse().unwrap(),
                id: u64::MAX,
            },
        ] {
            let bytes = written.encode("/shop-mesh");
            assert_eq!(
                Key::decode("/shop-mesh", bytes.as_bytes()),
                Some(written),
                "{bytes}"
            );
        }
    }

    #[test]
    fn an_instance_key_lies_under_its_service_prefix_and_no_other() {
        let addr = InstanceAddr::parse("", "10.0.0.1", 80).unwrap();
        let instance = Key::Instance(key(), addr).encode("/p");
        assert!(instance.starts_with(&instances_of("/p", &key())));
        let longer = ServiceKey::parse("public", "DEFAULT_GROUP", "server-user-2").unwrap();
        assert!(!instance.starts_with(&instances_of("/p", &longer)));
    }

    #[test]
    fn a_config_items_versions_lie_under_its_prefix_and_no_other() {
        let item = config("public", "g", "app");
        let version = Key::ConfigVersion(item.clone(), 3).encode("/p");
        assert!(version.starts_with(&versions_of("/p", &item)));
        assert!(!version.starts_with(&versions_of("/p", &config("public", "g", "ap"))));
        assert!(
            !Key::Config(item.clone())
                .encode("/p")
                .starts_with(&versions_of("/p", &item))
        );
    }

    #[test]
    fn a_node_key_lies_under_the_nodes_prefix() {
        let node = Key::Node {
            addr: "0.0.0.0:8848".parse().unwrap(),
            id: 7,
        };
        assert_eq!(node.encode("/p"), "/p/n/0.0.0.0:8848/0000000000000007");
        assert!(node.encode("/p").starts_with(&nodes("/p")));
    }

    #[test]
    fn keys_of_another_prefix_or_shape_are_not_ours() {
        for foreign in [
            "/other/s/public/DEFAULT_GROUP/a",
            "/p/s/public/DEFAULT_GROUP",
            "/p/i/public/DEFAULT_GROUP/a/c/10.0.0.1/0",
            "/p/i/public/DEFAULT_GROUP/a/c/not-an-ip/80",
            "/p/a/12",
            "/p/t/12",
            "/p/x/1",
            "/p/c/public/g",
            "/p/cv/public/g/app/3",
            "/p/cv/public/g/app",
            "/p/n/127.0.0.1:8848",
            "/p/n/127.0.0.1/0000000000000001",
            "/p/n/127.0.0.1:8848/1",
            "/pp/a/0000000000000001",
            prober("/p").as_str(),
        ] {
            assert_eq!(Key::decode("/p", foreign.as_bytes()), None, "{foreign}");
        }
    }
}
