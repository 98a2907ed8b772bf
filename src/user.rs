//! The user role: `shop-mesh user`, registered as "server-user". Answers
//! who a user is; the password hash stays here.

pub mod store;

use tokio::net::TcpListener;
use tonic::{Request, Response, Status};

use crate::pb::shop as pb;
use crate::pb::shop::user_service_server::{UserService, UserServiceServer};
use crate::roles::ShopRole;
use crate::shop;
use crate::shutdown::Shutdown;
pub use store::{User, Users};

/// Serves the user service on `listener`, registered through the
/// registry, until `shutdown`.
pub async fn run(
    config: &crate::config::Config,
    listener: TcpListener,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let metrics = config.telemetry.metrics();
    let mut db = shop::db::open::<store::Migrator>(&config.user, "user").await?;
    shop::metrics::measure_database(&mut db, &metrics);
    let users = Users::new(db);
    if config.user.seed_data {
        users
            .seed()
            .await
            .map_err(|err| anyhow::anyhow!("cannot load the seed's user: {err}"))?;
    }
    let service = UserServiceServer::new(UserGrpc { users });
    // Its live settings: the log level.
    crate::live::Live::follow(
        config,
        (ShopRole::User, listener.local_addr()?),
        &metrics,
        shutdown.clone(),
    )?;
    shop::serve(
        (config, ShopRole::User),
        &metrics,
        <UserServiceServer<UserGrpc> as tonic::server::NamedService>::NAME,
        listener,
        |routes| routes.add_service(service),
        shutdown,
    )
    .await
}

struct UserGrpc {
    users: Users,
}

#[tonic::async_trait]
impl UserService for UserGrpc {
    async fn get_user(
        &self,
        request: Request<pb::GetUserRequest>,
    ) -> Result<Response<pb::User>, Status> {
        let id = shop::parse_id("id", request.into_inner().id)?;
        let user = self.users.get(id).await?;
        Ok(Response::new(pb::User {
            id: user.id,
            username: user.username,
            phone: user.phone,
            address: user.address,
        }))
    }
}
