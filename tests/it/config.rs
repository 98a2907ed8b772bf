//! Configuration precedence, one test per layer: defaults < file <
//! environment < flags.

// figment's Jail fixes the closure's error type.
#![allow(clippy::result_large_err)]

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use figment::Jail;
use figment::providers::Env;
use shop_mesh::cli::Cli;
use shop_mesh::config::{Config, ENV_PREFIX, LogFormat};

fn env() -> Env {
    Env::prefixed(ENV_PREFIX).split("__")
}

#[test]
fn defaults_are_nacos_timings_on_8848() {
    Jail::expect_with(|_| {
        let config = Config::load_from(None, env()).unwrap();
        assert_eq!(
            config.registry.listen,
            "0.0.0.0:8848".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(config.registry.heartbeat_interval, Duration::from_secs(5));
        assert_eq!(config.registry.unhealthy_timeout, Duration::from_secs(15));
        assert_eq!(config.registry.delete_timeout, Duration::from_secs(30));
        assert_eq!(config.log.format, LogFormat::Text);
        Ok(())
    });
}

#[test]
fn the_default_file_overrides_defaults() {
    Jail::expect_with(|jail| {
        jail.create_dir("config")?;
        jail.create_file(
            "config/default.toml",
            "[registry]\nunhealthy_timeout = \"20s\"\n",
        )?;
        let config = Config::load_from(None, env()).unwrap();
        assert_eq!(config.registry.unhealthy_timeout, Duration::from_secs(20));
        assert_eq!(
            config.registry.delete_timeout,
            Duration::from_secs(30),
            "the rest stays"
        );
        Ok(())
    });
}

#[test]
fn an_explicit_file_replaces_the_default_file_and_must_exist() {
    Jail::expect_with(|jail| {
        jail.create_dir("config")?;
        jail.create_file(
            "config/default.toml",
            "[registry]\nunhealthy_timeout = \"20s\"\n",
        )?;
        jail.create_file("mine.toml", "[log]\nlevel = \"debug\"\n")?;
        let config = Config::load_from(Some("mine.toml".as_ref()), env()).unwrap();
        assert_eq!(config.log.level, "debug");
        assert_eq!(config.registry.unhealthy_timeout, Duration::from_secs(15));
        let err = Config::load_from(Some("missing.toml".as_ref()), env()).unwrap_err();
        assert!(err.to_string().contains("missing.toml"), "{err}");
        Ok(())
    });
}

#[test]
fn the_environment_overrides_the_file() {
    Jail::expect_with(|jail| {
        jail.create_file("mine.toml", "[registry]\nlisten = \"127.0.0.1:1000\"\n")?;
        jail.set_env("SHOP_MESH__REGISTRY__LISTEN", "127.0.0.1:2000");
        jail.set_env("SHOP_MESH__REGISTRY__LIMITS__MAX_WATCHES", "7");
        let config = Config::load_from(Some("mine.toml".as_ref()), env()).unwrap();
        assert_eq!(config.registry.listen.port(), 2000);
        assert_eq!(config.registry.limits.max_watches, 7);
        Ok(())
    });
}

#[test]
fn unknown_keys_and_bad_values_are_errors() {
    Jail::expect_with(|jail| {
        jail.create_file("typo.toml", "[registry]\nlisen = \"127.0.0.1:1\"\n")?;
        let err = Config::load_from(Some("typo.toml".as_ref()), env()).unwrap_err();
        assert!(err.to_string().contains("lisen"), "{err}");
        jail.set_env("SHOP_MESH__REGISTRY__HEARTBEAT_INTERVAL", "often");
        assert!(Config::load_from(None, env()).is_err());
        Ok(())
    });
}

#[test]
fn flags_override_the_environment() {
    Jail::expect_with(|jail| {
        jail.set_env("SHOP_MESH__REGISTRY__LISTEN", "127.0.0.1:2000");
        let cli = Cli::try_parse_from([
            "shop-mesh",
            "registry",
            "--listen",
            "127.0.0.1:3000",
            "--data-dir",
            "var/registry",
        ])
        .unwrap();
        let mut config = Config::load_from(None, env()).unwrap();
        cli.role.apply(&mut config);
        assert_eq!(config.registry.listen.port(), 3000);
        assert_eq!(
            config.registry.data_dir,
            std::path::PathBuf::from("var/registry")
        );
        Ok(())
    });
}

#[test]
fn the_shipped_default_file_says_what_the_built_in_defaults_are() {
    let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/default.toml");
    let from_file =
        Config::load_from(Some(&file), Env::prefixed("SHOP_MESH_TEST_NOTHING__")).unwrap();
    assert_eq!(from_file, Config::default());
}

#[test]
fn a_shop_service_takes_its_database_and_registry_from_flags_over_the_environment() {
    Jail::expect_with(|jail| {
        jail.set_env(
            "SHOP_MESH__PRODUCT__DATABASE_URL",
            "sqlite://env.db?mode=rwc",
        );
        jail.set_env("SHOP_MESH__DISCOVERY__REGISTRY", "10.0.0.1:8848");
        let env_only = Config::load_from(None, env()).unwrap();
        assert_eq!(
            env_only.product.database_url.as_deref(),
            Some("sqlite://env.db?mode=rwc")
        );
        assert!(env_only.product.seed_data);

        let cli = Cli::try_parse_from([
            "shop-mesh",
            "product",
            "--registry",
            "127.0.0.1:9000,127.0.0.1:9001",
            "--listen",
            "127.0.0.1:7070",
            "--database-url",
            "postgres://shop@db/shop",
            "--no-seed-data",
        ])
        .unwrap();
        let mut config = env_only.clone();
        cli.role.apply(&mut config);
        assert_eq!(config.discovery.registry, "127.0.0.1:9000,127.0.0.1:9001");
        assert_eq!(config.product.listen.port(), 7070);
        assert_eq!(
            config.product.database_url.as_deref(),
            Some("postgres://shop@db/shop")
        );
        assert!(!config.product.seed_data);
        assert_eq!(config.user, env_only.user, "other roles keep theirs");
        Ok(())
    });
}
