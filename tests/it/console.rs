//! The console's HTTP face, called as a browser and as curl would call
//! it: pages behind a login, sessions in HttpOnly cookies, CSRF tokens on
//! every change, logins limited per address, the reads the pages make and
//! the live events they follow. Each refusal with its status and message,
//! and nothing changed by one.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use serde_json::Value;
use shop_mesh::pb::registry as pb;
use shop_mesh::registry::console::{HASH_FILE, INITIAL_PASSWORD_FILE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::http::{Answer, send};
use crate::{TestRegistry, admin_token, instance, register_as, showing};

/// A browser's session: its cookie and CSRF token.
pub struct Session {
    pub cookie: String,
    pub csrf: String,
}

impl Session {
    /// A request as the console's page makes it: the cookie, and on a
    /// change the CSRF token.
    pub async fn call(
        &self,
        addr: SocketAddr,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> Answer {
        let mut headers = vec![("Cookie", self.cookie.as_str())];
        if method != "GET" {
            headers.push(("X-CSRF-Token", self.csrf.as_str()));
        }
        send(addr, method, path, &headers, body).await
    }
}

/// The password the registry's first start handed out in its data dir,
/// once it has.
pub async fn initial_password(data_dir: &std::path::Path) -> String {
    let file = data_dir.join(INITIAL_PASSWORD_FILE);
    crate::wait_until(
        "the registry to hand out the console's password",
        Duration::from_secs(20),
        || {
            let written = file.exists();
            async move { written }
        },
    )
    .await;
    std::fs::read_to_string(file)
        .expect("the first start writes the console's password")
        .trim()
        .to_string()
}

/// Logs in as `user` with `password`: the answer.
async fn try_login(addr: SocketAddr, user: &str, password: &str) -> Answer {
    let body = serde_json::json!({"username": user, "password": password}).to_string();
    send(addr, "POST", "/api/v1/console/login", &[], Some(&body)).await
}

/// Logs in, or panics.
pub async fn login(addr: SocketAddr, password: &str) -> Session {
    let answer = try_login(addr, "admin", password).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let cookie = answer
        .header("set-cookie")
        .expect("a session cookie")
        .split(';')
        .next()
        .unwrap()
        .to_string();
    Session {
        cookie,
        csrf: answer.json()["csrf_token"].as_str().unwrap().to_string(),
    }
}

/// A registry that checks credentials, whose console is to be logged into.
async fn guarded() -> TestRegistry {
    TestRegistry::start_with(|config| config.auth.enabled = true).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_need_a_login_with_the_password_the_first_start_handed_out() {
    let registry = guarded().await;
    let addr = registry.addr;
    let dir = &registry.config.data_dir;

    // The first start made a password: its hash is kept, and the password
    // is handed out in a file only the registry's user reads.
    let password = initial_password(dir).await;
    assert!(password.len() >= 12);
    let hash = std::fs::read_to_string(dir.join(HASH_FILE)).unwrap();
    assert!(hash.starts_with("$argon2id$") && !hash.contains(&password));
    for file in [HASH_FILE, INITIAL_PASSWORD_FILE] {
        let mode = std::fs::metadata(dir.join(file)).unwrap().permissions();
        assert_eq!(mode.mode() & 0o777, 0o600, "{file}");
    }

    // Without a session, every page sends the browser to log in, and back
    // after; the seed's /nacos leads to the console.
    for (page, next) in [
        ("/services", "/services"),
        (
            "/services/server-product?namespace=public",
            "/services/server-product%3Fnamespace%3Dpublic",
        ),
        ("/changes", "/changes"),
        ("/cluster", "/cluster"),
        ("/account", "/account"),
    ] {
        let answer = send(addr, "GET", page, &[], None).await;
        assert_eq!(answer.status, 303, "{page}");
        assert_eq!(
            answer.header("location"),
            Some(format!("/login?next={next}").as_str())
        );
    }
    for home in ["/", "/nacos", "/nacos/"] {
        let answer = send(addr, "GET", home, &[], None).await;
        assert_eq!(
            (answer.status, answer.header("location")),
            (303, Some("/services"))
        );
    }
    let nowhere = send(addr, "GET", "/no-such-page", &[], None).await;
    assert_eq!(nowhere.status, 404);
    assert!(
        nowhere.body.contains("the console is at /"),
        "{}",
        nowhere.body
    );
    let form = send(addr, "GET", "/login", &[], None).await;
    assert_eq!(form.status, 200);
    assert!(form.body.contains("/assets/app.js"));
    let policy = form.header("content-security-policy").unwrap();
    assert!(policy.contains("default-src 'self'") && policy.contains("frame-ancestors 'none'"));
    assert_eq!(form.header("x-frame-options"), Some("DENY"));

    // A wrong password or user, or a malformed login, opens nothing.
    for (user, pass) in [("admin", "wrong-password"), ("root", password.as_str())] {
        let answer = try_login(addr, user, pass).await;
        assert_eq!(answer.status, 401);
        assert_eq!(answer.json()["message"], "wrong user or password");
        assert!(answer.header("set-cookie").is_none());
    }
    let malformed = send(
        addr,
        "POST",
        "/api/v1/console/login",
        &[],
        Some(r#"{"password": 1}"#),
    )
    .await;
    assert_eq!(malformed.status, 400, "{}", malformed.body);
    assert!(
        malformed.json()["message"]
            .as_str()
            .unwrap()
            .contains("username")
    );

    // The right one: an HttpOnly, SameSite cookie and a CSRF token.
    let answer = try_login(addr, "admin", &password).await;
    assert_eq!(answer.status, 200);
    let cookie = answer.header("set-cookie").unwrap();
    for part in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age="] {
        assert!(cookie.contains(part), "{cookie}");
    }
    assert!(!cookie.contains("Secure"), "a plaintext port's cookie");
    let session = login(addr, &password).await;
    let page = session.call(addr, "GET", "/services", None).await;
    assert_eq!(page.status, 200);
    assert_eq!(page.header("cache-control"), Some("no-store"));
    let about = session
        .call(addr, "GET", "/api/v1/console/session", None)
        .await;
    assert_eq!(about.status, 200);
    assert_eq!(about.json()["username"], "admin");
    assert_eq!(about.json()["csrf_token"], session.csrf.as_str());

    // The assets are the binary's, cached by version.
    let script = send(addr, "GET", "/assets/app.js", &[], None).await;
    assert_eq!(script.status, 200);
    assert!(
        script
            .header("content-type")
            .unwrap()
            .starts_with("text/javascript")
    );
    let etag = script.header("etag").unwrap().to_string();
    let again = send(
        addr,
        "GET",
        "/assets/app.js",
        &[("If-None-Match", &etag)],
        None,
    )
    .await;
    assert_eq!(again.status, 304);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_changes_the_registry_only_with_its_csrf_token_until_logged_out() {
    let registry = guarded().await;
    let addr = registry.addr;
    let admin = admin_token(&[&registry.config.data_dir]).await;
    let mut client = registry.client().await;
    register_as(
        &mut client,
        instance("server-product", 8070),
        0,
        Some(&admin),
    )
    .await
    .unwrap();
    let session = login(addr, &initial_password(&registry.config.data_dir).await).await;
    let threshold = async || {
        let answer = session
            .call(addr, "GET", "/api/v1/services/server-product", None)
            .await;
        answer.json()["protect_threshold"].as_f64().unwrap()
    };

    // The session reads as the administrator does.
    let list = session.call(addr, "GET", "/api/v1/services", None).await;
    assert_eq!(list.status, 200, "{}", list.body);
    assert_eq!(list.json()["total"], 1);

    // A change needs the session's CSRF token, from the console's origin.
    let change = r#"{"protect_threshold": 0.5}"#;
    let path = "/api/v1/services/server-product";
    let cookie = ("Cookie", session.cookie.as_str());
    let refusals = [
        vec![cookie],
        vec![cookie, ("X-CSRF-Token", "0123")],
        vec![
            cookie,
            ("X-CSRF-Token", session.csrf.as_str()),
            ("Origin", "http://elsewhere.example"),
        ],
    ];
    for headers in refusals {
        let answer = send(addr, "PATCH", path, &headers, Some(change)).await;
        assert_eq!(answer.status, 403, "{headers:?}: {}", answer.body);
        assert_eq!(answer.json()["code"], "PERMISSION_DENIED");
        assert_eq!(threshold().await, 0.0, "nothing changed");
    }
    let message = send(addr, "PATCH", path, &[cookie], Some(change))
        .await
        .json()["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(message.contains("CSRF"), "{message}");
    let origin = format!("http://{addr}");
    let answer = send(
        addr,
        "PATCH",
        path,
        &[cookie, ("X-CSRF-Token", &session.csrf), ("Origin", &origin)],
        Some(change),
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(threshold().await, 0.5);

    // A forged cookie is no session.
    let forged = format!("shop_mesh_session=smt_0123456789abcdef_{}", "ab".repeat(32));
    let answer = send(
        addr,
        "GET",
        "/api/v1/services",
        &[("Cookie", &forged)],
        None,
    )
    .await;
    assert_eq!(answer.status, 401);
    assert!(
        answer.json()["message"]
            .as_str()
            .unwrap()
            .contains("log in again")
    );

    // Logging out needs the token too; then the cookie opens nothing.
    let no_token = send(addr, "POST", "/api/v1/console/logout", &[cookie], None).await;
    assert_eq!(no_token.status, 403);
    let out = session
        .call(addr, "POST", "/api/v1/console/logout", None)
        .await;
    assert_eq!(out.status, 200);
    assert!(out.header("set-cookie").unwrap().contains("Max-Age=0"));
    let after = session.call(addr, "GET", "/api/v1/services", None).await;
    assert_eq!(after.status, 401);
    let page = session.call(addr, "GET", "/services", None).await;
    assert_eq!(page.status, 303);
    let session_gone = session
        .call(addr, "GET", "/api/v1/console/session", None)
        .await;
    assert_eq!(session_gone.status, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_are_limited_per_address() {
    let registry = TestRegistry::start_with(|config| {
        config.auth.enabled = true;
        config.console.login_attempts_per_minute = 3;
    })
    .await;
    let password = initial_password(&registry.config.data_dir).await;
    for _ in 0..3 {
        let answer = try_login(registry.addr, "admin", "not-the-password").await;
        assert_eq!(answer.status, 401);
    }
    // Past the limit even the right password is not tried.
    let answer = try_login(registry.addr, "admin", &password).await;
    assert_eq!(answer.status, 429, "{}", answer.body);
    assert_eq!(answer.json()["code"], "RESOURCE_EXHAUSTED");
    assert!(
        answer.json()["message"]
            .as_str()
            .unwrap()
            .contains("too many login attempts")
    );
    let wait: u64 = answer.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=61).contains(&wait), "{wait}");
    assert!(answer.header("set-cookie").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_password_ends_the_other_sessions_and_the_handed_out_file() {
    let registry = guarded().await;
    let addr = registry.addr;
    let dir = &registry.config.data_dir;
    let first = initial_password(dir).await;
    let mine = login(addr, &first).await;
    let other = login(addr, &first).await;
    let change =
        |current: &str, new: &str| serde_json::json!({"current": current, "new": new}).to_string();

    // Refused: a wrong current password, a short new one.
    for (body, status) in [
        (change("wrong-password!", "a-long-new-password"), 403),
        (change(&first, "short"), 400),
    ] {
        let answer = mine
            .call(addr, "PUT", "/api/v1/console/password", Some(&body))
            .await;
        assert_eq!(answer.status, status, "{}", answer.body);
        assert!(dir.join(INITIAL_PASSWORD_FILE).exists());
    }
    let answer = mine
        .call(
            addr,
            "PUT",
            "/api/v1/console/password",
            Some(&change(&first, "a-long-new-password")),
        )
        .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert!(!dir.join(INITIAL_PASSWORD_FILE).exists());
    // The changer goes on in a new session; every other one ended.
    let renewed = Session {
        cookie: answer
            .header("set-cookie")
            .unwrap()
            .split(';')
            .next()
            .unwrap()
            .to_string(),
        csrf: answer.json()["csrf_token"].as_str().unwrap().to_string(),
    };
    for (session, status) in [(&renewed, 200), (&other, 401), (&mine, 401)] {
        let answer = session
            .call(addr, "GET", "/api/v1/console/session", None)
            .await;
        assert_eq!(answer.status, status);
    }
    assert_eq!(try_login(addr, "admin", &first).await.status, 401);
    login(addr, "a-long-new-password").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configuration_can_give_the_password_and_then_none_is_written() {
    let registry = TestRegistry::start_with(|config| {
        config.auth.enabled = true;
        config.console.password = "a-configured-password".to_string().into();
    })
    .await;
    let dir = &registry.config.data_dir;
    assert!(!dir.join(INITIAL_PASSWORD_FILE).exists());
    assert!(!dir.join(HASH_FILE).exists());
    login(registry.addr, "a-configured-password").await;
}

/// What the console reads of a service's instance at `port`.
fn instance_at(service: &Value, port: u64) -> Value {
    service["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["port"] == port)
        .cloned()
        .unwrap_or_else(|| panic!("no instance on port {port}: {service}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_reads_namespaces_search_leases_and_watchers() {
    let registry = guarded().await;
    let addr = registry.addr;
    let admin = admin_token(&[&registry.config.data_dir]).await;
    let mut client = registry.client().await;
    let session = login(addr, &initial_password(&registry.config.data_dir).await).await;

    // A kept lease, one whose stream broke, and a persistent instance.
    let kept = register_as(
        &mut client,
        instance("server-product", 8070),
        0,
        Some(&admin),
    )
    .await
    .unwrap();
    let (beats, answers) = crate::keep_alive_as(&mut client, kept.lease_id, Some(&admin)).await;
    let beating = crate::keep_beating(beats, answers, kept.lease_id);
    let broken = register_as(
        &mut client,
        instance("server-product", 8071),
        0,
        Some(&admin),
    )
    .await
    .unwrap();
    let (beats, answers) = crate::keep_alive_as(&mut client, broken.lease_id, Some(&admin)).await;
    drop((beats, answers));
    let persistent = pb::Instance {
        ephemeral: Some(false),
        ..instance("server-db", 5432)
    };
    register_as(&mut client, persistent, 0, Some(&admin))
        .await
        .unwrap();
    register_as(&mut client, instance("server-user", 8060), 0, Some(&admin))
        .await
        .unwrap();
    let other = pb::Instance {
        namespace: "staging".into(),
        ..instance("server-user", 8060)
    };
    register_as(&mut client, other, 0, Some(&admin))
        .await
        .unwrap();

    let namespaces = session
        .call(addr, "GET", "/api/v1/namespaces", None)
        .await
        .json();
    assert_eq!(
        namespaces,
        serde_json::json!({"namespaces": [
            {"name": "public", "groups": [{"name": "DEFAULT_GROUP", "services": 3}]},
            {"name": "staging", "groups": [{"name": "DEFAULT_GROUP", "services": 1}]},
        ]})
    );
    let found = session
        .call(addr, "GET", "/api/v1/services?search=PRODUCT", None)
        .await
        .json();
    assert_eq!(found["total"], 1);
    assert_eq!(found["services"][0]["name"], "server-product");
    let bad = session
        .call(addr, "GET", "/api/v1/services?search=%01", None)
        .await;
    assert_eq!(bad.status, 400);
    assert!(bad.json()["message"].as_str().unwrap().contains("search"));

    let broke = crate::wait_for(|| async {
        let product = session
            .call(addr, "GET", "/api/v1/services/server-product", None)
            .await
            .json();
        (instance_at(&product, 8071)["lease"] == "orphaned").then_some(product)
    })
    .await;
    let alive = instance_at(&broke, 8070);
    assert_eq!(alive["lease"], "alive");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let beat = alive["last_heartbeat_ms"].as_u64().unwrap();
    assert!(beat <= now + 1000 && now - beat < 10_000, "{beat} vs {now}");
    assert_eq!(instance_at(&broke, 8071)["healthy"], false);
    let db = session
        .call(addr, "GET", "/api/v1/services/server-db", None)
        .await
        .json();
    assert_eq!(instance_at(&db, 5432)["lease"], "persistent");
    assert_eq!(instance_at(&db, 5432)["last_heartbeat_ms"], Value::Null);

    // Who watches server-product: a watch of it, and one of its group.
    let mut watching = Vec::new();
    for service in ["server-product", ""] {
        let request = pb::WatchRequest {
            service: service.into(),
            ..Default::default()
        };
        let mut stream = client
            .watch(showing(request, Some(&admin)))
            .await
            .unwrap()
            .into_inner();
        stream.message().await.unwrap();
        watching.push(stream);
    }
    let watchers = session
        .call(
            addr,
            "GET",
            "/api/v1/services/server-product/watchers",
            None,
        )
        .await
        .json();
    let watchers = watchers["watchers"].as_array().unwrap();
    let scopes: Vec<&str> = watchers
        .iter()
        .map(|w| w["scope"].as_str().unwrap())
        .collect();
    assert_eq!(scopes, ["service", "group"]);
    for watcher in watchers {
        assert!(watcher["peer"].as_str().unwrap().starts_with("127.0.0.1:"));
        assert_eq!(watcher["by"], "admin (first start)");
    }
    drop(watching);
    crate::wait_for(|| async {
        let watchers = session
            .call(
                addr,
                "GET",
                "/api/v1/services/server-product/watchers",
                None,
            )
            .await
            .json();
        watchers["watchers"]
            .as_array()
            .unwrap()
            .is_empty()
            .then_some(())
    })
    .await;

    let cluster = session
        .call(addr, "GET", "/api/v1/cluster", None)
        .await
        .json();
    assert_eq!(cluster["store"], "memory");
    assert_eq!(cluster["node"], addr.to_string());

    // Bad input from a browser: a readable refusal, nothing changed.
    let instance_path = "/api/v1/services/server-product/instances/127.0.0.1/8070";
    for (path, body, status, says) in [
        (instance_path, r#"{"weight": -1}"#, 400, "weight"),
        (instance_path, r#"{"weight": "heavy"}"#, 400, "body"),
        (
            "/api/v1/services/no-such-service/instances/127.0.0.1/8070",
            r#"{"enabled": false}"#,
            404,
            "no-such-service",
        ),
        (
            "/api/v1/services/server-product",
            &format!(
                r#"{{"protect_threshold": 0.5, "metadata": {{"k": "{}"}}}}"#,
                "x".repeat(100_000)
            ),
            400,
            "metadata",
        ),
    ] {
        let answer = session.call(addr, "PATCH", path, Some(body)).await;
        assert_eq!(answer.status, status, "{path}: {}", answer.body);
        let message = answer.json()["message"].as_str().unwrap().to_string();
        assert!(message.contains(says), "{message}");
    }
    let unknown = session
        .call(addr, "GET", "/api/v1/services/no-such-service", None)
        .await;
    assert_eq!(unknown.status, 404);
    let product = session
        .call(addr, "GET", "/api/v1/services/server-product", None)
        .await
        .json();
    assert_eq!(instance_at(&product, 8070)["weight"], 1.0);
    assert_eq!(product["protect_threshold"], 0.0);
    beating.abort();
}

/// An open Server-Sent Events stream, read as it comes.
struct Events {
    stream: tokio::net::TcpStream,
    seen: String,
}

impl Events {
    async fn open(addr: SocketAddr, path: &str, cookie: &str) -> Events {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let head = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nCookie: {cookie}\r\n\r\n");
        stream.write_all(head.as_bytes()).await.unwrap();
        let mut events = Events {
            stream,
            seen: String::new(),
        };
        let head = events.until("\r\n\r\n").await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(head.contains("text/event-stream"), "{head}");
        events
    }

    /// Reads until what was read holds `text`, within 10 s; answers what
    /// was read up to the end of it, and keeps the rest for the next.
    async fn until(&mut self, text: &str) -> String {
        let read = async {
            let mut buf = [0u8; 4096];
            while !self.seen.contains(text) {
                let n = self.stream.read(&mut buf).await.unwrap();
                assert!(n > 0, "the stream ended before {text:?}: {}", self.seen);
                self.seen.push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        };
        tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .unwrap_or_else(|_| panic!("no {text:?} in 10 s: {}", self.seen));
        let end = self.seen.find(text).expect("found") + text.len();
        let rest = self.seen.split_off(end);
        std::mem::replace(&mut self.seen, rest)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_follow_the_registry_live_until_their_session_ends() {
    let registry = guarded().await;
    let addr = registry.addr;
    let admin = admin_token(&[&registry.config.data_dir]).await;
    let mut client = registry.client().await;
    let session = login(addr, &initial_password(&registry.config.data_dir).await).await;

    // No session, no events.
    let refused = send(addr, "GET", "/api/v1/events", &[], None).await;
    assert_eq!(refused.status, 401);

    let mut group = Events::open(addr, "/api/v1/events", &session.cookie).await;
    let mut product = Events::open(
        addr,
        "/api/v1/events?service=server-product",
        &session.cookie,
    )
    .await;
    register_as(&mut client, instance("server-user", 8060), 0, Some(&admin))
        .await
        .unwrap();
    let told = group.until("\n\n").await;
    assert!(told.contains("event: change"), "{told}");
    assert!(told.contains(r#""services":["server-user"]"#), "{told}");
    let registered = register_as(
        &mut client,
        instance("server-product", 8070),
        0,
        Some(&admin),
    )
    .await
    .unwrap();
    let told = product.until("\n\n").await;
    assert!(told.contains(r#""services":["server-product"]"#), "{told}");
    assert!(
        told.contains(&format!(r#""revision":{}"#, registered.revision)),
        "{told}"
    );

    // Logged out, the next change ends the stream with the reason.
    session
        .call(addr, "POST", "/api/v1/console/logout", None)
        .await;
    crate::deregister(&mut client, "server-product", 8070)
        .await
        .unwrap_err();
    client
        .deregister(showing(
            pb::DeregisterRequest {
                service: "server-product".into(),
                ip: "127.0.0.1".into(),
                port: 8070,
                ..Default::default()
            },
            Some(&admin),
        ))
        .await
        .unwrap();
    let told = product.until("event: ended").await;
    let told = told + &product.until("\n\n").await;
    assert!(told.contains("the console session has ended"), "{told}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_reads_refuse_what_the_grpc_reads_refuse() {
    let registry = guarded().await;
    let addr = registry.addr;
    let admin = admin_token(&[&registry.config.data_dir]).await;
    let mut client = registry.client().await;
    for namespace in ["public", "staging"] {
        let instance = pb::Instance {
            namespace: namespace.into(),
            ..instance("server-user", 8060)
        };
        register_as(&mut client, instance, 0, Some(&admin))
            .await
            .unwrap();
    }
    let reader = crate::reader_token(&mut client, &admin, "staging").await;
    let bearer = format!("Bearer {reader}");
    let as_reader = [("Authorization", bearer.as_str())];

    // A token sees the namespaces it may read, and no other's watchers.
    let namespaces = send(addr, "GET", "/api/v1/namespaces", &as_reader, None).await;
    assert_eq!(namespaces.status, 200);
    assert_eq!(namespaces.json()["namespaces"][0]["name"], "staging");
    assert_eq!(namespaces.json()["namespaces"].as_array().unwrap().len(), 1);
    let watchers = send(
        addr,
        "GET",
        "/api/v1/services/server-user/watchers",
        &as_reader,
        None,
    )
    .await;
    assert_eq!(watchers.status, 403, "{}", watchers.body);
    let events = send(addr, "GET", "/api/v1/events", &as_reader, None).await;
    assert_eq!(events.status, 403, "{}", events.body);

    // No credential, or a bad field: refused, naming what is wrong.
    for (path, status, says) in [
        ("/api/v1/namespaces", 401, "needs a token"),
        ("/api/v1/cluster", 401, "needs a token"),
        (
            "/api/v1/services/server-user/watchers",
            401,
            "needs a token",
        ),
        ("/api/v1/events?service=server-user", 401, "needs a token"),
    ] {
        let answer = send(addr, "GET", path, &[], None).await;
        assert_eq!(answer.status, status, "{path}: {}", answer.body);
        let message = answer.json()["message"].as_str().unwrap().to_string();
        assert!(message.contains(says), "{path}: {message}");
    }
    let as_admin = format!("Bearer {admin}");
    let as_admin = [("Authorization", as_admin.as_str())];
    for (path, says) in [
        ("/api/v1/services/bad%20name/watchers", "service"),
        ("/api/v1/events?service=bad%20name", "service"),
        ("/api/v1/events?since=3", "since"),
        ("/api/v1/services/server-user/watchers?cluster=x", "cluster"),
        ("/api/v1/services?search=x&page_size=5000", "page_size"),
    ] {
        let answer = send(addr, "GET", path, &as_admin, None).await;
        assert_eq!(answer.status, 400, "{path}: {}", answer.body);
        let message = answer.json()["message"].as_str().unwrap().to_string();
        assert!(message.contains(says), "{path}: {message}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_without_its_console_serves_no_page_and_writes_no_password() {
    let registry = TestRegistry::start_with(|config| {
        config.auth.enabled = true;
        config.console.enabled = false;
    })
    .await;
    let admin = admin_token(&[&registry.config.data_dir]).await;
    let dir = &registry.config.data_dir;
    assert!(!dir.join(INITIAL_PASSWORD_FILE).exists());
    assert!(!dir.join(HASH_FILE).exists());
    for path in ["/services", "/login", "/assets/app.js"] {
        let answer = send(registry.addr, "GET", path, &[], None).await;
        assert_eq!(answer.status, 404, "{path}");
    }
    let login = try_login(registry.addr, "admin", "any-password-at-all").await;
    assert_eq!(login.status, 404, "{}", login.body);
    // The JSON API is the registry's, console or not.
    let bearer = format!("Bearer {admin}");
    let list = send(
        registry.addr,
        "GET",
        "/api/v1/services",
        &[("Authorization", &bearer)],
        None,
    )
    .await;
    assert_eq!(list.status, 200, "{}", list.body);
}
