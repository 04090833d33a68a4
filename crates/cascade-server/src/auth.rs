//! API keys with scopes, as a tower layer on the `cascade.v1.Cascade`
//! service (health and reflection stay open for probes).
//!
//! The keys file holds no secrets: one key per line as `SCOPES SHA256 [NAME]`,
//! where SCOPES is a comma list of `predict`, `events` and `admin`, and
//! SHA256 is the hex digest of the key (`cascade api-key` makes one). A
//! caller sends `authorization: Bearer <key>`. A missing or unknown key is
//! UNAUTHENTICATED; a key without the RPC's scope is PERMISSION_DENIED.
//! Digests are compared in constant time, against every key.

use std::path::Path;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::Status;

/// What a key may call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Predict, Rank, Retrieve, GetModelInfo.
    Predict,
    /// RecordEvents.
    Events,
    /// ReloadModel.
    Admin,
}

impl Scope {
    fn bit(self) -> u8 {
        match self {
            Scope::Predict => 1,
            Scope::Events => 2,
            Scope::Admin => 4,
        }
    }

    /// The scope an RPC path needs; `None` for paths outside the service
    /// (they get UNIMPLEMENTED from the router anyway).
    fn of_path(path: &str) -> Option<Scope> {
        match path.rsplit('/').next()? {
            "Predict" | "Rank" | "Retrieve" | "GetModelInfo" => Some(Scope::Predict),
            "RecordEvents" => Some(Scope::Events),
            "ReloadModel" => Some(Scope::Admin),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error("{path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {msg}")]
    Line {
        path: String,
        line: usize,
        msg: String,
    },
    #[error("{path}: no keys (a keys file with none would refuse every call)")]
    Empty { path: String },
}

struct Key {
    digest: [u8; 32],
    scopes: u8,
    name: String,
}

/// The accepted keys.
#[derive(Clone)]
pub struct ApiKeys(Arc<Vec<Key>>);

impl ApiKeys {
    /// Read a keys file (see the module docs).
    pub fn load(path: &Path) -> Result<Self, KeysError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| KeysError::Read {
            path: name.clone(),
            source,
        })?;
        Self::parse(&text, &name)
    }

    fn parse(text: &str, path: &str) -> Result<Self, KeysError> {
        let mut keys = Vec::new();
        for (n, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |msg: String| KeysError::Line {
                path: path.to_string(),
                line: n + 1,
                msg,
            };
            let mut parts = line.split_whitespace();
            let (Some(scopes), Some(hex_digest)) = (parts.next(), parts.next()) else {
                return Err(bad("expected `SCOPES SHA256 [NAME]`".into()));
            };
            let mut bits = 0;
            for s in scopes.split(',') {
                bits |= match s {
                    "predict" => Scope::Predict.bit(),
                    "events" => Scope::Events.bit(),
                    "admin" => Scope::Admin.bit(),
                    other => {
                        return Err(bad(format!(
                            "unknown scope {other:?} (expected predict, events or admin)"
                        )))
                    }
                };
            }
            let mut digest = [0u8; 32];
            hex::decode_to_slice(hex_digest, &mut digest).map_err(|_| {
                bad(
                    "the second field must be the key's SHA-256 as 64 hex digits (not the key)"
                        .into(),
                )
            })?;
            keys.push(Key {
                digest,
                scopes: bits,
                name: parts.next().unwrap_or("").to_string(),
            });
        }
        if keys.is_empty() {
            return Err(KeysError::Empty {
                path: path.to_string(),
            });
        }
        Ok(Self(Arc::new(keys)))
    }

    /// Check one keys-file line (for `cascade api-key`).
    pub fn parse_line(line: &str) -> Result<(), KeysError> {
        Self::parse(line, "the new line").map(|_| ())
    }

    /// A new random key and its keys-file line for `scopes`.
    pub fn generate(scopes: &str, name: &str) -> (String, String) {
        let key: [u8; 32] = rand::random();
        // The prefix tells a key from a digest (and makes leaked keys easy to grep for).
        let key = format!("csk_{}", hex::encode(key));
        let line = format!(
            "{scopes} {} {name}",
            hex::encode(Sha256::digest(key.as_bytes()))
        );
        (key, line.trim_end().to_string())
    }

    /// Check a request's `authorization` header for `scope`.
    fn check(&self, header: Option<&http::HeaderValue>, scope: Scope) -> Result<(), Status> {
        let key = header
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or_else(|| {
                Status::unauthenticated("an API key is required: `authorization: Bearer <key>`")
            })?;
        let digest = Sha256::digest(key.as_bytes());
        // Every key is compared, whether or not an earlier one matched.
        let mut found: Option<&Key> = None;
        for k in self.0.iter() {
            if bool::from(k.digest.ct_eq(digest.as_slice())) {
                found = Some(k);
            }
        }
        let k = found.ok_or_else(|| Status::unauthenticated("unknown API key"))?;
        if k.scopes & scope.bit() == 0 {
            tracing::debug!(key = %k.name, "API key without the {scope:?} scope");
            return Err(Status::permission_denied(format!(
                "this API key does not have the {} scope",
                format!("{scope:?}").to_lowercase()
            )));
        }
        Ok(())
    }
}

/// Checks keys when some are configured and passes every request otherwise.
#[derive(Clone, Default)]
pub struct MaybeApiKeys(pub Option<ApiKeys>);

impl crate::gate::Gate for MaybeApiKeys {
    type Pass = ();

    fn check(&self, path: &str, headers: &http::HeaderMap) -> Result<(), Status> {
        match (&self.0, Scope::of_path(path)) {
            (Some(keys), Some(scope)) => keys.check(headers.get("authorization"), scope),
            _ => Ok(()),
        }
    }
}

impl<S> tower::Layer<S> for MaybeApiKeys {
    type Service = crate::gate::Gated<S, MaybeApiKeys>;
    fn layer(&self, inner: S) -> Self::Service {
        crate::gate::Gated::new(inner, self.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_files_are_parsed_and_bad_lines_named() {
        let (key, line) = ApiKeys::generate("predict,events", "web");
        let keys = ApiKeys::parse(&format!("# comment\n\n{line}\n"), "keys").unwrap();
        let bearer = http::HeaderValue::from_str(&format!("Bearer {key}")).unwrap();
        assert!(keys.check(Some(&bearer), Scope::Predict).is_ok());
        assert!(keys.check(Some(&bearer), Scope::Events).is_ok());
        let e = keys.check(Some(&bearer), Scope::Admin).unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        let e = keys.check(None, Scope::Predict).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        let wrong = http::HeaderValue::from_static("Bearer nope");
        let e = keys.check(Some(&wrong), Scope::Predict).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        // The file holds the digest, never the key.
        assert!(!line.contains(&key));
        for (text, says) in [
            ("predict\n", "keys:1: expected"),
            (
                &format!("# c\nread {}\n", "0".repeat(64)),
                "keys:2: unknown scope \"read\"",
            ),
            (&format!("admin {key}\n"), "keys:1: the second field"),
            ("# only comments\n", "no keys"),
        ] {
            let e = ApiKeys::parse(text, "keys").err().expect(says);
            assert!(e.to_string().contains(says), "{says}: {e}");
        }
    }

    #[test]
    fn rpcs_need_their_scope() {
        let p = |m: &str| Scope::of_path(&format!("/cascade.v1.Cascade/{m}"));
        assert_eq!(p("Predict"), Some(Scope::Predict));
        assert_eq!(p("GetModelInfo"), Some(Scope::Predict));
        assert_eq!(p("RecordEvents"), Some(Scope::Events));
        assert_eq!(p("ReloadModel"), Some(Scope::Admin));
        assert_eq!(p("Other"), None);
    }
}
