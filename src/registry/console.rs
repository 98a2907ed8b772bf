//! The console: the registry seen and steered in a browser, served on the
//! registry's own port from assets inside the binary (plain HTML, CSS and
//! JavaScript; no framework, nothing fetched from elsewhere).
//!
//! Every page is the same `index.html`; its script renders by path and
//! calls the JSON API (`http.rs`) for everything, so whatever the console
//! can do, curl can too, with the same checks and the same messages.
//!
//! Logging in opens a session ([`crate::auth::session`]): an admin
//! credential held in memory, carried in an HttpOnly, SameSite=Strict
//! cookie. [`Console::guard`] turns the cookie into the request's
//! credential for the JSON API, and refuses a state-changing request that
//! does not show the session's CSRF token (or comes from another origin).
//! Logins are limited per client address.
//!
//! ```text
//! GET  /login  /services  /services/{name}  /changes  /cluster  /account
//!                                                                the pages (303 to /login without a session)
//! GET  /  /nacos                                                 303 to /services
//! GET  /assets/app.js  /assets/app.css
//! POST /api/v1/console/login     {"username": "admin", "password": "..."}
//! GET  /api/v1/console/session
//! POST /api/v1/console/logout
//! PUT  /api/v1/console/password  {"current": "...", "new": "..."}
//! ```

mod credential;

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, LazyLock};

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use governor::clock::Clock as _;
use governor::{DefaultKeyedRateLimiter, Quota};
use serde::Deserialize;
use serde_json::json;
use sha2::Digest as _;
use tonic::transport::server::TcpConnectInfo;

pub use credential::{Credential, HASH_FILE, INITIAL_PASSWORD_FILE, USER};

use super::http::Refused;
use super::{Config, Registry};
use crate::auth::Token;
use crate::auth::session::SessionInfo;

/// The session cookie's name.
pub const COOKIE: &str = "shop_mesh_session";

/// The header a state-changing request shows its session's CSRF token in.
pub const CSRF_HEADER: &str = "x-csrf-token";

/// The console of one registry node. Cheap to clone.
#[derive(Clone)]
pub struct Console {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    credential: Credential,
    logins: DefaultKeyedRateLimiter<IpAddr>,
    /// The port is on TLS: the cookie is marked Secure.
    secure: bool,
}

impl Console {
    /// The console of `registry`, its user's credential read from (or, on
    /// the first start, made in) `config.data_dir` unless configuration
    /// gives the password. `secure`: the port speaks TLS.
    pub async fn open(
        config: &Config,
        registry: Registry,
        secure: bool,
    ) -> anyhow::Result<Console> {
        let attempts =
            NonZeroU32::new(config.console.login_attempts_per_minute).ok_or_else(|| {
                anyhow::anyhow!("registry.console.login_attempts_per_minute must be at least 1")
            })?;
        anyhow::ensure!(
            config.console.session_idle >= std::time::Duration::from_secs(60)
                && config.console.session_max >= config.console.session_idle,
            "registry.console.session_idle must be at least 1 minute, and session_max at least session_idle"
        );
        let credential = Credential::open(&config.console.password, &config.data_dir).await?;
        Ok(Console {
            inner: Arc::new(Inner {
                registry,
                credential,
                logins: DefaultKeyedRateLimiter::keyed(Quota::per_minute(attempts)),
                secure,
            }),
        })
    }

    /// The pages, their assets and the session calls.
    pub fn routes(&self) -> axum::Router {
        axum::Router::new()
            .route("/", get(home))
            .route("/nacos", get(home))
            .route("/nacos/", get(home))
            .route("/login", get(login_page))
            .route("/services", get(page))
            .route("/services/{name}", get(page))
            .route("/changes", get(page))
            .route("/cluster", get(page))
            .route("/account", get(page))
            .route("/assets/app.js", get(script))
            .route("/assets/app.css", get(style))
            .route("/api/v1/console/login", post(login))
            .route("/api/v1/console/session", get(session))
            .route("/api/v1/console/logout", post(logout))
            .route("/api/v1/console/password", put(change_password))
            .with_state(self.clone())
    }

    /// What stands before the JSON API: a request that shows no
    /// `Authorization` but a session cookie is made to show the session's
    /// credential, once its session is found open and, when it changes
    /// anything, its CSRF token and origin are checked.
    pub async fn guard(
        State(console): State<Console>,
        mut request: Request,
        next: Next,
    ) -> Response {
        if request.headers().contains_key(header::AUTHORIZATION) {
            return next.run(request).await;
        }
        let Some(cookie) = cookie(request.headers()) else {
            return next.run(request).await;
        };
        let changes = !matches!(*request.method(), Method::GET | Method::HEAD);
        let asked = (request.headers(), request.uri());
        match console.session(&cookie, asked, changes) {
            Ok(token) => {
                let value = HeaderValue::from_str(&format!("Bearer {}", token.reveal()))
                    .expect("a token is ASCII");
                request.headers_mut().insert(header::AUTHORIZATION, value);
                request.extensions_mut().insert(FromSession);
                next.run(request).await
            }
            Err(refused) => refused.into_response(),
        }
    }

    /// The open session a cookie names; for a request that `changes`
    /// something, only with its CSRF token shown, from the same origin.
    fn session(
        &self,
        cookie: &str,
        (headers, uri): (&HeaderMap, &Uri),
        changes: bool,
    ) -> Result<Token, Refused> {
        let ended = || Refused::from(tonic::Status::unauthenticated(SESSION_ENDED));
        let token: Token = cookie.parse().map_err(|_| ended())?;
        let sessions = self.inner.registry.sessions();
        if sessions.check(&token).is_none() {
            return Err(ended());
        }
        if changes {
            same_origin(headers, uri)?;
            let shown = headers
                .get(CSRF_HEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            if !sessions.csrf_matches(&token, shown) {
                return Err(Refused::from(tonic::Status::permission_denied(
                    "this request does not show the console session's CSRF token (X-CSRF-Token); reload the page and try again",
                )));
            }
        }
        Ok(token)
    }

    /// [`Console::session`] of the request's cookie; without one,
    /// UNAUTHENTICATED saying `missing`.
    fn session_of(
        &self,
        asked: (&HeaderMap, &Uri),
        changes: bool,
        missing: &'static str,
    ) -> Result<Token, Refused> {
        let cookie = cookie(asked.0)
            .ok_or_else(|| Refused::from(tonic::Status::unauthenticated(missing)))?;
        self.session(&cookie, asked, changes)
    }

    fn session_cookie(&self, token: &Token) -> HeaderValue {
        let max = self.inner.registry.config().console.session_max.as_secs();
        let secure = if self.inner.secure { "; Secure" } else { "" };
        HeaderValue::from_str(&format!(
            "{COOKIE}={}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max}{secure}",
            token.reveal()
        ))
        .expect("a token is ASCII")
    }

    fn cleared_cookie(&self) -> HeaderValue {
        let secure = if self.inner.secure { "; Secure" } else { "" };
        HeaderValue::from_str(&format!(
            "{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{secure}"
        ))
        .expect("ASCII")
    }
}

/// Marks a request whose credential is a console session's, so what
/// refuses it later can say the session ended.
#[derive(Debug, Clone, Copy)]
pub struct FromSession;

/// What a request whose session ended is told.
pub const SESSION_ENDED: &str =
    "the console session has ended (it lapsed, or it was logged out); log in again";

/// The session cookie's value, from any `Cookie` header.
fn cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.trim().to_string())
        .filter(|value| !value.is_empty())
}

/// A browser says where a request comes from in `Origin`; one from
/// another site than the console's is refused. (Tools that send no
/// `Origin` are no browser a page could steer.) The console's own host is
/// the request's `Host`, or over HTTP/2 its `:authority`.
fn same_origin(headers: &HeaderMap, uri: &Uri) -> Result<(), Refused> {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return Ok(());
    };
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| uri.authority().map(|a| a.as_str()))
        .unwrap_or_default();
    let origin_host = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
        .unwrap_or_default();
    if host.is_empty() || !origin_host.eq_ignore_ascii_case(host) {
        return Err(Refused::from(tonic::Status::permission_denied(format!(
            "a request from {origin} may not change this registry; use the console it serves"
        ))));
    }
    Ok(())
}

/// The console's own files, inside the binary.
struct Asset {
    body: &'static str,
    content_type: &'static str,
    etag: String,
}

impl Asset {
    fn new(body: &'static str, content_type: &'static str) -> Asset {
        let digest = sha2::Sha256::digest(body.as_bytes());
        let etag: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        Asset {
            body,
            content_type,
            etag: format!("\"{etag}\""),
        }
    }

    /// The asset, or 304 when the browser holds this version.
    fn answer(&self, headers: &HeaderMap) -> Response {
        let fresh = headers
            .get(header::IF_NONE_MATCH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|tags| tags.split(',').any(|t| t.trim() == self.etag));
        let common = [
            (header::ETAG, self.etag.clone()),
            (header::CACHE_CONTROL, "no-cache".to_string()),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff".to_string()),
        ];
        if fresh {
            return (StatusCode::NOT_MODIFIED, common).into_response();
        }
        (
            common,
            [(header::CONTENT_TYPE, self.content_type)],
            self.body,
        )
            .into_response()
    }
}

static INDEX: &str = include_str!("console/index.html");
static SCRIPT: LazyLock<Asset> = LazyLock::new(|| {
    Asset::new(
        include_str!("console/app.js"),
        "text/javascript; charset=utf-8",
    )
});
static STYLE: LazyLock<Asset> =
    LazyLock::new(|| Asset::new(include_str!("console/app.css"), "text/css; charset=utf-8"));

/// A page: never cached, never framed, running only the console's own
/// script.
fn html() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
            ),
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "same-origin"),
        ],
        INDEX,
    )
        .into_response()
}

fn see_other(to: &str) -> Response {
    (StatusCode::SEE_OTHER, [(header::LOCATION, to.to_string())]).into_response()
}

async fn home() -> Response {
    see_other("/services")
}

async fn login_page() -> Response {
    html()
}

/// A page of the console, for a browser with an open session; others
/// are sent to log in, and back here after.
async fn page(State(console): State<Console>, headers: HeaderMap, uri: Uri) -> Response {
    let open =
        cookie(&headers).is_some_and(|c| console.session(&c, (&headers, &uri), false).is_ok());
    if !open {
        let here = uri.path_and_query().map_or("/services", |p| p.as_str());
        return see_other(&format!("/login?next={}", encode_component(here)));
    }
    html()
}

async fn script(headers: HeaderMap) -> Response {
    SCRIPT.answer(&headers)
}

async fn style(headers: HeaderMap) -> Response {
    STYLE.answer(&headers)
}

/// `text` percent-encoded for a query string's value.
fn encode_component(text: &str) -> String {
    let mut out = String::new();
    for byte in text.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                out.push(byte as char)
            }
            _ => out.push_str(&format!("%{byte:02X}")),
        }
    }
    out
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Login {
    username: String,
    password: String,
}

/// What a session's holder is told of it.
fn session_json(info: &SessionInfo) -> serde_json::Value {
    json!({
        "username": info.user,
        "csrf_token": info.csrf,
        "expires_ms": info.expires_ms,
    })
}

async fn login(
    State(console): State<Console>,
    connection: Option<axum::Extension<TcpConnectInfo>>,
    headers: HeaderMap,
    uri: Uri,
    body: Result<Json<Login>, JsonRejection>,
) -> Result<Response, Refused> {
    same_origin(&headers, &uri)?;
    let peer = connection
        .and_then(|c| c.remote_addr())
        .map(|a| a.ip())
        .unwrap_or(IpAddr::from([0, 0, 0, 0]));
    let logins = &console.inner.logins;
    if logins.len() > 10_000 {
        logins.retain_recent();
    }
    if let Err(not_until) = logins.check_key(&peer) {
        let wait = not_until
            .wait_time_from(governor::clock::DefaultClock::default().now())
            .as_secs()
            + 1;
        tracing::warn!(%peer, "console login refused: too many attempts");
        let mut answer = Refused::from(tonic::Status::resource_exhausted(format!(
            "too many login attempts from {peer}; try again in {wait} s"
        )))
        .into_response();
        answer
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(wait));
        return Ok(answer);
    }
    let Json(login) = body.map_err(|err| {
        Refused::from(tonic::Status::invalid_argument(format!(
            "body: {} (expected {{\"username\": \"admin\", \"password\": \"...\"}})",
            err.body_text()
        )))
    })?;
    if !console
        .inner
        .credential
        .verify(login.username.trim(), &login.password)
        .await
    {
        tracing::warn!(%peer, "console login refused: wrong user or password");
        return Err(Refused::from(tonic::Status::unauthenticated(
            "wrong user or password",
        )));
    }
    let (token, info) = console.inner.registry.sessions().open(USER);
    tracing::info!(%peer, user = USER, "console login");
    let mut answer = Json(session_json(&info)).into_response();
    answer
        .headers_mut()
        .insert(header::SET_COOKIE, console.session_cookie(&token));
    answer
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(answer)
}

async fn session(
    State(console): State<Console>,
    headers: HeaderMap,
    uri: Uri,
) -> Result<Response, Refused> {
    let token = console.session_of((&headers, &uri), false, "no console session; log in first")?;
    let info = console
        .inner
        .registry
        .sessions()
        .describe(&token)
        .ok_or_else(|| Refused::from(tonic::Status::unauthenticated("log in again")))?;
    let mut answer = Json(session_json(&info)).into_response();
    answer
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(answer)
}

async fn logout(
    State(console): State<Console>,
    headers: HeaderMap,
    uri: Uri,
) -> Result<Response, Refused> {
    let token = console.session_of((&headers, &uri), true, "no console session to log out of")?;
    console.inner.registry.sessions().close(&token);
    tracing::info!(user = USER, "console logout");
    let mut answer = Json(json!({})).into_response();
    answer
        .headers_mut()
        .insert(header::SET_COOKIE, console.cleared_cookie());
    Ok(answer)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PasswordChange {
    current: String,
    new: String,
}

/// Changes the console's password; every other session ends, and the
/// caller's is replaced by a new one.
async fn change_password(
    State(console): State<Console>,
    headers: HeaderMap,
    uri: Uri,
    body: Result<Json<PasswordChange>, JsonRejection>,
) -> Result<Response, Refused> {
    console.session_of((&headers, &uri), true, "no console session; log in first")?;
    let Json(change) = body.map_err(|err| {
        Refused::from(tonic::Status::invalid_argument(format!(
            "body: {} (expected {{\"current\": \"...\", \"new\": \"...\"}})",
            err.body_text()
        )))
    })?;
    console
        .inner
        .credential
        .change(&change.current, &change.new)
        .await
        .map_err(|err| Refused::from(tonic::Status::from(err)))?;
    let sessions = console.inner.registry.sessions();
    sessions.close_all();
    let (token, info) = sessions.open(USER);
    let mut answer = Json(session_json(&info)).into_response();
    answer
        .headers_mut()
        .insert(header::SET_COOKIE, console.session_cookie(&token));
    Ok(answer)
}
