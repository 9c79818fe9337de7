//! Viewer tokens: `http.viewer-tokens-file` binds each token (by its SHA-256, so the file holds
//! no secret) to a person's identity and groups, judged by the access policy as `user:<name>`.
//!
//! ```toml
//! [[viewer]]
//! name = "alice"
//! groups = ["sre"]
//! token-sha256 = "<64 lower-case hex digits: sha256 of the token>"
//! ```

use std::collections::HashMap;
use std::path::Path;

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
            if by_digest.insert(digest, principal).is_some() {
                return Err(format!("{at}: its token is another viewer's too"));
            }
        }
        Ok(Self { by_digest })
    }

    /// The viewer `token` belongs to.
    pub fn find(&self, token: &str) -> Option<Principal> {
        check_token_text(token).ok()?;
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        self.by_digest.get(&digest).cloned()
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

/// The token a request presents: its viewer cookie, or `Authorization: Bearer <token>`.
pub fn presented_token(headers: &HeaderMap) -> Option<&str> {
    let from_cookie = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == super::VIEWER_COOKIE)
        .map(|(_, token)| token);
    from_cookie.or_else(|| {
        headers
            .get(header::AUTHORIZATION)?
            .to_str()
            .ok()?
            .strip_prefix("Bearer ")
    })
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
    fn the_token_comes_from_the_cookie_or_the_bearer_header() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            format!("other=1; {}={TOKEN}", super::super::VIEWER_COOKIE)
                .parse()
                .unwrap(),
        );
        assert_eq!(presented_token(&headers), Some(TOKEN));
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            format!("Bearer {TOKEN}").parse().unwrap(),
        );
        assert_eq!(presented_token(&headers), Some(TOKEN));
        assert!(check_token_text("a;b=c").is_err());
    }
}
