//! The console in a real browser: headless Chromium driven over WebDriver
//! (chromedriver) against a registry, shop roles and a product process
//! started here. Logging in with the handed-out password and back to the
//! page asked for, instances appearing, turning unhealthy and going while
//! the page is open, an instance taken offline and given a weight from the
//! page and the orders following, a refused change, logging out; and each
//! page as it shows a registry, saved as a screenshot when
//! SHOP_MESH_SCREENSHOTS names a directory (docs/console/ has them).
//!
//! They are the second tier (`cargo test --test it browser -- --ignored`,
//! which `.ci/run` runs after `cargo test`), so the first stays within its
//! few minutes. Without chromium and chromium-driver installed each test
//! prints `SKIPPED:` and passes, unless CI is set.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use fantoccini::elements::Element;
use fantoccini::key::Key;
use fantoccini::{Client, ClientBuilder, Locator};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use sea_orm::EntityTrait;
use serde::Deserialize;
use serde_json::{Value, json};
use shop_mesh::config::Config;
use shop_mesh::discovery::{BalancedChannel, Mesh};
use shop_mesh::harness::Process;
use shop_mesh::pb::registry as rpb;
use shop_mesh::pb::shop as pb;
use shop_mesh::pb::shop::order_service_client::OrderServiceClient;
use shop_mesh::product::store::product;
use shop_mesh::registry::console::INITIAL_PASSWORD_FILE;
use shop_mesh::roles::{ShopRole, Spawned};
use shop_mesh::shop::{ORDER_SERVICE, PRODUCT_SERVICE, ServiceConfig, USER_SERVICE};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::TestRegistry;
use crate::console::{initial_password, login};
use crate::http::send;

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// How long a page may take to show what is waited for.
const PATIENCE: Duration = Duration::from_secs(10);

/// Headless, as root, with nothing fetched from the network.
const CHROMIUM_FLAGS: [&str; 10] = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,800",
];

/// One Chromium session over a chromedriver of its own, on a console at
/// `base`. Dropping it kills chromedriver and the browser it started.
struct Browser {
    client: Client,
    base: String,
    driver: tokio::process::Child,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// A fresh browser (a new profile: no cookies) on the console of the
    /// registry at `addr`; None, after a `SKIPPED:` line, when Chromium or
    /// chromedriver is not installed and CI is not set.
    async fn open(test: &str, addr: SocketAddr) -> Option<Browser> {
        if !(Path::new(CHROMIUM).exists() && Path::new(CHROMEDRIVER).exists()) {
            let why = "chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)";
            assert!(
                std::env::var_os("CI").is_none(),
                "{test}: {why}, and CI is set"
            );
            crate::skipped(&format!("{test}: {why}"));
            return None;
        }
        // Its own process group, so that the browser it starts goes with it.
        let mut driver = tokio::process::Command::new(CHROMEDRIVER)
            .arg("--port=0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .expect("start chromedriver");
        let mut lines = BufReader::new(driver.stdout.take().expect("piped")).lines();
        let port = tokio::time::timeout(PATIENCE, async {
            while let Some(line) = lines.next_line().await.expect("chromedriver's output") {
                if let Some(port) = bound_port(&line) {
                    return port;
                }
            }
            panic!("chromedriver ended without saying its port")
        })
        .await
        .expect("chromedriver says its port");
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let webdriver = SocketAddr::from(([127, 0, 0, 1], port));
        crate::wait_until("chromedriver to answer", PATIENCE, || async move {
            tokio::net::TcpStream::connect(webdriver).await.is_ok()
        })
        .await;

        let profile = tempfile::tempdir().expect("temp dir");
        let mut args: Vec<String> = CHROMIUM_FLAGS.iter().map(|f| f.to_string()).collect();
        args.push(format!("--user-data-dir={}", profile.path().display()));
        let capabilities = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": CHROMIUM, "args": args},
        });
        let Value::Object(capabilities) = capabilities else {
            unreachable!()
        };
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = ClientBuilder::new(connector)
            .capabilities(capabilities)
            .connect(&format!("http://{webdriver}"))
            .await
            .expect("a Chromium session");
        Some(Browser {
            client,
            base: format!("http://{addr}"),
            driver,
            _profile: profile,
        })
    }

    /// Kills chromedriver and the browser, and waits for chromedriver to
    /// exit. (Ending the session first would make the browser quit
    /// politely, which takes it seconds; nothing of it is kept.)
    async fn close(mut self) {
        self.kill();
        let _ = tokio::time::timeout(PATIENCE, self.driver.wait()).await;
    }

    /// Kills chromedriver's process group: chromedriver and the browser.
    fn kill(&self) {
        if let Some(pid) = self.driver.id() {
            let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
    }

    async fn goto(&self, path: &str) {
        self.client
            .goto(&format!("{}{path}", self.base))
            .await
            .unwrap_or_else(|err| panic!("open {path}: {err}"));
    }

    /// The path and query of the page shown.
    async fn at(&self) -> String {
        let url = self.client.current_url().await.expect("the current URL");
        match url.query() {
            Some(query) => format!("{}?{query}", url.path()),
            None => url.path().to_string(),
        }
    }

    /// Waits until the page shown is `path` (with its query).
    async fn lands_on(&self, path: &str) {
        crate::wait_until(
            &format!("the browser to be at {path}"),
            PATIENCE,
            || async { self.at().await == path },
        )
        .await;
    }

    /// The element `css` selects, once there is one.
    async fn find(&self, css: &str) -> Element {
        self.client
            .wait()
            .at_most(PATIENCE)
            .every(Duration::from_millis(50))
            .for_element(Locator::Css(css))
            .await
            .unwrap_or_else(|err| panic!("no {css} within {PATIENCE:?}: {err}"))
    }

    /// The text of the element `css` selects, once there is one.
    async fn text(&self, css: &str) -> String {
        self.find(css).await.text().await.expect("its text")
    }

    /// What `script` (a function body; `arguments` are `args`) returns.
    async fn js<T: serde::de::DeserializeOwned>(&self, script: &str, args: Vec<Value>) -> T {
        let answer = self
            .client
            .execute(script, args)
            .await
            .unwrap_or_else(|err| panic!("script {script:?}: {err}"));
        serde_json::from_value(answer).expect("the script's answer")
    }

    /// Waits `within` for `script` to return true.
    async fn until(&self, what: &str, within: Duration, script: &str, args: Vec<Value>) {
        crate::wait_until(what, within, || {
            let args = args.clone();
            async move { self.js::<bool>(script, args).await }
        })
        .await;
    }

    /// Types `text` over what `input` holds, as a person would.
    async fn type_over(&self, input: &Element, text: &str) {
        let keys = format!("{}{}{text}", Key::Control + "a", Key::Null);
        input.send_keys(&keys).await.expect("typing");
        assert_eq!(
            input.prop("value").await.expect("its value").as_deref(),
            Some(text)
        );
    }

    /// Signs in on the login form shown.
    async fn sign_in(&self, password: &str) {
        let field = self.find("#login-password").await;
        field.clear().await.expect("clear the password");
        field.send_keys(password).await.expect("type the password");
        self.find("#login-submit")
            .await
            .click()
            .await
            .expect("submit");
    }

    /// The row of the instance at `addr` on a service page, if shown.
    async fn row(&self, addr: &str) -> Option<Row> {
        self.js(
            "const tr = document.querySelector(`#instances tr[data-instance=\"${arguments[0]}\"]`);
             return tr && {
               healthy: tr.dataset.healthy, enabled: tr.dataset.enabled,
               classes: tr.className, weight: tr.querySelector('td.weight').textContent,
               lease: tr.querySelector('td.lease').dataset.lease,
               metadata: [...tr.querySelectorAll('td.metadata span.chip')].map((c) => c.textContent),
             };",
            vec![json!(addr)],
        )
        .await
    }

    /// Clicks `button` (a selector inside the row) on the row of `addr`.
    async fn click_in_row(&self, addr: &str, button: &str) {
        self.find(&format!("#instances tr[data-instance=\"{addr}\"] {button}"))
            .await
            .click()
            .await
            .unwrap_or_else(|err| panic!("click {button} of {addr}: {err}"));
    }

    /// The message shown in #flash, once it shows one of `kind`.
    async fn flash(&self, kind: &str) -> String {
        self.text(&format!("#flash.{kind}:not([hidden])")).await
    }

    /// Waits until #flash shows `text` as a message of `kind`.
    async fn flash_says(&self, kind: &str, text: &str) {
        self.until(
            &format!("the page to say {text:?} ({kind})"),
            PATIENCE,
            "const f = document.querySelector('#flash');
             return !f.hidden && f.classList.contains(arguments[0]) && f.textContent === arguments[1];",
            vec![json!(kind), json!(text)],
        )
        .await;
    }

    /// Saves the page as `name` in SHOP_MESH_SCREENSHOTS, when set.
    async fn screenshot(&self, name: &str) {
        let Some(dir) = std::env::var_os("SHOP_MESH_SCREENSHOTS") else {
            return;
        };
        let png = self.client.screenshot().await.expect("a screenshot");
        std::fs::create_dir_all(&dir).expect("the screenshots' directory");
        std::fs::write(Path::new(&dir).join(name), png).expect("save the screenshot");
    }
}

impl Drop for Browser {
    /// Kills chromedriver's process group: chromedriver and the browser,
    /// also when the test failed before it could close the session.
    fn drop(&mut self) {
        self.kill();
    }
}

/// The port in chromedriver's "ChromeDriver was started successfully on
/// port N." line.
fn bound_port(line: &str) -> Option<u16> {
    let (_, rest) = line.split_once("started successfully on port ")?;
    rest.trim().trim_end_matches('.').parse().ok()
}

/// An instance's row as the service page shows it.
#[derive(Debug, Deserialize)]
struct Row {
    healthy: String,
    enabled: String,
    classes: String,
    weight: String,
    lease: String,
    metadata: Vec<String>,
}

impl Row {
    fn unhealthy(&self) -> bool {
        self.healthy == "false" && self.classes.split(' ').any(|c| c == "unhealthy")
    }

    fn offline(&self) -> bool {
        self.enabled == "false" && self.classes.split(' ').any(|c| c == "offline")
    }
}

/// `service` at 127.0.0.1:`port` with `metadata`.
fn instance(service: &str, port: u32, metadata: &[(&str, &str)]) -> rpb::Instance {
    rpb::Instance {
        metadata: metadata
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..crate::instance(service, port)
    }
}

/// Registers `instances` on one lease and keeps it alive until the task
/// is aborted or the test ends.
async fn keep_registered(
    registry: &TestRegistry,
    instances: Vec<rpb::Instance>,
) -> tokio::task::JoinHandle<()> {
    let mut client = registry.client().await;
    let mut lease = 0;
    for instance in instances {
        lease = crate::register_as(&mut client, instance, lease, None)
            .await
            .expect("register")
            .lease_id;
    }
    let (beats, answers) = crate::keep_alive(&mut client, lease).await;
    crate::keep_beating(beats, answers, lease)
}

/// `/services/{service}` in the default namespace and group, as the
/// console links it.
fn service_page(service: &str) -> String {
    format!("/services/{service}?namespace=public&group=DEFAULT_GROUP")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the browser tier: cargo test --test it browser -- --ignored"]
async fn logging_in_takes_the_handed_out_password_and_returns_to_the_page_asked_for() {
    let registry = TestRegistry::start().await;
    let _product = keep_registered(&registry, vec![crate::instance(PRODUCT_SERVICE, 8070)]).await;
    let Some(browser) = Browser::open(
        "browser::logging_in_takes_the_handed_out_password_and_returns_to_the_page_asked_for",
        registry.addr,
    )
    .await
    else {
        return;
    };
    let password = initial_password(&registry.config.data_dir).await;

    // A page opened without a session leads to the login, remembering it.
    browser.goto("/services/server-product").await;
    browser
        .lands_on("/login?next=/services/server-product")
        .await;
    let user = browser.find("#login-username").await;
    assert_eq!(user.prop("value").await.unwrap().as_deref(), Some("admin"));
    browser.screenshot("login.png").await;

    // A wrong password is refused on the form, which stays.
    browser.sign_in("not-the-password").await;
    assert_eq!(
        browser.text("#login-error.error:not([hidden])").await,
        "wrong user or password"
    );
    assert_eq!(browser.at().await, "/login?next=/services/server-product");
    assert!(
        browser
            .find("#nav")
            .await
            .attr("hidden")
            .await
            .unwrap()
            .is_some()
    );

    // The password handed out opens the page first asked for.
    browser.sign_in(&password).await;
    browser.lands_on("/services/server-product").await;
    assert_eq!(browser.text("#service-name").await, PRODUCT_SERVICE);
    browser
        .find("#instances tr[data-instance=\"127.0.0.1:8070\"]")
        .await;
    assert_eq!(browser.text("#user").await, "admin");
    assert_eq!(
        browser.text("#nav a.active").await,
        "Services",
        "the service's page is under Services"
    );
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the browser tier: cargo test --test it browser -- --ignored"]
async fn a_started_instance_appears_live_and_a_killed_one_turns_unhealthy_then_goes() {
    let (heartbeat, delete_timeout) = (Duration::from_millis(500), Duration::from_secs(3));
    let registry = TestRegistry::start_with(|config| {
        config.heartbeat_interval = heartbeat;
        config.min_heartbeat_interval = Duration::from_millis(100);
        config.unhealthy_timeout = Duration::from_secs(2);
        config.delete_timeout = delete_timeout;
    })
    .await;
    let Some(browser) = Browser::open(
        "browser::a_started_instance_appears_live_and_a_killed_one_turns_unhealthy_then_goes",
        registry.addr,
    )
    .await
    else {
        return;
    };
    let password = initial_password(&registry.config.data_dir).await;
    browser.goto(&service_page(PRODUCT_SERVICE)).await;
    browser.sign_in(&password).await;
    browser.lands_on(&service_page(PRODUCT_SERVICE)).await;

    // Nothing registered yet: the page says so, once, and follows.
    let waiting = browser.text("#not-found:not([hidden])").await;
    assert_eq!(
        waiting,
        "service public/DEFAULT_GROUP/server-product is not registered. \
         This page shows the service as soon as it is registered."
    );
    browser.find("#live.on").await;
    assert!(
        browser
            .js::<bool>("return document.querySelector('#flash').hidden;", vec![])
            .await,
        "no error besides the page's own words"
    );
    // Set on this document: still there later means the page was not
    // loaded again.
    browser
        .js::<Value>("window.openedOnce = true; return null;", vec![])
        .await;

    // The service is registered: the page shows it.
    let _kept = keep_registered(&registry, vec![crate::instance(PRODUCT_SERVICE, 8070)]).await;
    crate::wait_until("the service to show", PATIENCE, || async {
        browser.row("127.0.0.1:8070").await.is_some()
    })
    .await;
    browser.find("#service-body:not([hidden])").await;
    browser.find("#not-found[hidden]").await;

    // A product process starts: its row appears on the open page.
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "product",
        "--registry",
        &registry.addr.to_string(),
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        &dir.path().display().to_string(),
    ]
    .map(String::from)
    .to_vec();
    let mut process = Process::start(Path::new(crate::BIN), "product", args, &[])
        .await
        .expect("a product process");
    let addr = process.addr.clone();
    crate::wait_until("its row to appear", PATIENCE, || async {
        browser.row(&addr).await.is_some()
    })
    .await;
    let row = browser.row(&addr).await.unwrap();
    assert!(
        row.healthy == "true" && row.lease == "alive" && !row.unhealthy(),
        "{row:?}"
    );
    assert!(
        browser
            .js::<bool>("return window.openedOnce === true;", vec![])
            .await,
        "the row came without a reload"
    );

    // Killed for real: its KeepAlive stream breaks, the row turns
    // unhealthy at once, and goes with the delete timeout.
    let killed = tokio::time::Instant::now();
    process.kill().await.expect("SIGKILL");
    crate::wait_until(
        "its row to turn unhealthy",
        Duration::from_secs(2),
        || async {
            browser
                .row(&addr)
                .await
                .is_some_and(|row| row.unhealthy() && row.lease == "orphaned")
        },
    )
    .await;
    crate::wait_until("its row to go", delete_timeout + PATIENCE, || async {
        browser.row(&addr).await.is_none()
    })
    .await;
    // Its last beat was a heartbeat or so before the kill.
    assert!(
        killed.elapsed() >= delete_timeout - 2 * heartbeat,
        "removed {:?} after the kill, before the delete timeout",
        killed.elapsed()
    );
    let kept = browser.row("127.0.0.1:8070").await.expect("the other row");
    assert!(!kept.unhealthy(), "{kept:?}");
    assert!(
        browser
            .js::<bool>("return window.openedOnce === true;", vec![])
            .await
    );
    browser.close().await;
}

/// A registry, a user, an order service and two product instances, each
/// product with a database of its own.
struct Shop {
    registry: TestRegistry,
    mesh: Mesh,
    products: [(SocketAddr, String); 2],
    _roles: Vec<Spawned>,
    _dir: tempfile::TempDir,
}

impl Shop {
    async fn start() -> Shop {
        let registry = TestRegistry::start().await;
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::default();
        config.discovery.registry = registry.addr.to_string();
        let service = |name: &str| {
            let mut service = ServiceConfig::for_role(name, 0);
            service.listen = "127.0.0.1:0".parse().unwrap();
            service.data_dir = dir.path().join(name);
            service
        };
        config.user = service("user");
        config.order = service("order");
        let mut roles = Vec::new();
        let mut products = Vec::new();
        for name in ["product-a", "product-b"] {
            let mut own = config.clone();
            own.product = service(name);
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let role = Spawned::shop(ShopRole::Product, &own, listener).unwrap();
            products.push((role.addr, shop_mesh::shop::db::url(&own.product, "product")));
            roles.push(role);
        }
        for role in [ShopRole::User, ShopRole::Order] {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            roles.push(Spawned::shop(role, &config, listener).unwrap());
        }
        let mesh = Mesh::new(&config.discovery, &config.connections).expect("mesh");
        for (service, count) in [(USER_SERVICE, 1), (PRODUCT_SERVICE, 2), (ORDER_SERVICE, 1)] {
            let channel = mesh.channel(service);
            let ready = channel.wait_for(move |endpoints| endpoints.len() == count);
            tokio::time::timeout(Duration::from_secs(30), ready)
                .await
                .unwrap_or_else(|_| panic!("{service} never had {count} instances"));
        }
        Shop {
            registry,
            mesh,
            products: products.try_into().unwrap(),
            _roles: roles,
            _dir: dir,
        }
    }

    /// The product instances a caller's balanced channel sends calls to,
    /// with their weights: what the order service's channel sees too, from
    /// the same registry's watch.
    fn product_endpoints(&self) -> Vec<(SocketAddr, f64)> {
        let channel: BalancedChannel = self.mesh.channel(PRODUCT_SERVICE);
        channel.endpoints()
    }

    /// Places `n` orders of one of product 1001, one after the other.
    async fn place_orders(&self, n: usize) {
        let mut orders = OrderServiceClient::new(self.mesh.channel(ORDER_SERVICE));
        for _ in 0..n {
            orders
                .place_order(pb::PlaceOrderRequest {
                    user_id: 1001,
                    product_id: 1001,
                    count: 1,
                    request_id: String::new(),
                })
                .await
                .expect("an order of one");
        }
    }

    /// Product 1001's stock in each product instance's database.
    async fn stocks(&self) -> [i32; 2] {
        let mut stocks = [0; 2];
        for (stock, (_, url)) in stocks.iter_mut().zip(&self.products) {
            let db = shop_mesh::shop::db::connect(url, 1)
                .await
                .unwrap_or_else(|err| panic!("connect to {url}: {err}"));
            *stock = product::Entity::find_by_id(1001)
                .one(&db)
                .await
                .expect("read product 1001")
                .expect("product 1001 exists")
                .stock;
            db.close().await.expect("close");
        }
        stocks
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the browser tier: cargo test --test it browser -- --ignored"]
async fn offline_from_the_page_stops_orders_reaching_an_instance_and_a_weight_moves_its_share() {
    let shop = Shop::start().await;
    let Some(browser) = Browser::open(
        "browser::offline_from_the_page_stops_orders_reaching_an_instance_and_a_weight_moves_its_share",
        shop.registry.addr,
    )
    .await
    else {
        return;
    };
    let password = initial_password(&shop.registry.config.data_dir).await;
    let [(a, _), (b, _)] = &shop.products;
    let (a_row, b_row) = (a.to_string(), b.to_string());
    browser.goto(&service_page(PRODUCT_SERVICE)).await;
    browser.sign_in(&password).await;
    for addr in [&a_row, &b_row] {
        browser
            .find(&format!("#instances tr[data-instance=\"{addr}\"]"))
            .await;
    }
    assert_eq!(shop.stocks().await, [100, 100]);

    // Offline from the page: the balanced channels drop it, and orders
    // reach only the other instance.
    browser.click_in_row(&a_row, "button.toggle.offline").await;
    browser
        .flash_says("ok", &format!("{a_row} is now offline."))
        .await;
    crate::wait_until("the row to show offline", PATIENCE, || async {
        browser.row(&a_row).await.is_some_and(|row| row.offline())
    })
    .await;
    browser
        .find(&format!(
            "#instances tr[data-instance=\"{a_row}\"] button.toggle.online"
        ))
        .await;
    crate::wait_until("callers to drop the instance", PATIENCE, || async {
        shop.product_endpoints() == [(*b, 1.0)]
    })
    .await;
    shop.place_orders(20).await;
    assert_eq!(shop.stocks().await, [100, 80], "only {b_row} took orders");

    // Back online with three times the other's weight: it takes the larger
    // share of the orders.
    browser.click_in_row(&a_row, "button.toggle.online").await;
    browser
        .flash_says("ok", &format!("{a_row} is now online."))
        .await;
    crate::wait_until("the row to show online", PATIENCE, || async {
        browser
            .row(&a_row)
            .await
            .is_some_and(|row| row.enabled == "true" && !row.offline())
    })
    .await;
    let weight = browser
        .find(&format!(
            "#instances tr[data-instance=\"{a_row}\"] input.weight"
        ))
        .await;
    browser.type_over(&weight, "3").await;
    browser.click_in_row(&a_row, "button.set-weight").await;
    browser
        .flash_says("ok", &format!("Weight of {a_row} set to 3."))
        .await;
    crate::wait_until("the row to show weight 3", PATIENCE, || async {
        browser
            .row(&a_row)
            .await
            .is_some_and(|row| row.weight == "3")
    })
    .await;
    crate::wait_until("callers to weigh it 3", PATIENCE, || async {
        let endpoints = shop.product_endpoints();
        endpoints.len() == 2 && endpoints.contains(&(*a, 3.0)) && endpoints.contains(&(*b, 1.0))
    })
    .await;
    shop.place_orders(80).await;
    let [a_stock, b_stock] = shop.stocks().await;
    let (to_a, to_b) = (100 - a_stock, 80 - b_stock);
    assert_eq!(to_a + to_b, 80);
    assert!(
        to_a > to_b,
        "weight 3 took {to_a} of 80 orders, weight 1 took {to_b}"
    );
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the browser tier: cargo test --test it browser -- --ignored"]
async fn a_refused_weight_shows_the_registrys_message_and_changes_nothing() {
    let registry = TestRegistry::start().await;
    let _kept = keep_registered(&registry, vec![crate::instance(PRODUCT_SERVICE, 8070)]).await;
    let Some(browser) = Browser::open(
        "browser::a_refused_weight_shows_the_registrys_message_and_changes_nothing",
        registry.addr,
    )
    .await
    else {
        return;
    };
    let password = initial_password(&registry.config.data_dir).await;
    browser.goto(&service_page(PRODUCT_SERVICE)).await;
    browser.sign_in(&password).await;
    let addr = "127.0.0.1:8070";
    let weight = browser
        .find(&format!(
            "#instances tr[data-instance=\"{addr}\"] input.weight"
        ))
        .await;
    browser.type_over(&weight, "-1").await;
    browser.click_in_row(addr, "button.set-weight").await;
    let shown = browser.flash("error").await;

    // The words are the registry's: the same change through its JSON API
    // is refused with them.
    let session = login(registry.addr, &password).await;
    let path = format!(
        "/api/v1/services/{PRODUCT_SERVICE}/instances/127.0.0.1/8070?namespace=public&group=DEFAULT_GROUP&cluster=DEFAULT"
    );
    let refused = session
        .call(registry.addr, "PATCH", &path, Some(r#"{"weight": -1}"#))
        .await;
    assert_eq!(refused.status, 400, "{}", refused.body);
    assert_eq!(shown, refused.json()["message"].as_str().unwrap());
    assert!(shown.contains("weight"), "{shown}");

    // Nothing changed: the row and the registry say weight 1.
    let service = session
        .call(
            registry.addr,
            "GET",
            &format!("/api/v1/services/{PRODUCT_SERVICE}"),
            None,
        )
        .await;
    assert_eq!(service.json()["instances"][0]["weight"], 1.0);
    assert_eq!(browser.row(addr).await.unwrap().weight, "1");
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the browser tier: cargo test --test it browser -- --ignored"]
async fn logging_out_sends_the_next_page_to_the_login() {
    let registry = TestRegistry::start().await;
    let Some(browser) = Browser::open(
        "browser::logging_out_sends_the_next_page_to_the_login",
        registry.addr,
    )
    .await
    else {
        return;
    };
    let password = initial_password(&registry.config.data_dir).await;
    browser.goto("/services").await;
    browser.lands_on("/login?next=/services").await;
    browser.sign_in(&password).await;
    browser.find("#services").await;
    let cookie = browser
        .client
        .get_named_cookie("shop_mesh_session")
        .await
        .expect("a session cookie");
    let cookie = format!("shop_mesh_session={}", cookie.value());

    browser.find("#logout").await.click().await.expect("logout");
    browser.lands_on("/login").await;
    browser.goto("/services").await;
    browser.lands_on("/login?next=/services").await;
    // The session ended in the registry, not only in the browser.
    let old = send(
        registry.addr,
        "GET",
        "/api/v1/console/session",
        &[("Cookie", &cookie)],
        None,
    )
    .await;
    assert_eq!(old.status, 401, "{}", old.body);
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the browser tier: cargo test --test it browser -- --ignored"]
async fn the_password_is_changed_from_the_console_and_the_handed_out_one_stops_working() {
    let registry = TestRegistry::start().await;
    let Some(browser) = Browser::open(
        "browser::the_password_is_changed_from_the_console_and_the_handed_out_one_stops_working",
        registry.addr,
    )
    .await
    else {
        return;
    };
    let dir = &registry.config.data_dir;
    let first = initial_password(dir).await;
    browser.goto("/services").await;
    browser.lands_on("/login?next=/services").await;
    browser.sign_in(&first).await;
    browser.find("#services").await;
    // The user's name in the top bar leads to the account page.
    browser
        .find("#user")
        .await
        .click()
        .await
        .expect("to the account");
    browser.lands_on("/account").await;

    let fill = async |current: &str, new: &str, again: &str| {
        for (field, text) in [
            ("#password-current", current),
            ("#password-new", new),
            ("#password-confirm", again),
        ] {
            browser.type_over(&browser.find(field).await, text).await;
        }
        browser
            .find("#password-change")
            .await
            .click()
            .await
            .expect("submit");
    };
    fill(
        "not-the-password",
        "a-long-new-password",
        "a-long-new-password",
    )
    .await;
    browser
        .flash_says(
            "error",
            "the current password is not right; nothing was changed",
        )
        .await;
    fill(&first, "too-short", "too-short").await;
    browser
        .until(
            "the page to say the new password is too short",
            PATIENCE,
            "const f = document.querySelector('#flash');
             return !f.hidden && f.classList.contains('error')
               && f.textContent.includes('at least 12 characters');",
            vec![],
        )
        .await;
    assert!(dir.join(INITIAL_PASSWORD_FILE).exists(), "nothing changed");
    fill(&first, "a-long-new-password", "a-long-new-password").await;
    browser
        .flash_says(
            "ok",
            "The password was changed; every other session was ended.",
        )
        .await;
    assert!(!dir.join(INITIAL_PASSWORD_FILE).exists());

    // This session goes on; the next login takes only the new password.
    browser.find("#logout").await.click().await.expect("logout");
    browser.lands_on("/login").await;
    browser.sign_in(&first).await;
    browser
        .until(
            "the login to refuse the handed-out password",
            PATIENCE,
            "const e = document.querySelector('#login-error');
             return !e.hidden && e.textContent === 'wrong user or password';",
            vec![],
        )
        .await;
    browser.sign_in("a-long-new-password").await;
    browser.find("#services").await;
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the browser tier: cargo test --test it browser -- --ignored"]
async fn each_page_shows_the_registry_as_it_is() {
    let registry = TestRegistry::start().await;
    let release = [("version", "1.4.2")];
    let mut heavy = instance(
        PRODUCT_SERVICE,
        8070,
        &[("version", "1.4.2"), ("zone", "zone-a")],
    );
    heavy.weight = Some(2.0);
    let _kept = keep_registered(
        &registry,
        vec![
            instance(USER_SERVICE, 8060, &release),
            instance(ORDER_SERVICE, 8080, &release),
            instance(ORDER_SERVICE, 8081, &release),
            heavy,
            instance(
                PRODUCT_SERVICE,
                8071,
                &[("version", "1.4.2"), ("zone", "zone-b")],
            ),
            instance(
                PRODUCT_SERVICE,
                8072,
                &[
                    ("version", "1.5.0-rc1"),
                    ("zone", "zone-b"),
                    ("canary", "true"),
                ],
            ),
        ],
    )
    .await;
    let mut client = registry.client().await;
    // A product whose KeepAlive stream broke: unhealthy, kept a while.
    let died = rpb::Instance {
        delete_timeout_ms: Some(600_000),
        ..instance(
            PRODUCT_SERVICE,
            8073,
            &[("version", "1.4.2"), ("zone", "zone-c")],
        )
    };
    let lease = crate::register(&mut client, died).await.lease_id;
    drop(crate::keep_alive(&mut client, lease).await);
    crate::wait_until(
        "the broken lease's instance to be unhealthy",
        PATIENCE,
        || {
            let mut client = client.clone();
            async move {
                crate::instances(&mut client, PRODUCT_SERVICE, false)
                    .await
                    .iter()
                    .any(|i| i.port == 8073 && !i.healthy)
            }
        },
    )
    .await;
    // The canary taken out of traffic, and a protection threshold.
    client
        .update_instance(rpb::UpdateInstanceRequest {
            service: PRODUCT_SERVICE.into(),
            ip: "127.0.0.1".into(),
            port: 8072,
            enabled: Some(false),
            ..Default::default()
        })
        .await
        .expect("offline");
    client
        .update_service(rpb::UpdateServiceRequest {
            service: PRODUCT_SERVICE.into(),
            protect_threshold: 0.5,
            ..Default::default()
        })
        .await
        .expect("a threshold");
    // A user instance that came and went.
    crate::register(&mut client, crate::instance(USER_SERVICE, 8061)).await;
    crate::deregister(&mut client, USER_SERVICE, 8061)
        .await
        .expect("deregister");
    // Who follows the products: a watch of the service and one of its group.
    let mut watchers = Vec::new();
    for service in [PRODUCT_SERVICE, ""] {
        let mut stream = client
            .watch(rpb::WatchRequest {
                service: service.into(),
                ..Default::default()
            })
            .await
            .expect("watch")
            .into_inner();
        watchers.push(tokio::spawn(async move {
            while let Ok(Some(_)) = stream.message().await {}
        }));
    }

    let Some(browser) = Browser::open(
        "browser::each_page_shows_the_registry_as_it_is",
        registry.addr,
    )
    .await
    else {
        return;
    };
    let password = initial_password(&registry.config.data_dir).await;
    browser.goto("/services").await;
    browser.sign_in(&password).await;

    // The services, the products degraded: one of four is unhealthy.
    browser.find("#services tr[data-service]").await;
    let services: Vec<String> = browser
        .js(
            "return [...document.querySelectorAll('#services tr[data-service]')].map((tr) =>
               `${tr.dataset.service}: ${tr.querySelector('td.healthy').textContent} of `
               + `${tr.querySelector('td.instances').textContent} healthy ${tr.className}`.trim());",
            vec![],
        )
        .await;
    assert_eq!(
        services,
        [
            "server-order: 2 of 2 healthy",
            "server-product: 3 of 4 healthy degraded",
            "server-user: 1 of 1 healthy",
        ]
    );
    browser.find("#live.on").await;
    browser.screenshot("services.png").await;

    // One service: its instances, unhealthy, offline, their metadata, and
    // its watchers.
    browser
        .find(&format!(
            "#services tr[data-service=\"{PRODUCT_SERVICE}\"] td.name a"
        ))
        .await
        .click()
        .await
        .expect("follow the service's link");
    browser.lands_on(&service_page(PRODUCT_SERVICE)).await;
    browser.find("#instances tr[data-instance]").await;
    let died = browser.row("127.0.0.1:8073").await.expect("the dead one");
    assert!(died.unhealthy() && died.lease == "orphaned", "{died:?}");
    let canary = browser.row("127.0.0.1:8072").await.expect("the canary");
    assert!(canary.offline() && !canary.unhealthy(), "{canary:?}");
    assert_eq!(
        canary.metadata,
        ["canary=true", "version=1.5.0-rc1", "zone=zone-b"]
    );
    let heavy = browser.row("127.0.0.1:8070").await.expect("the heavy one");
    assert_eq!(
        (heavy.weight.as_str(), heavy.healthy.as_str()),
        ("2", "true")
    );
    browser
        .until(
            "both watchers listed",
            PATIENCE,
            "const scopes = [...document.querySelectorAll('#watchers tr[data-watcher] td.scope')]
               .map((td) => td.textContent);
             return scopes.includes('service') && scopes.includes('group');",
            vec![],
        )
        .await;
    assert_eq!(
        browser
            .find("#protect-threshold")
            .await
            .prop("value")
            .await
            .unwrap()
            .as_deref(),
        Some("0.5")
    );
    browser.find("#live.on").await;
    browser.screenshot("service.png").await;

    // The change feed, newest first.
    browser
        .find("#nav a[data-page=changes]")
        .await
        .click()
        .await
        .unwrap();
    browser
        .lands_on("/changes?namespace=public&group=DEFAULT_GROUP")
        .await;
    browser.find("#changes tr[data-revision]").await;
    let kinds: Vec<String> = browser
        .js(
            "return [...document.querySelectorAll('#changes tr[data-revision] td.kind')].map((td) => td.textContent);",
            vec![],
        )
        .await;
    let mut expected = vec!["REMOVED"];
    expected.extend(["PUT"; 10]);
    assert_eq!(kinds, expected);
    browser.find("#live.on").await;
    browser.screenshot("changes.png").await;

    // The node: one process, memory store.
    browser
        .find("#nav a[data-page=cluster]")
        .await
        .click()
        .await
        .unwrap();
    browser.lands_on("/cluster").await;
    assert_eq!(browser.text("#cluster-store").await, "memory");
    assert_eq!(
        browser.text("#cluster-node").await,
        registry.addr.to_string()
    );
    browser.find("#single-process").await;
    // The one registry node, which answered the page.
    let node = registry.addr.to_string();
    let listed = browser
        .text(&format!(
            "#registry-nodes tr[data-node=\"{node}\"] td.answering"
        ))
        .await;
    assert_eq!(listed, "yes");
    browser.screenshot("cluster.png").await;
    browser.close().await;
    for watcher in watchers {
        watcher.abort();
    }
}
