//! The command line. Each subcommand is a role (or a tool); its flags
//! override the configuration keys they name.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::client::{ClientArgs, OrderCommand, ProductCommand, UserCommand};
use crate::config::{Config, LogFormat};
use crate::discovery::Mesh;
use crate::roles::ShopRole;
use crate::shop::ServiceArgs;

/// The parsed command line: global flags and the one role to run.
#[derive(Debug, Parser)]
#[command(
    name = "shop-mesh",
    version,
    about = "A service registry and the shop services that find each other through it"
)]
pub struct Cli {
    /// Configuration file [default: config/default.toml when it exists].
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Print the merged configuration and exit.
    #[arg(long, global = true)]
    pub print_config: bool,
    /// Log as JSON lines [config: log.format].
    #[arg(long, global = true)]
    pub log_json: bool,
    /// TLS on every port: this process's PEM certificate chain
    /// [config: connections.tls.cert].
    #[arg(long, global = true, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert [config: connections.tls.key].
    #[arg(long, global = true, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// The PEM CA that peers' certificates are checked against; set, calls
    /// go over TLS [config: connections.tls.ca].
    #[arg(long, global = true, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// Mutual TLS: servers take only clients with a certificate the CA
    /// signed, and clients show theirs [config: connections.tls.mutual].
    #[arg(long, global = true)]
    pub tls_mutual: bool,
    /// What this process runs.
    #[command(subcommand)]
    pub role: Role,
}

/// What this process runs. The names are the CLI's.
#[derive(Debug, Subcommand)]
pub enum Role {
    /// The registry (Nacos's job), on :8848 by default.
    Registry(crate::registry::Args),
    /// The user service, "server-user", on :8060 by default; or, with a
    /// command, a client of it.
    User(UserRole),
    /// The product service, "server-product", on :8070 by default; or, with
    /// a command, a client of it.
    Product(ProductRole),
    /// The order service, "server-order", on :8080 by default, which finds
    /// the other two through the registry; or, with a command, a client of it.
    Order(OrderRole),
    /// The registry and every service at once, on this machine, on SQLite.
    Up(crate::up::Args),
    /// Lists the services of a namespace and group.
    Services(crate::inspect::Scope),
    /// Lists one service's instances.
    Instances {
        /// The service whose instances to list.
        service: String,
        /// Where to look, and how to print.
        #[command(flatten)]
        scope: crate::inspect::Scope,
    },
    /// Prints each change to a service as it happens, until Ctrl-C.
    Watch {
        /// The service to watch.
        service: String,
        /// Where to look, and how to print.
        #[command(flatten)]
        scope: crate::inspect::Scope,
    },
    /// Shows the registry node that answers, where its state lives and,
    /// on the etcd store, the etcd cluster's members and its leader.
    Cluster(crate::inspect::Scope),
    /// Makes, lists and revokes the registry's tokens (with an admin one).
    #[command(subcommand)]
    Token(crate::token::Command),
    /// Reads, publishes, rolls back and watches the config centre's items.
    #[command(name = "config", subcommand)]
    Configs(crate::configs::Command),
    /// Makes a development CA and a certificate it signed, for TLS.
    Cert(crate::cert::Args),
    /// Runs the shop as processes under load and faults, and checks that
    /// nothing was oversold, lost or doubled.
    Soak(crate::soak::Args),
    /// Measures a deployment.
    #[command(subcommand)]
    Bench(crate::bench::Bench),
}

/// `shop-mesh user [get ID]`: the service, or a command against it.
#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct UserRole {
    /// Flags of the user service, when it is run as one.
    #[command(flatten)]
    pub serve: ServiceArgs,
    /// A call to make against a running user service instead of serving.
    #[command(subcommand)]
    pub command: Option<UserCommand>,
}

/// `shop-mesh product [get ID | list]`.
#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct ProductRole {
    /// Flags of the product service, when it is run as one.
    #[command(flatten)]
    pub serve: ServiceArgs,
    /// A call to make against a running product service instead of serving.
    #[command(subcommand)]
    pub command: Option<ProductCommand>,
}

/// `shop-mesh order [place ... | get ID | list --user ID]`.
#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct OrderRole {
    /// Flags of the order service, when it is run as one.
    #[command(flatten)]
    pub serve: ServiceArgs,
    /// A call to make against a running order service instead of serving.
    #[command(subcommand)]
    pub command: Option<OrderCommand>,
}

impl Role {
    /// Applies this role's flags over the loaded configuration.
    pub fn apply(&self, config: &mut Config) {
        match self {
            Role::Registry(args) => args.apply(&mut config.registry),
            Role::User(UserRole {
                command: Some(command),
                ..
            }) => client_apply(command.client(), config),
            Role::Product(ProductRole {
                command: Some(command),
                ..
            }) => client_apply(command.client(), config),
            Role::Order(OrderRole {
                command: Some(command),
                ..
            }) => client_apply(command.client(), config),
            Role::User(role) => role.serve.apply(&mut config.discovery, &mut config.user),
            Role::Product(role) => role.serve.apply(&mut config.discovery, &mut config.product),
            Role::Order(role) => role.serve.apply(&mut config.discovery, &mut config.order),
            Role::Up(args) => args.apply(config),
            Role::Services(scope)
            | Role::Cluster(scope)
            | Role::Instances { scope, .. }
            | Role::Watch { scope, .. } => scope.apply(&mut config.discovery),
            Role::Token(command) => command.scope().apply(&mut config.discovery),
            Role::Configs(command) => command.scope().apply(&mut config.discovery),
            _ => {}
        }
        if self.prints_for_people() {
            config.log.level = "warn".into();
        }
    }

    /// Whether a person reads what this prints (a table, a summary, a
    /// client's answer): then only warnings are logged beside it.
    fn prints_for_people(&self) -> bool {
        match self {
            Role::User(UserRole { command, .. }) => command.is_some(),
            Role::Product(ProductRole { command, .. }) => command.is_some(),
            Role::Order(OrderRole { command, .. }) => command.is_some(),
            Role::Up(args) => !args.verbose,
            Role::Soak(_)
            | Role::Services(_)
            | Role::Cluster(_)
            | Role::Instances { .. }
            | Role::Watch { .. }
            | Role::Token(_)
            | Role::Configs(_)
            | Role::Cert(_) => true,
            Role::Registry(_) | Role::Bench(_) => false,
        }
    }
}

/// A client command's registry.
fn client_apply(client: &ClientArgs, config: &mut Config) {
    if let Some(registry) = &client.registry {
        config.discovery.registry = registry.clone();
    }
}

/// Loads the configuration, starts logging and runs the chosen role.
pub fn main(cli: Cli) -> anyhow::Result<ExitCode> {
    let mut config = Config::load(cli.config.as_deref())?;
    if cli.log_json {
        config.log.format = LogFormat::Json;
    }
    let tls = &mut config.connections.tls;
    for (flag, setting) in [
        (&cli.tls_cert, &mut tls.cert),
        (&cli.tls_key, &mut tls.key),
        (&cli.tls_ca, &mut tls.ca),
    ] {
        if let Some(path) = flag {
            *setting = path.clone();
        }
    }
    tls.mutual |= cli.tls_mutual;
    cli.role.apply(&mut config);
    if cli.print_config {
        print!("{}", config.to_toml());
        return Ok(ExitCode::SUCCESS);
    }
    crate::telemetry::init(&config.log);
    crate::server::raise_file_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let tracing = crate::telemetry::start_tracing(&config.telemetry)?;
        let ran = run(cli.role, config).await;
        if let Some(tracing) = tracing {
            tracing.finish().await;
        }
        ran
    })
}

async fn run(role: Role, config: Config) -> anyhow::Result<ExitCode> {
    match role {
        Role::Registry(_) => {
            let listener = crate::server::bind(config.registry.listen, "registry", None).await?;
            crate::registry::run(
                &config.registry,
                &config.connections,
                &config.telemetry,
                listener,
                crate::shutdown::on_signal(),
            )
            .await?;
            Ok(ExitCode::SUCCESS)
        }
        Role::User(UserRole {
            command: Some(command),
            ..
        }) => command
            .run(&Mesh::new(&config.discovery, &config.connections)?)
            .await
            .map(|()| ExitCode::SUCCESS),
        Role::Product(ProductRole {
            command: Some(command),
            ..
        }) => command
            .run(&Mesh::new(&config.discovery, &config.connections)?)
            .await
            .map(|()| ExitCode::SUCCESS),
        Role::Order(OrderRole {
            command: Some(command),
            ..
        }) => command
            .run(&Mesh::new(&config.discovery, &config.connections)?)
            .await
            .map(|()| ExitCode::SUCCESS),
        Role::User(_) => serve(ShopRole::User, &config).await,
        Role::Product(_) => serve(ShopRole::Product, &config).await,
        Role::Up(args) => {
            crate::up::run(&config, &args, crate::shutdown::on_signal()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Role::Order(_) => serve(ShopRole::Order, &config).await,
        Role::Soak(args) => Ok(if crate::soak::run(args).await? {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }),
        Role::Bench(bench) => bench.run().await.map(|()| ExitCode::SUCCESS),
        Role::Cert(args) => args.run().map(|()| ExitCode::SUCCESS),
        Role::Services(scope) => {
            crate::inspect::services(&config.discovery, &config.connections, scope.json)
                .await
                .map(|()| ExitCode::SUCCESS)
        }
        Role::Cluster(scope) => {
            crate::inspect::cluster(&config.discovery, &config.connections, scope.json)
                .await
                .map(|()| ExitCode::SUCCESS)
        }
        Role::Token(command) => command
            .run(&config.discovery, &config.connections)
            .await
            .map(|()| ExitCode::SUCCESS),
        Role::Configs(command) => command
            .run(
                &config.discovery,
                &config.connections,
                crate::shutdown::on_signal(),
            )
            .await
            .map(|()| ExitCode::SUCCESS),
        Role::Instances { service, scope } => {
            crate::inspect::instances(&config.discovery, &config.connections, &service, scope.json)
                .await
                .map(|()| ExitCode::SUCCESS)
        }
        Role::Watch { service, scope } => crate::inspect::watch(
            &config.discovery,
            &config.connections,
            &service,
            scope.json,
            crate::shutdown::on_signal(),
        )
        .await
        .map(|()| ExitCode::SUCCESS),
    }
}

/// Serves a shop role on its configured address until SIGTERM or Ctrl-C.
async fn serve(role: ShopRole, config: &Config) -> anyhow::Result<ExitCode> {
    let listener = crate::server::bind(role.config(config).listen, role.name(), None).await?;
    role.run(config, listener, crate::shutdown::on_signal())
        .await?;
    Ok(ExitCode::SUCCESS)
}
