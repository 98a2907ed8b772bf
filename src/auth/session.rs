//! Console sessions: what a person logged into the console holds. A
//! session is a token (`smt_...`, the same form as any other) that lives
//! in this process's memory only, carried by the browser in an HttpOnly
//! cookie, with a CSRF token of its own that every state-changing request
//! must show. It lapses after `idle` without use and after `max` in any
//! case; logging out ends it at once.
//!
//! Sessions are kept here, not with the tokens the registry stores: they
//! are many, short-lived and per node, and a restart should end them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use subtle::ConstantTimeEq;
use tokio::time::Instant;

use super::{Grant, Scope, Token, TokenId};

/// The console's sessions.
pub struct Sessions {
    open: Mutex<HashMap<TokenId, Session>>,
    idle: Duration,
    max: Duration,
    /// Sessions kept at most; opening one more ends the oldest.
    capacity: usize,
}

struct Session {
    grant: Arc<Grant>,
    csrf: String,
    opened: Instant,
    last_used: Instant,
}

impl Session {
    fn expires(&self, idle: Duration, max: Duration) -> Instant {
        (self.last_used + idle).min(self.opened + max)
    }
}

/// A session as its holder sees it.
#[derive(Debug, Clone)]
pub struct SessionInfo {
    /// Who logged in.
    pub user: String,
    /// What a state-changing request must show in `X-CSRF-Token`.
    pub csrf: String,
    /// When it lapses if not used before, in milliseconds since the Unix
    /// epoch.
    pub expires_ms: u64,
}

impl Sessions {
    /// Sessions that lapse after `idle` without use, and after `max`.
    pub fn new(idle: Duration, max: Duration, capacity: usize) -> Sessions {
        Sessions {
            open: Mutex::new(HashMap::new()),
            idle,
            max,
            capacity: capacity.max(1),
        }
    }

    /// Opens a session for `user`, who may do anything (the console's
    /// user is the registry's administrator). Answers its token, the one
    /// place its secret is seen, and what its holder may know of it.
    pub fn open(&self, user: &str) -> (Token, SessionInfo) {
        let token = Token::generate();
        let now = Instant::now();
        let session = Session {
            grant: Arc::new(Grant {
                id: token.id(),
                name: format!("console: {user}"),
                scope: Scope::Admin,
                digest: token.digest(),
                created_ms: unix_ms(now, now),
            }),
            csrf: hex(&rand::random::<[u8; 32]>()),
            opened: now,
            last_used: now,
        };
        let info = self.info(&session, user, now);
        let mut open = self.open.lock();
        open.retain(|_, s| s.expires(self.idle, self.max) > now);
        if open.len() >= self.capacity
            && let Some(oldest) = open
                .iter()
                .min_by_key(|(_, s)| s.last_used)
                .map(|(id, _)| *id)
        {
            open.remove(&oldest);
        }
        open.insert(token.id(), session);
        (token, info)
    }

    /// The grant of `token`'s session, when it is one that has not lapsed;
    /// counts as a use.
    pub fn check(&self, token: &Token) -> Option<Arc<Grant>> {
        let now = Instant::now();
        let mut open = self.open.lock();
        let session = open.get_mut(&token.id())?;
        if !session.grant.digest.matches(token) {
            return None;
        }
        if session.expires(self.idle, self.max) <= now {
            open.remove(&token.id());
            return None;
        }
        session.last_used = now;
        Some(session.grant.clone())
    }

    /// What the holder of `token` may know of its session, if it is open.
    pub fn describe(&self, token: &Token) -> Option<SessionInfo> {
        let grant = self.check(token)?;
        let now = Instant::now();
        let open = self.open.lock();
        let session = open.get(&token.id())?;
        let user = grant.name.strip_prefix("console: ").unwrap_or(&grant.name);
        Some(self.info(session, user, now))
    }

    /// Whether `csrf` is the CSRF token of `token`'s open session,
    /// compared in constant time.
    pub fn csrf_matches(&self, token: &Token, csrf: &str) -> bool {
        if self.check(token).is_none() {
            return false;
        }
        let open = self.open.lock();
        open.get(&token.id())
            .is_some_and(|s| bool::from(s.csrf.as_bytes().ct_eq(csrf.as_bytes())))
    }

    /// Ends `token`'s session; a later use of it is refused.
    pub fn close(&self, token: &Token) {
        let mut open = self.open.lock();
        if open
            .get(&token.id())
            .is_some_and(|s| s.grant.digest.matches(token))
        {
            open.remove(&token.id());
        }
    }

    /// Ends every session (the password changed).
    pub fn close_all(&self) {
        self.open.lock().clear();
    }

    /// Sessions open now, lapsed ones included until they are swept.
    pub fn len(&self) -> usize {
        self.open.lock().len()
    }

    /// Whether none is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn info(&self, session: &Session, user: &str, now: Instant) -> SessionInfo {
        SessionInfo {
            user: user.to_string(),
            csrf: session.csrf.clone(),
            expires_ms: unix_ms(session.expires(self.idle, self.max), now),
        }
    }
}

/// `at` as milliseconds since the Unix epoch, `now` being now.
fn unix_ms(at: Instant, now: Instant) -> u64 {
    let wall = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    if at >= now {
        wall + (at - now).as_millis() as u64
    } else {
        wall.saturating_sub((now - at).as_millis() as u64)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Need;

    fn sessions() -> Sessions {
        Sessions::new(
            Duration::from_secs(30 * 60),
            Duration::from_secs(8 * 3600),
            3,
        )
    }

    #[tokio::test(start_paused = true)]
    async fn a_session_is_an_admin_credential_until_it_is_idle_too_long() {
        let sessions = sessions();
        let (token, info) = sessions.open("admin");
        assert_eq!(info.user, "admin");
        let grant = sessions.check(&token).expect("open");
        assert!(grant.scope.allows(Need::Admin));
        // Used within the idle time, it goes on.
        for _ in 0..4 {
            tokio::time::advance(Duration::from_secs(29 * 60)).await;
            assert!(sessions.check(&token).is_some());
        }
        tokio::time::advance(Duration::from_secs(30 * 60)).await;
        assert!(sessions.check(&token).is_none(), "idle for 30 min");
        assert!(sessions.describe(&token).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_session_lapses_at_its_maximum_however_much_it_is_used() {
        let sessions = sessions();
        let (token, _) = sessions.open("admin");
        for _ in 0..16 {
            tokio::time::advance(Duration::from_secs(29 * 60)).await;
            sessions.check(&token);
        }
        // 7 h 44 min in: still open, and it says it ends at 8 h, 16 min
        // from now.
        let info = sessions.describe(&token).expect("open");
        let now = unix_ms(Instant::now(), Instant::now());
        assert!((info.expires_ms - now).abs_diff(16 * 60 * 1000) < 2000);
        tokio::time::advance(Duration::from_secs(17 * 60)).await;
        assert!(sessions.check(&token).is_none(), "past 8 h");
    }

    #[tokio::test(start_paused = true)]
    async fn a_closed_session_a_forged_one_and_a_wrong_csrf_token_are_refused() {
        let sessions = sessions();
        let (token, info) = sessions.open("admin");
        assert!(sessions.csrf_matches(&token, &info.csrf));
        assert!(!sessions.csrf_matches(&token, ""));
        assert!(!sessions.csrf_matches(&token, &info.csrf[1..]));
        // Another secret under the same id.
        let forged: Token = format!("{}_{}", &token.reveal()[..20], "0".repeat(64))
            .parse()
            .unwrap();
        assert!(sessions.check(&forged).is_none());
        sessions.close(&forged);
        assert!(
            sessions.check(&token).is_some(),
            "a forged logout ends nothing"
        );
        sessions.close(&token);
        assert!(sessions.check(&token).is_none());
        assert!(!sessions.csrf_matches(&token, &info.csrf));
    }

    #[tokio::test(start_paused = true)]
    async fn opening_past_capacity_ends_the_least_recently_used() {
        let sessions = sessions();
        let (a, _) = sessions.open("admin");
        tokio::time::advance(Duration::from_secs(1)).await;
        let (b, _) = sessions.open("admin");
        tokio::time::advance(Duration::from_secs(1)).await;
        let (c, _) = sessions.open("admin");
        tokio::time::advance(Duration::from_secs(1)).await;
        sessions.check(&a);
        let (d, _) = sessions.open("admin");
        assert_eq!(sessions.len(), 3);
        assert!(sessions.check(&b).is_none(), "b was used least recently");
        for kept in [&a, &c, &d] {
            assert!(sessions.check(kept).is_some());
        }
    }
}
