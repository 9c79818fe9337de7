//! Viewer tokens: `http.viewer-tokens-file` binds each token (by its SHA-256, so the file holds
//! no secret) to a person's identity and groups, judged by the access policy as `user:<name>`.
//! A browser signs in with the token once and then holds a session cookie this member signed
//! (name and expiry under a key of its own), never the token; scripts may send the token
//! itself as `Authorization: Bearer`.
//!
//! ```toml
//! [[viewer]]
//! name = "alice"
//! groups = ["sre"]
//! token-sha256 = "<64 lower-case hex digits: sha256 of the token>"
//! ```

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use hmac::{Hmac, Mac};

use axum::http::{HeaderMap, header};
use rewind_shared::identity::Kind;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::access::Principal;

/// Largest viewers file read.
pub const MAX_VIEWERS_FILE_BYTES: u64 = 1 << 20;
/// Most viewers in the file.
pub const MAX_VIEWERS: usize = 1024;
/// Most groups one viewer has.
pub const MAX_VIEWER_GROUPS: usize = 32;
/// Tokens are 32 to 256 characters of base64 or hex (`openssl rand -hex 32`): long enough that
/// guessing is hopeless, and safe in a cookie.
pub const MIN_TOKEN_BYTES: usize = 32;
pub const MAX_TOKEN_BYTES: usize = 256;
/// How long a sign-in lasts: the session cookie's expiry, which this member checks.
pub const SESSION_LASTS_S: u64 = 12 * 3600;
/// Most sessions remembered as signed out before they expire (the earliest to expire go
/// first when more sign out).
pub const MAX_SIGNED_OUT: usize = 4096;
/// Longest session cookie read.
const MAX_SESSION_BYTES: usize = 256;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ViewersFile {
    #[serde(default)]
    viewer: Vec<RawViewer>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawViewer {
    name: String,
    #[serde(default)]
    groups: Vec<String>,
    token_sha256: String,
}

/// The viewers a member knows, by the SHA-256 of their token.
#[derive(Debug, Default)]
pub struct Viewers {
    by_digest: HashMap<[u8; 32], Principal>,
    by_name: HashMap<String, Principal>,
}

impl Viewers {
    /// Reads and checks the file; every problem is named with the viewer it is in.
    pub fn load(path: &Path) -> Result<Self, String> {
        let size = std::fs::metadata(path)
            .map_err(|error| format!("cannot read {}: {error}", path.display()))?
            .len();
        if size > MAX_VIEWERS_FILE_BYTES {
            return Err(format!(
                "{} is {size} bytes; at most {MAX_VIEWERS_FILE_BYTES}",
                path.display()
            ));
        }
        let text = std::fs::read_to_string(path)
            .map_err(|error| format!("cannot read {}: {error}", path.display()))?;
        Self::parse(&text).map_err(|error| format!("{}: {error}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let file: ViewersFile = toml::from_str(text).map_err(|error| error.to_string())?;
        if file.viewer.len() > MAX_VIEWERS {
            return Err(format!(
                "{} viewers; at most {MAX_VIEWERS}",
                file.viewer.len()
            ));
        }
        let mut by_digest = HashMap::new();
        let mut by_name = HashMap::new();
        for (index, raw) in file.viewer.into_iter().enumerate() {
            let at = format!(
                "viewer {} ({:?})",
                index + 1,
                rewind_shared::names::truncate(&raw.name, 64)
            );
            rewind_shared::names::validate_name("name", &raw.name)
                .map_err(|error| format!("{at}: {error}"))?;
            if raw.groups.len() > MAX_VIEWER_GROUPS {
                return Err(format!("{at}: more than {MAX_VIEWER_GROUPS} groups"));
            }
            for group in &raw.groups {
                rewind_shared::names::validate_name("groups", group)
                    .map_err(|error| format!("{at}: {error}"))?;
            }
            let mut digest = [0u8; 32];
            let lower_hex = raw.token_sha256.len() == 64
                && raw
                    .token_sha256
                    .bytes()
                    .all(|byte| byte.is_ascii_digit() || (b'a'..=b'f').contains(&byte));
            if !lower_hex || hex::decode_to_slice(&raw.token_sha256, &mut digest).is_err() {
                return Err(format!(
                    "{at}: token-sha256 must be 64 lower-case hex digits (sha256sum of the token)"
                ));
            }
            let principal = Principal {
                kind: Kind::User,
                name: raw.name,
                groups: raw.groups,
            };
            if by_name
                .insert(principal.name.clone(), principal.clone())
                .is_some()
            {
                return Err(format!("{at}: another viewer has this name"));
            }
            if by_digest.insert(digest, principal).is_some() {
                return Err(format!("{at}: its token is another viewer's too"));
            }
        }
        Ok(Self { by_digest, by_name })
    }

    /// The viewer `token` belongs to.
    pub fn find(&self, token: &str) -> Option<Principal> {
        check_token_text(token).ok()?;
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        self.by_digest.get(&digest).cloned()
    }

    /// The viewer named so in the file (a session names its viewer).
    fn named(&self, name: &str) -> Option<Principal> {
        self.by_name.get(name).cloned()
    }

    pub fn len(&self) -> usize {
        self.by_digest.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_digest.is_empty()
    }
}

/// Whether `token` has a token's length and characters, or what is wrong with it.
pub fn check_token_text(token: &str) -> Result<(), String> {
    if !(MIN_TOKEN_BYTES..=MAX_TOKEN_BYTES).contains(&token.len()) {
        return Err(format!(
            "A viewer token is {MIN_TOKEN_BYTES} to {MAX_TOKEN_BYTES} characters."
        ));
    }
    let cookie_safe = token.bytes().all(|byte| {
        byte.is_ascii_alphanumeric() || matches!(byte, b'+' | b'/' | b'=' | b'-' | b'_' | b'.')
    });
    if !cookie_safe {
        return Err("A viewer token is made of letters, digits and + / = - _ . only.".into());
    }
    Ok(())
}

/// Sessions this member signed: `v1:<expires, Unix seconds>:<HMAC-SHA256 hex>:<name>`,
/// under a key made at start (a restart signs everyone out; each member signs its own, as
/// each is its own web origin).
pub struct Sessions {
    key: [u8; 32],
    signed_out: Mutex<SignedOut>,
}

/// Sessions signed out before they expire, by MAC: their expiry. When more are signed out
/// than it holds, the one expiring soonest is let go and every session expiring no later is
/// refused from then on (`floor_s`): some sessions end early, none signed out comes back.
#[derive(Default)]
struct SignedOut {
    by_mac: HashMap<[u8; 32], u64>,
    floor_s: u64,
}

impl Default for Sessions {
    fn default() -> Self {
        Self {
            key: rand::random(),
            signed_out: Mutex::default(),
        }
    }
}

impl Sessions {
    fn mac(&self, name: &str, expires_s: u64) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("any key length");
        mac.update(b"rewind viewer session\0");
        mac.update(name.as_bytes());
        mac.update(&[0]);
        mac.update(&expires_s.to_be_bytes());
        mac
    }

    /// A new session's cookie value for `viewer`, valid for [`SESSION_LASTS_S`].
    pub fn sign(&self, viewer: &Principal, now_s: u64) -> String {
        let expires_s = now_s + SESSION_LASTS_S;
        let mac = self.mac(&viewer.name, expires_s).finalize().into_bytes();
        format!("v1:{expires_s}:{}:{}", hex::encode(mac), viewer.name)
    }

    /// The viewer a session names, as the file has it now, if this member signed it, it has
    /// not expired and was not signed out.
    pub fn check(&self, viewers: &Viewers, cookie: &str, now_s: u64) -> Option<Principal> {
        let (expires_s, mac) = self.verified(cookie, now_s)?;
        let signed_out = self
            .signed_out
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if expires_s <= signed_out.floor_s || signed_out.by_mac.contains_key(&mac) {
            return None;
        }
        drop(signed_out);
        viewers.named(cookie.splitn(4, ':').nth(3)?)
    }

    /// Ends a session this member signed, before its expiry.
    pub fn sign_out(&self, cookie: &str, now_s: u64) {
        let Some((expires_s, mac)) = self.verified(cookie, now_s) else {
            return;
        };
        let mut signed_out = self
            .signed_out
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        signed_out.by_mac.retain(|_, expiry| *expiry > now_s);
        if signed_out.by_mac.len() >= MAX_SIGNED_OUT
            && let Some((earliest, expiry)) = signed_out
                .by_mac
                .iter()
                .min_by_key(|(_, expiry)| **expiry)
                .map(|(mac, expiry)| (*mac, *expiry))
        {
            signed_out.by_mac.remove(&earliest);
            signed_out.floor_s = signed_out.floor_s.max(expiry);
        }
        signed_out.by_mac.insert(mac, expires_s);
    }

    /// Expiry and MAC of a session this member signed that has not expired.
    fn verified(&self, cookie: &str, now_s: u64) -> Option<(u64, [u8; 32])> {
        if cookie.len() > MAX_SESSION_BYTES {
            return None;
        }
        let mut parts = cookie.splitn(4, ':');
        let (version, expires, mac_hex, name) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let expires_s: u64 = expires.parse().ok()?;
        if version != "v1" || expires_s <= now_s {
            return None;
        }
        let mut mac = [0u8; 32];
        hex::decode_to_slice(mac_hex, &mut mac).ok()?;
        self.mac(name, expires_s).verify_slice(&mac).ok()?;
        Some((expires_s, mac))
    }
}

/// What a request presents to name its viewer: a session cookie, a bearer token, both or
/// neither. Kept by a live view, which checks it again at every update.
#[derive(Clone, Debug, Default)]
pub struct Presented {
    pub session: Option<String>,
    pub token: Option<String>,
}

impl Presented {
    /// The request's `rewind_viewer` cookie and `Authorization: Bearer` token (each cut at
    /// their bounds: longer ones cannot be valid).
    pub fn of(headers: &HeaderMap) -> Self {
        let session = headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .find(|(name, _)| *name == super::VIEWER_COOKIE)
            .map(|(_, session)| rewind_shared::names::truncate(session, MAX_SESSION_BYTES + 1))
            .map(str::to_string);
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .map(|token| rewind_shared::names::truncate(token, MAX_TOKEN_BYTES + 1))
            .map(str::to_string);
        Self { session, token }
    }

    /// The viewer named: by the session if it is valid, else by the token.
    pub fn viewer(&self, viewers: &Viewers, sessions: &Sessions, now_s: u64) -> Option<Principal> {
        self.session
            .as_deref()
            .and_then(|session| sessions.check(viewers, session, now_s))
            .or_else(|| viewers.find(self.token.as_deref()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "0123456789abcdef0123456789abcdef";

    fn file_for(token: &str) -> String {
        format!(
            "[[viewer]]\nname = \"alice\"\ngroups = [\"sre\"]\ntoken-sha256 = \"{}\"\n",
            hex::encode(Sha256::digest(token.as_bytes()))
        )
    }

    #[test]
    fn a_token_names_its_viewer_and_nothing_else_does() {
        let viewers = Viewers::parse(&file_for(TOKEN)).unwrap();
        let alice = viewers.find(TOKEN).unwrap();
        assert_eq!(alice.id(), "user:alice");
        assert_eq!(alice.groups, ["sre"]);
        assert!(viewers.find(&TOKEN.replace('0', "1")).is_none());
        assert!(viewers.find("short").is_none());
    }

    #[test]
    fn a_bad_file_is_refused_naming_the_viewer() {
        let bad_digest = "[[viewer]]\nname = \"bob\"\ntoken-sha256 = \"ABC\"\n";
        let error = Viewers::parse(bad_digest).unwrap_err();
        assert!(
            error.contains("viewer 1 (\"bob\")") && error.contains("64 lower-case hex"),
            "{error}"
        );
        let twice = format!(
            "{}{}",
            file_for(TOKEN),
            file_for(TOKEN).replace("alice", "carol")
        );
        assert!(
            Viewers::parse(&twice)
                .unwrap_err()
                .contains("another viewer's")
        );
        let unknown = "[[viewer]]\nname = \"bob\"\ntoken = \"x\"\n";
        assert!(Viewers::parse(unknown).unwrap_err().contains("token"));
        let bad_name = file_for(TOKEN).replace("alice", "Alice Smith");
        assert!(Viewers::parse(&bad_name).unwrap_err().contains("name"));
    }

    #[test]
    fn the_session_comes_from_the_cookie_and_the_token_from_the_bearer_header() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            format!("other=1; {}=v1:9:ab:ann", super::super::VIEWER_COOKIE)
                .parse()
                .unwrap(),
        );
        assert_eq!(
            Presented::of(&headers).session.as_deref(),
            Some("v1:9:ab:ann")
        );
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            format!("Bearer {TOKEN}").parse().unwrap(),
        );
        let presented = Presented::of(&headers);
        assert_eq!(presented.token.as_deref(), Some(TOKEN));
        // No session: the token names the viewer; a stale session does not hide it.
        let viewers = Viewers::parse(&file_for(TOKEN)).unwrap();
        let sessions = Sessions::default();
        assert!(presented.viewer(&viewers, &sessions, 1).is_some());
        let stale = Presented {
            session: Some("v1:9:ab:alice".into()),
            ..presented
        };
        assert!(stale.viewer(&viewers, &sessions, 1).is_some());
        assert!(check_token_text("a;b=c").is_err());
    }

    #[test]
    fn a_session_is_this_members_own_until_it_expires_or_signs_out() {
        let viewers = Viewers::parse(&file_for(TOKEN)).unwrap();
        let ann = viewers.find(TOKEN).unwrap();
        let sessions = Sessions::default();
        let cookie = sessions.sign(&ann, 1000);
        assert_eq!(
            sessions.check(&viewers, &cookie, 1000).unwrap().id(),
            "user:alice"
        );
        // Expired, signed by another member, altered: refused.
        assert!(
            sessions
                .check(&viewers, &cookie, 1000 + SESSION_LASTS_S)
                .is_none()
        );
        assert!(Sessions::default().check(&viewers, &cookie, 1000).is_none());
        let later = cookie.replacen(&(1000 + SESSION_LASTS_S).to_string(), "99999999999", 1);
        assert!(sessions.check(&viewers, &later, 1000).is_none());
        let renamed = format!("{}x", cookie);
        assert!(sessions.check(&viewers, &renamed, 1000).is_none());
        sessions.sign_out(&cookie, 1001);
        assert!(sessions.check(&viewers, &cookie, 1002).is_none());
        // Signing out again and again stays bounded, and what it lets go stays signed out.
        for now_s in 0..(MAX_SIGNED_OUT as u64 + 10) {
            let cookie = sessions.sign(&ann, 2000 + now_s);
            sessions.sign_out(&cookie, 2000);
        }
        assert!(sessions.signed_out.lock().unwrap().by_mac.len() <= MAX_SIGNED_OUT);
        assert!(sessions.check(&viewers, &cookie, 1002).is_none());
    }
}
