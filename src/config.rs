//! Layered configuration: built-in defaults < `config/default.toml` (or
//! `--config FILE`) < `SHOP_MESH__SECTION__KEY` environment variables <
//! command-line flags, merged into one typed [`Config`].

use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

use crate::shop::{ORDER_PORT, PRODUCT_PORT, ServiceConfig, USER_PORT};

/// The default configuration file, read when it exists and no `--config`
/// is given.
pub const DEFAULT_FILE: &str = "config/default.toml";

/// The prefix of configuration environment variables; `__` separates the
/// section from the key (`SHOP_MESH__REGISTRY__LISTEN`).
pub const ENV_PREFIX: &str = "SHOP_MESH__";

/// Everything a role can be configured with, one section per concern.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// `[log]`: what is logged and how it looks.
    pub log: LogConfig,
    /// `[telemetry]`: metrics and traces.
    pub telemetry: crate::telemetry::Config,
    /// Every connection, served or dialled: keepalives and Nagle; and on
    /// each role's port, how many it holds and how long a silent one may
    /// stay.
    pub connections: crate::server::Connections,
    /// `[registry]`: read by the registry role only.
    pub registry: crate::registry::Config,
    /// `[discovery]`: how services and clients find the registry and call
    /// each other.
    pub discovery: crate::discovery::Config,
    /// `[user]`: where the user service listens and stores.
    pub user: ServiceConfig,
    /// `[product]`: where the product service listens and stores.
    pub product: ServiceConfig,
    /// `[order]`: where the order service listens and stores.
    pub order: ServiceConfig,
    /// `[shop]`: the rules of the order flow.
    pub shop: crate::shop::Rules,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            log: LogConfig::default(),
            telemetry: crate::telemetry::Config::default(),
            connections: crate::server::Connections::default(),
            registry: crate::registry::Config::default(),
            discovery: crate::discovery::Config::default(),
            user: ServiceConfig::for_role("user", USER_PORT),
            product: ServiceConfig::for_role("product", PRODUCT_PORT),
            order: ServiceConfig::for_role("order", ORDER_PORT),
            shop: crate::shop::Rules::default(),
        }
    }
}

/// The `[log]` section, read once at start by [`crate::telemetry::init`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// A `tracing` filter (`info`, `shop_mesh=debug,tower=warn`);
    /// `RUST_LOG` wins when set.
    pub level: String,
    /// How each line is written to stderr; `text` unless set.
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

/// How log lines are written; spelt `text` or `json` in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// For people: one readable line per event, coloured on a terminal.
    Text,
    /// For log collectors: one JSON object per event.
    Json,
}

/// Why the configuration could not be loaded; either way the role does
/// not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file named on the command line is not there (the default file
    /// may be absent).
    #[error("configuration file {0} does not exist")]
    MissingFile(PathBuf),
    /// A layer does not parse, has an unknown key or a value of the wrong
    /// type; figment's message says where.
    #[error("invalid configuration: {0}")]
    Invalid(#[from] Box<figment::Error>),
}

impl Config {
    /// Merges the defaults, the file (`path`, else [`DEFAULT_FILE`] if it
    /// exists) and the environment. Flags are applied by the caller, on the
    /// typed result.
    pub fn load(path: Option<&Path>) -> Result<Self, Error> {
        Self::load_from(path, Env::prefixed(ENV_PREFIX).split("__"))
    }

    /// [`Config::load`] with the environment given, so tests need not touch
    /// the process's own.
    pub fn load_from(path: Option<&Path>, env: Env) -> Result<Self, Error> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        match path {
            Some(path) if !path.exists() => return Err(Error::MissingFile(path.into())),
            Some(path) => figment = figment.merge(Toml::file(path)),
            None if Path::new(DEFAULT_FILE).exists() => {
                figment = figment.merge(Toml::file(DEFAULT_FILE))
            }
            None => {}
        }
        figment
            .merge(env)
            .extract()
            .map_err(|err| Error::Invalid(Box::new(err)))
    }

    /// Every role on a free loopback port, each keeping its data under
    /// `dir` (`dir/registry`, `dir/user`, ...): a whole shop in one
    /// process, as the benches and tests run it with `up::Stack`.
    pub fn on_loopback(&mut self, dir: &Path) {
        let loopback = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        self.registry.listen = loopback;
        self.registry.data_dir = dir.join("registry");
        for (role, service) in [
            ("user", &mut self.user),
            ("product", &mut self.product),
            ("order", &mut self.order),
        ] {
            service.listen = loopback;
            service.data_dir = dir.join(role);
        }
    }

    /// The merged configuration as TOML, for `--print-config`.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|err| format!("# cannot print: {err}"))
    }
}
