//! A role's live settings: the part of its configuration it takes from
//! the config centre while it runs, so an operator changes it with
//! `shop-mesh config put` and no restart.
//!
//! Each shop role follows one item: data id its service name
//! (`server-order`), group [`GROUP`], in its discovery namespace, whose
//! TOML uses the configuration file's own keys:
//!
//! ```toml
//! [shop]
//! max_order_count = 50
//! [log]
//! level = "info,shop_mesh=debug"
//! ```
//!
//! A key the item leaves out (or an item deleted) means the value the
//! role started with. The registry checks such an item when it is
//! published (type TOML, keys known, values in range), so a bad value is
//! refused there; one that reaches a role anyway (published to a registry
//! of another version) is logged and ignored, and the role keeps its last
//! good values. Every change applied is logged with what it changed, and
//! `shop_mesh_live_config_version` says which version a role runs.

use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use serde::Deserialize;
use tokio::sync::watch;

use crate::config::Config;
use crate::discovery::Connector;
use crate::error::Error;
use crate::pb::config as pb;
use crate::pb::config::configs_client::ConfigsClient;
use crate::registry::configs::model::{ConfigKey, ContentType};
use crate::roles::ShopRole;
use crate::shop::{ORDER_SERVICE, PRODUCT_SERVICE, USER_SERVICE};
use crate::shutdown::Shutdown;
use crate::telemetry::Metrics;

/// The group of the roles' live settings items.
pub const GROUP: &str = "shop-mesh";

/// The largest `shop.max_order_count` a live setting may give.
pub const MAX_ORDER_COUNT: u32 = 1_000_000;

/// What a live settings item may hold; absent keys keep the role's own.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// `[shop]`.
    pub shop: ShopSettings,
    /// `[log]`.
    pub log: LogSettings,
}

/// The live part of `[shop]`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShopSettings {
    /// The largest count one order may ask for (the order role).
    pub max_order_count: Option<u32>,
}

/// The live part of `[log]`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSettings {
    /// A `tracing` filter, as `log.level` takes.
    pub level: Option<String>,
}

impl Settings {
    /// Reads an item's content, refusing what a role could not apply and
    /// naming the key.
    pub fn parse(content: &str) -> Result<Settings, Error> {
        let settings: Settings = toml::from_str(content).map_err(|err| {
            Error::invalid(
                "content",
                format!(
                    "is not a role's live settings ([shop] max_order_count, [log] level): {}",
                    err.message()
                ),
            )
        })?;
        if let Some(count) = settings.shop.max_order_count
            && !(1..=MAX_ORDER_COUNT).contains(&count)
        {
            return Err(Error::invalid(
                "content",
                format!(
                    "shop.max_order_count is {count}; it must be between 1 and {MAX_ORDER_COUNT}"
                ),
            ));
        }
        if let Some(level) = &settings.log.level {
            crate::telemetry::parse_log_level(level).map_err(|err| {
                Error::invalid(
                    "content",
                    format!(
                        "log.level {} is not a log filter: {err}",
                        crate::quote::quoted(level)
                    ),
                )
            })?;
        }
        Ok(settings)
    }
}

/// Whether `key` names a role's live settings.
pub fn is_role_item(key: &ConfigKey) -> bool {
    &*key.group == GROUP && [USER_SERVICE, PRODUCT_SERVICE, ORDER_SERVICE].contains(&&*key.data_id)
}

/// Checks content published to `key`: a role's live settings must be
/// TOML that [`Settings::parse`] takes; anything else passes.
pub fn check(key: &ConfigKey, content_type: ContentType, content: &str) -> Result<(), Error> {
    if !is_role_item(key) {
        return Ok(());
    }
    if content_type != ContentType::Toml {
        return Err(Error::invalid(
            "content_type",
            format!(
                "the live settings of {} are TOML; publish them as toml",
                key.data_id
            ),
        ));
    }
    Settings::parse(content).map(drop)
}

/// The values a role runs with now: its own configuration's, overlaid
/// with its live settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// `shop.max_order_count`.
    pub max_order_count: u32,
    /// `log.level`.
    pub log_level: String,
    /// The item's version these came from; 0: none (the role's own).
    pub version: u64,
}

impl Applied {
    fn of(config: &Config) -> Applied {
        Applied {
            max_order_count: config.shop.max_order_count,
            log_level: config.log.level.clone(),
            version: 0,
        }
    }
}

/// A role's live settings, as its handlers read them: cheap to clone and
/// to read.
#[derive(Debug, Clone)]
pub struct Live {
    applied: watch::Receiver<Applied>,
}

impl Live {
    /// Follows `role`'s item at the registry `config` names, applying each
    /// version as it comes, until `shutdown`. The role serving on `bound`
    /// presents itself to gray rules by the address it registers and the
    /// labels `service` (its service name) and `instance` (that address,
    /// `ip:port`).
    pub fn follow(
        config: &Config,
        (role, bound): (ShopRole, std::net::SocketAddr),
        metrics: &Metrics,
        shutdown: Shutdown,
    ) -> anyhow::Result<Live> {
        let connector = config.discovery.connector(&config.connections)?;
        let key = ConfigKey::parse(&config.discovery.namespace, GROUP, role.service())?;
        let addr =
            crate::discovery::advertise_addr(bound, role.config(config).advertise.as_deref())?;
        let client = pb::Client {
            ip: addr.ip().to_string(),
            labels: [
                ("service".to_string(), role.service().to_string()),
                ("instance".to_string(), addr.to_string()),
            ]
            .into(),
        };
        let base = Applied::of(config);
        let (sender, applied) = watch::channel(base.clone());
        let follower = Follower {
            key,
            client,
            base,
            sender,
            metrics: LiveMetrics::new(metrics),
        };
        tokio::spawn(follower.run(connector, shutdown));
        Ok(Live { applied })
    }

    /// `shop.max_order_count` now.
    pub fn max_order_count(&self) -> u32 {
        self.applied.borrow().max_order_count
    }
}

#[derive(Debug, Clone, Default)]
struct LiveMetrics {
    version: Gauge,
    rejected: Counter,
}

impl LiveMetrics {
    fn new(metrics: &Metrics) -> LiveMetrics {
        let this = LiveMetrics::default();
        metrics.register(|registry| {
            registry.register(
                "live_config_version",
                "The version of the role's live settings item it runs with (0: none, its own configuration)",
                this.version.clone(),
            );
            registry.register(
                "live_config_rejected",
                "Versions of the role's live settings item it could not apply and ignored",
                this.rejected.clone(),
            );
        });
        this
    }
}

/// Applies each version of one item to a role.
struct Follower {
    key: ConfigKey,
    /// How it presents itself to gray rules.
    client: pb::Client,
    /// The role's own values: what a key left out means.
    base: Applied,
    sender: watch::Sender<Applied>,
    metrics: LiveMetrics,
}

impl Follower {
    /// Watches the item, resuming after each break, until `shutdown`.
    async fn run(self, connector: Connector, shutdown: Shutdown) {
        let mut position: Option<(u64, u64)> = None;
        let mut delays = connector.backoff();
        loop {
            let Some((channel, addr)) = connector.connect_channel(&shutdown).await else {
                return;
            };
            let request = pb::WatchRequest {
                namespace: self.key.namespace.to_string(),
                group: self.key.group.to_string(),
                data_id: self.key.data_id.to_string(),
                start_revision: position.map_or(0, |(revision, _)| revision + 1),
                incarnation: position.map_or(0, |(_, incarnation)| incarnation),
                client: Some(self.client.clone()),
            };
            match ConfigsClient::new(channel).watch(request).await {
                Ok(stream) => {
                    let mut stream = stream.into_inner();
                    loop {
                        let answer = tokio::select! {
                            _ = shutdown.cancelled() => return,
                            answer = stream.message() => answer,
                        };
                        match answer {
                            Ok(Some(answer)) => {
                                position = Some((answer.revision, answer.incarnation));
                                self.on(answer);
                                delays = connector.backoff();
                            }
                            Ok(None) => break,
                            Err(status) => {
                                tracing::debug!(registry = %addr, %status, "live settings watch broke; resuming");
                                break;
                            }
                        }
                    }
                }
                Err(status) => {
                    tracing::warn!(registry = %addr, item = %self.key, code = ?status.code(), message = status.message(), "cannot follow the live settings; running on the last applied");
                }
            }
            let delay = delays.next().unwrap_or(Duration::from_secs(5));
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    fn on(&self, answer: pb::WatchResponse) {
        match answer.body {
            Some(pb::watch_response::Body::Snapshot(snapshot)) => {
                match snapshot.items.into_iter().next() {
                    Some(item) => self.apply(Some(&item.content), item.version),
                    None => self.apply(None, 0),
                }
            }
            Some(pb::watch_response::Body::Change(change)) => {
                let item = change.item.unwrap_or_default();
                if change.kind == pb::change::Kind::Delete as i32 {
                    self.apply(None, 0);
                } else {
                    self.apply(Some(&item.content), item.version);
                }
            }
            None => {}
        }
    }

    /// Applies `content` (none: the item is gone) at `version`; content a
    /// role cannot apply is logged and leaves the last good values.
    fn apply(&self, content: Option<&str>, version: u64) {
        let settings = match content.map(Settings::parse).transpose() {
            Ok(settings) => settings.unwrap_or_default(),
            Err(err) => {
                self.metrics.rejected.inc();
                tracing::warn!(item = %self.key, version, error = %err, "live settings ignored; keeping the last good values");
                return;
            }
        };
        let current = self.sender.borrow().clone();
        let next = Applied {
            max_order_count: settings
                .shop
                .max_order_count
                .unwrap_or(self.base.max_order_count),
            log_level: settings.log.level.unwrap_or(self.base.log_level.clone()),
            version,
        };
        let mut changed = Vec::new();
        if next.max_order_count != current.max_order_count {
            changed.push(format!(
                "shop.max_order_count {} -> {}",
                current.max_order_count, next.max_order_count
            ));
        }
        if next.log_level != current.log_level {
            if let Err(err) = crate::telemetry::set_log_level(&next.log_level) {
                self.metrics.rejected.inc();
                tracing::warn!(item = %self.key, version, error = %err, "live log level ignored; keeping the last good values");
                return;
            }
            changed.push(format!(
                "log.level {:?} -> {:?}",
                current.log_level, next.log_level
            ));
        }
        self.metrics.version.set(version as i64);
        if !changed.is_empty() {
            tracing::info!(item = %self.key, version, changed = %changed.join(", "), "live settings applied");
        }
        self.sender.send_replace(next);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn follower() -> (Follower, watch::Receiver<Applied>) {
        let config = Config::default();
        let base = Applied::of(&config);
        let (sender, receiver) = watch::channel(base.clone());
        let follower = Follower {
            key: ConfigKey::parse("", GROUP, ORDER_SERVICE).unwrap(),
            client: pb::Client::default(),
            base,
            sender,
            metrics: LiveMetrics::default(),
        };
        (follower, receiver)
    }

    #[test]
    fn a_version_applies_what_it_sets_and_leaves_out_the_rest() {
        let (follower, applied) = follower();
        follower.apply(Some("[shop]\nmax_order_count = 5\n"), 7);
        assert_eq!(applied.borrow().max_order_count, 5);
        assert_eq!(applied.borrow().version, 7);
        // A later version without the key, or the item deleted: the
        // role's own value again.
        follower.apply(Some(""), 8);
        assert_eq!(applied.borrow().max_order_count, 10_000);
        follower.apply(Some("[shop]\nmax_order_count = 6\n"), 9);
        follower.apply(None, 0);
        assert_eq!(*applied.borrow(), Applied::of(&Config::default()));
    }

    #[test]
    fn a_bad_version_is_counted_and_the_last_good_values_stay() {
        let (follower, applied) = follower();
        follower.apply(Some("[shop]\nmax_order_count = 5\n"), 3);
        for bad in [
            "[shop]\nmax_order_count = 0\n",
            "[shop]\nmax_order_count = \"five\"\n",
            "[shop]\nmax_orders = 5\n",
            "not toml at all = =",
            "[log]\nlevel = \"shop_mesh=[\"\n",
        ] {
            follower.apply(Some(bad), 4);
            assert_eq!(
                (applied.borrow().max_order_count, applied.borrow().version),
                (5, 3),
                "{bad}"
            );
        }
        assert_eq!(follower.metrics.rejected.get(), 5);
    }

    #[test]
    fn only_the_roles_items_are_checked_and_they_must_be_toml() {
        let order = ConfigKey::parse("", GROUP, ORDER_SERVICE).unwrap();
        let other = ConfigKey::parse("", "DEFAULT_GROUP", ORDER_SERVICE).unwrap();
        assert!(check(&other, ContentType::Text, "max_order_count = 0").is_ok());
        let err = check(&order, ContentType::Text, "")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("content_type:"), "{err}");
        let err = check(&order, ContentType::Toml, "[shop]\nmax_order_count = 0")
            .unwrap_err()
            .to_string();
        assert!(err.contains("shop.max_order_count is 0"), "{err}");
        let err = check(&order, ContentType::Toml, "[shop]\nmax = 1")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `max`"), "{err}");
        assert!(check(&order, ContentType::Toml, "[log]\nlevel = \"debug\"").is_ok());
    }
}
