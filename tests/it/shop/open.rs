//! Opening a service's database: what a person is told when it cannot be
//! reached.

use shop_mesh::shop::{ServiceConfig, db};

/// A port with no listener: refused at once, said so, and the URL named
/// without its password.
#[tokio::test]
async fn a_refused_database_is_named_with_its_cause() {
    // Bound and closed: nothing listens there now.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    for scheme in ["mysql", "postgres"] {
        let mut config = ServiceConfig::for_role("order", 0);
        let url = format!("{scheme}://shop:secret@127.0.0.1:{port}/shop");
        config.database_url = Some(url);
        let err = db::open::<shop_mesh::order::store::Migrator>(&config, "order")
            .await
            .expect_err("nothing listens there");
        let message = format!("{err:#}");
        assert!(
            message.contains(&format!("{scheme}://shop:***@127.0.0.1:{port}/shop")),
            "{message}"
        );
        assert!(
            message.to_lowercase().contains("connection refused"),
            "{message}"
        );
        assert!(!message.contains("secret"), "{message}");
    }
}
