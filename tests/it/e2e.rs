//! End to end: the real binary as separate processes (a registry, a user,
//! two products and an order service), the seed's walkthrough through the
//! client commands and through grpcurl, a product process killed with
//! SIGKILL under load, and SIGTERM for the rest: each exits 0 having left
//! the registry.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;
use shop_mesh::harness::Process;
use shop_mesh::pb::registry::registry_client::RegistryClient;
use shop_mesh::pb::shop as pb;
use shop_mesh::pb::shop::order_service_client::OrderServiceClient;
use tonic::transport::Channel;

use crate::grpcurl::grpcurl_output;

use crate::{BIN, run_bin, run_bin_with};

/// A shop service on port 0 under `dir`, registered with `registry`
/// with `token`.
async fn service(role: &'static str, registry: &str, dir: &Path, token: &str) -> Process {
    let args = [
        role,
        "--registry",
        registry,
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
    ];
    let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    args.push(dir.join(role).display().to_string());
    let env = [("SHOP_MESH__DISCOVERY__TOKEN", token)];
    Process::start(Path::new(BIN), role, args, &env)
        .await
        .unwrap()
}

/// A token that may register `service`, made as an operator makes one:
/// `shop-mesh token create` with the registry's first admin token.
async fn token_for(service: &str, registry: &str, admin_file: &Path) -> String {
    let admin_file = admin_file.display().to_string();
    let (ok, out, err) = run_bin(&[
        "token",
        "create",
        "--name",
        service,
        "--service",
        service,
        "--token-file",
        &admin_file,
        "--registry",
        registry,
    ])
    .await;
    assert!(ok, "{err}");
    out.trim().to_string()
}

/// The registered addresses of `service`, healthy or not.
async fn registered(registry: &mut RegistryClient<Channel>, service: &str) -> Vec<String> {
    crate::instances(registry, service, false)
        .await
        .iter()
        .map(|i| format!("{}:{}", i.ip, i.port))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seeds_walkthrough_then_a_killed_product_then_a_clean_stop() {
    let dir = tempfile::tempdir().unwrap();
    let registry_args = ["registry", "--listen", "127.0.0.1:0", "--data-dir"];
    let mut registry_args: Vec<String> = registry_args.iter().map(|a| a.to_string()).collect();
    registry_args.push(dir.path().join("registry").display().to_string());
    // Credentials on, as by default, with the reads left open (as a
    // configuration may): every service registers with a token of its
    // own, and the order service proves itself to the product service.
    let open_reads = [("SHOP_MESH__REGISTRY__AUTH__OPEN_READS", "true")];
    let mut registry_process =
        Process::start(Path::new(BIN), "registry", registry_args, &open_reads)
            .await
            .unwrap();
    let registry_addr = registry_process.addr.clone();
    let registry = registry_addr.as_str();
    let admin = dir.path().join("registry").join("admin.token");
    let mut user = service(
        "user",
        registry,
        dir.path(),
        &token_for("server-user", registry, &admin).await,
    )
    .await;
    let product_token = token_for("server-product", registry, &admin).await;
    let mut product_a = service("product", registry, dir.path(), &product_token).await;
    let mut product_b = service("product", registry, dir.path(), &product_token).await;
    let order_token = token_for("server-order", registry, &admin).await;
    let mut order = service("order", registry, dir.path(), &order_token).await;
    let (user_addr, product_a_addr) = (user.addr.clone(), product_a.addr.clone());
    let (product_b_addr, order_addr) = (product_b.addr.clone(), order.addr.clone());

    let mut registry_client = RegistryClient::connect(format!("http://{registry}"))
        .await
        .unwrap();
    for (name, count) in [
        ("server-user", 1),
        ("server-product", 2),
        ("server-order", 1),
    ] {
        crate::wait_until(
            &format!("{count} of {name} registered"),
            Duration::from_secs(30),
            || {
                let mut registry_client = registry_client.clone();
                async move { registered(&mut registry_client, name).await.len() == count }
            },
        )
        .await;
    }

    // The seed's walkthrough, through the client commands.
    let (ok, _, err) = run_bin(&crate::place_order("1001", registry)).await;
    assert!(!ok);
    assert!(
        err.contains("FailedPrecondition: product 1001 has 100 in stock, 1001 requested"),
        "{err}"
    );
    let (ok, out, err) = run_bin(&crate::place_order("10", registry)).await;
    assert!(ok, "{err}");
    let line = out.lines().nth(1).expect("an order line");
    assert!(
        line.contains("1001 binghe") && line.contains("1001 华为") && line.contains("23990.00"),
        "{out}"
    );
    let (ok, out, _) = run_bin(&["product", "get", "1001", "--json", "--registry", registry]).await;
    assert!(ok);
    let product: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(product["stock"], 90);
    let (ok, out, _) = run_bin(&["user", "get", "1001", "--registry", registry]).await;
    assert!(ok);
    assert!(
        out.contains("binghe") && out.contains("13212345678"),
        "{out}"
    );

    // The same, through grpcurl (reflection, no proto files).
    let refused = tokio::task::spawn_blocking({
        let order_addr = order_addr.clone();
        move || {
            grpcurl_output(&[
                "-plaintext",
                "-d",
                r#"{"user_id":1001,"product_id":1001,"count":1001}"#,
                &order_addr,
                "shopmesh.shop.v1.OrderService/PlaceOrder",
            ])
        }
    })
    .await
    .unwrap();
    let mut expected_stock = 90;
    if let Some(refused) = refused {
        let listed = tokio::task::spawn_blocking({
            let order_addr = order_addr.clone();
            move || grpcurl_output(&["-plaintext", &order_addr, "list"]).unwrap()
        })
        .await
        .unwrap();
        let listed = String::from_utf8(listed.stdout).unwrap();
        let services: Vec<&str> = listed.lines().collect();
        assert!(
            services.contains(&"shopmesh.shop.v1.OrderService"),
            "{listed}"
        );
        assert!(services.contains(&"grpc.health.v1.Health"), "{listed}");
        assert!(
            !listed.contains("Registry") && !listed.contains("ProductService"),
            "the order port lists only what it serves: {listed}"
        );
        assert!(!refused.status.success());
        let err = String::from_utf8_lossy(&refused.stderr);
        assert!(err.contains("Code: FailedPrecondition"), "{err}");
        let placed = tokio::task::spawn_blocking({
            let order_addr = order_addr.clone();
            move || {
                grpcurl_output(&[
                    "-plaintext",
                    "-d",
                    r#"{"user_id":1001,"product_id":1001,"count":10,"request_id":"grpcurl-1"}"#,
                    &order_addr,
                    "shopmesh.shop.v1.OrderService/PlaceOrder",
                ])
                .unwrap()
            }
        })
        .await
        .unwrap();
        assert!(placed.status.success());
        let placed: serde_json::Value = serde_json::from_slice(&placed.stdout).unwrap();
        assert_eq!(placed["totalPrice"], "23990.00");
        assert_eq!(placed["items"][0]["productName"], "华为");
        expected_stock -= 10;
    }

    // kill -9 one product under load: no order fails.
    let channel = Channel::from_shared(format!("http://{order_addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let placed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let load = tokio::spawn({
        let orders = OrderServiceClient::new(channel);
        let placed = placed.clone();
        async move {
            let mut failed = Vec::new();
            for i in 0..60 {
                let request = pb::PlaceOrderRequest {
                    user_id: 1001,
                    product_id: 1002,
                    count: 1,
                    request_id: format!("load-{i}"),
                };
                if let Err(status) = orders.clone().place_order(request).await {
                    failed.push(status);
                }
                placed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            failed
        }
    });
    crate::wait_until("20 orders before the kill", Duration::from_secs(30), || {
        let placed = placed.load(std::sync::atomic::Ordering::Relaxed);
        async move { placed >= 20 }
    })
    .await;
    assert_eq!(
        product_a.stop_with(Signal::SIGKILL).await.unwrap(),
        None,
        "killed"
    );
    let failed = load.await.unwrap();
    assert!(
        failed.is_empty(),
        "orders failed after a product was killed: {failed:?}"
    );
    let (ok, out, _) = run_bin(&["product", "list", "--json", "--registry", registry]).await;
    assert!(ok);
    let stocks: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(stocks[0]["stock"], expected_stock);
    assert_eq!(stocks[1]["stock"], 40, "60 of 1002 sold, no more, no fewer");
    let (ok, out, _) = run_bin(&[
        "order",
        "list",
        "--user",
        "1001",
        "--json",
        "--registry",
        registry,
    ])
    .await;
    assert!(ok);
    assert_eq!(
        out.lines().count(),
        60 + 1 + usize::from(expected_stock == 80)
    );

    // SIGTERM: each exits 0, and is gone from the registry at once (a
    // crashed instance would linger, unhealthy, for the delete timeout).
    for (process, service, addr) in [
        (&mut order, "server-order", &order_addr),
        (&mut product_b, "server-product", &product_b_addr),
        (&mut user, "server-user", &user_addr),
    ] {
        assert_eq!(
            process.stop_with(Signal::SIGTERM).await.unwrap(),
            Some(0),
            "{} exit",
            process.role
        );
        let left = registered(&mut registry_client, service).await;
        assert!(
            !left.contains(addr),
            "{service} {addr} still registered: {left:?}"
        );
        process.logged("deregistered").await.unwrap();
    }
    assert_eq!(
        registered(&mut registry_client, "server-product").await,
        vec![product_a_addr.clone()],
        "only the killed product is left, to expire"
    );
    assert_eq!(
        registry_process.stop_with(Signal::SIGTERM).await.unwrap(),
        Some(0)
    );
}

/// `shop-mesh up` as a newcomer runs it (here on port 0 everywhere): it
/// prints what runs where, the printed commands work, and Ctrl-C stops
/// every instance, each deregistering, with exit code 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_runs_everything_and_ctrl_c_stops_it_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["up", "--replicas", "2", "--data-dir"];
    let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    args.push(dir.path().join("data").display().to_string());
    let (mut up, summary) = crate::start_up(args, &[]).await;
    let column = |role: &str| -> Vec<String> {
        summary
            .lines()
            .filter(|line| line.starts_with(&format!("{role} ")))
            .map(|line| line.split_whitespace().nth(2).unwrap().to_string())
            .collect()
    };
    assert_eq!(column("registry").len(), 1, "{summary}");
    assert_eq!(column("user").len(), 2, "{summary}");
    assert_eq!(column("product").len(), 2, "{summary}");
    assert_eq!(column("order").len(), 1, "{summary}");
    assert!(summary.contains("shop-mesh order place --user 1001 --product 1001 --count 10"));
    let registry = column("registry").remove(0);

    // Nacos's clients are told where to point, and find the services
    // there, as shop-mesh's own registrar registered them.
    assert!(
        summary.contains(&format!(
            "Nacos clients: server address {registry} (with a shop-mesh token as the password)"
        )),
        "{summary}"
    );
    let token = std::fs::read_to_string(crate::shell_token(&summary)).unwrap();
    let list = crate::http::send(
        registry.parse().unwrap(),
        "GET",
        &format!(
            "/nacos/v1/ns/instance/list?serviceName=server-product&accessToken={}",
            token.trim()
        ),
        &[],
        None,
    )
    .await
    .json();
    assert_eq!(list["hosts"].as_array().unwrap().len(), 2, "{list}");

    // The console's address and where its password is: logging in with
    // it works.
    let console = summary
        .lines()
        .find_map(|line| line.strip_prefix("The console: "))
        .unwrap_or_else(|| panic!("up names the console: {summary}"));
    assert!(
        console.starts_with(&format!(
            "http://{registry}/ (log in as admin with the password in "
        )),
        "{console}"
    );
    let file = console
        .rsplit_once("the password in ")
        .unwrap()
        .1
        .trim_end_matches(").");
    let password = std::fs::read_to_string(file).unwrap();
    crate::console::login(registry.parse().unwrap(), password.trim()).await;

    // The registry checks credentials: without the token up made for the
    // shell, the commands are refused, saying why.
    let (ok, _, err) = run_bin(&["product", "get", "1001", "--registry", &registry]).await;
    assert!(!ok);
    assert!(
        err.contains("the registry refused to say: this registry needs a token"),
        "{err}"
    );
    let reader = [(
        "SHOP_MESH__DISCOVERY__TOKEN_FILE",
        crate::shell_token(&summary),
    )];

    let (ok, out, err) = run_bin_with(&crate::place_order("10", &registry), &reader).await;
    assert!(ok, "{err}");
    assert!(out.contains("23990.00"), "{out}");
    let (ok, out, _) = run_bin_with(
        &["product", "get", "1001", "--json", "--registry", &registry],
        &reader,
    )
    .await;
    assert!(ok);
    assert!(out.contains(r#""stock":90"#), "{out}");
    let (ok, out, _) = run_bin_with(
        &[
            "instances",
            "server-product",
            "--json",
            "--registry",
            &registry,
        ],
        &reader,
    )
    .await;
    assert!(ok);
    assert_eq!(out.lines().count(), 2, "{out}");

    assert_eq!(up.stop_with(Signal::SIGINT).await.unwrap(), Some(0));
    let deregistered = up.count_logged("deregistered");
    assert_eq!(deregistered, 5, "every instance left the registry");
}

/// No secret reaches a log: `up` over mutual TLS at debug level, an order
/// placed (so identities are made and shown), tokens made and a forged one
/// refused; then every token, the identity key, the TLS keys and any
/// identity are looked for in everything the processes said.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_a_log_of_a_full_run() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let args = ["up", "--tls", "--verbose", "--data-dir"];
    let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    args.push(data.display().to_string());
    let (mut up, summary) = crate::start_up(args, &[("RUST_LOG", "debug")]).await;
    let registry = summary
        .lines()
        .find(|line| line.starts_with("registry "))
        .and_then(|line| line.split_whitespace().nth(2))
        .expect("the registry's address")
        .to_string();
    let tls = data.join("tls");
    let file = |path: std::path::PathBuf| path.display().to_string();
    let reader = file(data.join("cli.token"));
    // The shell as up's summary sets it: the read token, and mutual TLS.
    let tls_env = shop_mesh::cert::Made::in_dir(&tls).settings().env();
    let mut shell = vec![
        ("RUST_LOG", "debug"),
        ("SHOP_MESH__DISCOVERY__TOKEN_FILE", reader.as_str()),
    ];
    shell.extend(tls_env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let mut said = Vec::new();
    let place = crate::place_order("2", &registry);
    let (ok, out, err) = run_bin_with(&place, &shell).await;
    assert!(ok, "{err}");
    said.extend([out, err]);
    let admin = file(data.join("registry").join("admin.token"));
    let create = [
        "token",
        "create",
        "--name",
        "ops",
        "--read",
        "public",
        "--token-file",
        &admin,
        "--registry",
        &registry,
    ];
    let (ok, made, err) = run_bin_with(&create, &shell).await;
    assert!(ok, "{err}");
    // The token is printed once, by design, on the command's own stdout.
    said.push(err);
    let forged = format!("smt_{:016x}_{}", 7u64, "ab".repeat(32));
    let mut forging = shell.clone();
    forging[1] = ("SHOP_MESH__DISCOVERY__TOKEN", forged.as_str());
    let (ok, out, err) = run_bin_with(&["services", "--registry", &registry], &forging).await;
    assert!(!ok, "a forged token was taken: {out}");
    assert!(err.contains("unknown or revoked"), "{err}");
    said.extend([out, err]);
    assert_eq!(up.stop_with(Signal::SIGINT).await.unwrap(), Some(0));
    said.push(up.said());
    let said = said.join("\n");

    let read = |path: std::path::PathBuf| std::fs::read_to_string(path).unwrap();
    let mut secrets: Vec<(String, String)> = vec![("made".into(), made), ("forged".into(), forged)];
    for path in [
        data.join("registry").join("admin.token"),
        data.join("cli.token"),
        data.join("user").join("registry.token"),
        data.join("product").join("registry.token"),
        data.join("order").join("registry.token"),
    ] {
        secrets.push((path.display().to_string(), read(path)));
    }
    // What was looked through is the run: the log names the admin token
    // it made, by its id, and the order placed.
    let admin_id = secrets[2].1.trim().split('_').nth(1).unwrap().to_string();
    assert!(
        said.contains(&admin_id),
        "the log names the admin token's id"
    );
    assert!(said.lines().count() > 100, "a debug log of the run");
    for (name, token) in &secrets {
        // The part after the id: the secret itself.
        let secret = token.trim().rsplit('_').next().unwrap();
        assert_eq!(secret.len(), 64, "{name}");
        assert!(!said.contains(secret), "the secret of {name} is in a log");
    }
    for path in [
        data.join("registry").join("identity.key"),
        tls.join("node.key"),
        tls.join("ca.key"),
    ] {
        let key = read(path.clone());
        let body: String = key.lines().filter(|l| !l.starts_with("-----")).collect();
        assert!(!body.is_empty());
        for line in key
            .lines()
            .filter(|l| l.len() > 20 && !l.starts_with("-----"))
        {
            assert!(!said.contains(line), "{} is in a log", path.display());
        }
    }
    assert!(!said.contains("smi_"), "an identity is in a log");
}
