//! Console sessions: a random cookie for the browser, the admin token on the server.

use std::collections::HashMap;
use std::sync::Mutex;

use base64::Engine as _;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

/// A session lasts at most this long (seconds), and never past its token.
const LIFETIME_S: i64 = 8 * 3600;
/// ... and ends after this long without a request.
const IDLE_S: i64 = 3600;
/// Sessions held at once; the oldest goes first.
const MAX_SESSIONS: usize = 1024;

/// The console's signed-in browsers, by the SHA-256 of their cookie.
#[derive(Default)]
pub struct Sessions {
    map: Mutex<HashMap<[u8; 32], Session>>,
}

/// One signed-in browser.
#[derive(Clone)]
pub(crate) struct Session {
    /// The admin token it acts with (checked again at every request).
    pub(crate) token: Zeroizing<String>,
    /// What its pages send back with every change.
    pub(crate) csrf: String,
    created: i64,
    last_used: i64,
}

fn random_text() -> String {
    let b: [u8; 32] = crate::secret::random(&mut rand::rng());
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

fn id(cookie: &str) -> [u8; 32] {
    Sha256::digest(cookie.as_bytes()).into()
}

impl Sessions {
    /// Starts a session for `token` at `now`; its cookie value.
    pub(crate) fn create(&self, token: String, now: i64) -> String {
        let cookie = random_text();
        let session = Session {
            token: Zeroizing::new(token),
            csrf: random_text(),
            created: now,
            last_used: now,
        };
        let mut map = self
            .map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        map.retain(|_, s| live(s, now));
        if map.len() >= MAX_SESSIONS
            && let Some(oldest) = map.iter().min_by_key(|(_, s)| s.last_used).map(|(k, _)| *k)
        {
            map.remove(&oldest);
        }
        map.insert(id(&cookie), session);
        cookie
    }

    /// The live session behind `cookie`, marked as used at `now`.
    pub(crate) fn get(&self, cookie: &str, now: i64) -> Option<Session> {
        let mut map = self
            .map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let key = id(cookie);
        match map.get_mut(&key) {
            Some(s) if live(s, now) => {
                s.last_used = now;
                Some(s.clone())
            }
            Some(_) => {
                map.remove(&key);
                None
            }
            None => None,
        }
    }

    /// Ends the session behind `cookie`.
    pub(crate) fn remove(&self, cookie: &str) {
        self.map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&id(cookie));
    }

    /// Sessions held now (expired ones included until the next sign-in sweeps them).
    pub fn len(&self) -> usize {
        self.map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }

    /// Whether no session is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn live(s: &Session, now: i64) -> bool {
    now < s.created + LIFETIME_S && now < s.last_used + IDLE_S
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_is_found_by_its_cookie_only_and_ends_when_idle_or_old() {
        let s = Sessions::default();
        let cookie = s.create("lt2-token".into(), 1000);
        assert!(s.get("another cookie", 1000).is_none());
        let got = s.get(&cookie, 1001).expect("live");
        assert_eq!(got.token.as_str(), "lt2-token");
        assert!(got.csrf.len() >= 40 && got.csrf != cookie);
        // Used now and then, it lives until its lifetime ends.
        let mut t = 1001;
        while t < 1000 + LIFETIME_S - 10 {
            t += IDLE_S - 10;
            assert!(
                s.get(&cookie, t.min(1000 + LIFETIME_S - 1)).is_some(),
                "{t}"
            );
        }
        assert!(s.get(&cookie, 1000 + LIFETIME_S).is_none());
        // Left alone, it ends after the idle time.
        let idle = s.create("lt2-other".into(), 5000);
        assert!(s.get(&idle, 5000 + IDLE_S).is_none());
        let gone = s.create("lt2-third".into(), 9000);
        s.remove(&gone);
        assert!(s.get(&gone, 9000).is_none());
    }

    #[test]
    fn the_oldest_session_makes_room() {
        let s = Sessions::default();
        let first = s.create("a".into(), 0);
        for i in 1..MAX_SESSIONS as i64 {
            s.create("b".into(), i);
        }
        assert!(s.get(&first, 2000).is_some(), "all fit");
        // `first` was just used; the next oldest goes.
        let last = s.create("c".into(), 2001);
        assert_eq!(s.len(), MAX_SESSIONS);
        assert!(s.get(&first, 2002).is_some() && s.get(&last, 2002).is_some());
    }
}
