//! API tokens: made here, stored hashed, looked up by the hash of the secret a call presents.
//!
//! A secret is 32 random bytes (`ferry_` and 64 hex digits) and only its SHA-256 is stored:
//! a copy of the store grants nothing. At first start an admin token is made and its secret
//! written to `<data-dir>/admin.token` (mode 0600), or `--bootstrap-token` sets that secret.
//! Revoking a token ends the config streams opened with it.

use ferry_runtime::lock;
use std::{
    collections::HashMap,
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use aws_lc_rs::digest;
use ferry_proto::{time::timestamp, v1, validate};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::Principal;
use crate::store::{Store, StoreError, Table, Write};

/// The id of the admin token a control plane makes for itself at first start.
pub const BOOTSTRAP_ID: &str = "bootstrap";
/// The file the bootstrap secret is written to, under the data directory.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

/// What is stored of a token.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct Stored {
    id: String,
    kind: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    service: String,
    created_at: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expires_at: Option<u64>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    description: String,
    /// SHA-256 of the secret, hex.
    sha256: String,
}

impl Stored {
    /// The bootstrap admin token, made now.
    fn bootstrap(description: &str, sha256: String) -> Self {
        Self {
            id: BOOTSTRAP_ID.into(),
            kind: "admin".into(),
            service: String::new(),
            created_at: seconds(SystemTime::now()),
            expires_at: None,
            description: description.into(),
            sha256,
        }
    }
}

/// Why a token operation failed.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("{0}")]
    Invalid(#[from] validate::FieldError),
    #[error("no token with id {0:?}")]
    NotFound(String),
    #[error("not persisted: {0}")]
    Store(#[from] StoreError),
}

/// Every token of the mesh.
pub struct Tokens {
    store: Arc<dyn Store>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    by_id: HashMap<String, Stored>,
    /// Hash of the secret to the id.
    by_hash: HashMap<String, String>,
    /// Fired when a token is revoked: the streams it opened end.
    revoked: HashMap<String, CancellationToken>,
}

fn sha256(secret: &str) -> String {
    digest::digest(&digest::SHA256, secret.trim().as_bytes()).as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

fn seconds(time: SystemTime) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs()
}

fn kind_name(kind: v1::TokenKind) -> &'static str {
    match kind {
        v1::TokenKind::Admin => "admin",
        v1::TokenKind::Read => "read",
        v1::TokenKind::Sidecar => "sidecar",
        v1::TokenKind::Unspecified => "unspecified",
    }
}

/// A new random secret.
pub fn new_secret() -> String {
    let bytes: [u8; 32] = rand::random();
    format!("ferry_{}", bytes.iter().map(|b| format!("{b:02x}")).collect::<String>())
}

impl Stored {
    fn principal(&self) -> Option<Principal> {
        let id: Arc<str> = self.id.as_str().into();
        match self.kind.as_str() {
            "admin" => Some(Principal::Admin { id }),
            "read" => Some(Principal::Read { id }),
            "sidecar" => Some(Principal::Sidecar { id, service: self.service.as_str().into() }),
            _ => None,
        }
    }

    fn expired(&self, now: SystemTime) -> bool {
        self.expires_at.is_some_and(|at| seconds(now) >= at)
    }

    fn to_proto(&self) -> v1::Token {
        let kind = match self.kind.as_str() {
            "admin" => v1::TokenKind::Admin,
            "read" => v1::TokenKind::Read,
            "sidecar" => v1::TokenKind::Sidecar,
            _ => v1::TokenKind::Unspecified,
        };
        let at = |secs: u64| timestamp(SystemTime::UNIX_EPOCH + Duration::from_secs(secs));
        v1::Token {
            id: self.id.clone(),
            kind: kind as i32,
            service: self.service.clone(),
            created_at: Some(at(self.created_at)),
            expires_at: self.expires_at.map(at),
            description: self.description.clone(),
        }
    }
}

impl Tokens {
    /// The tokens kept in `store`.
    pub async fn open(store: Arc<dyn Store>) -> Result<Arc<Self>, StoreError> {
        let mut state = State::default();
        for (key, value) in store.load(Table::Tokens).await? {
            // A row that does not decode is set aside: the other tokens still work.
            let stored: Stored = match serde_json::from_slice(&value) {
                Ok(stored) => stored,
                Err(e) => {
                    let reason = format!("does not decode as a token: {e}");
                    crate::store::set_aside::set_aside(&*store, Table::Tokens, &key, &value, &reason).await?;
                    continue;
                }
            };
            state.by_hash.insert(stored.sha256.clone(), stored.id.clone());
            state.by_id.insert(stored.id.clone(), stored);
        }
        Ok(Arc::new(Self { store, state: Mutex::new(state) }))
    }

    /// Makes sure an admin token exists: `secret` becomes the bootstrap token's secret when
    /// given; otherwise, when the mesh has no admin token, one is made and its secret written
    /// to `<data_dir>/admin.token` (mode 0600). Logs the file, never the secret.
    pub async fn bootstrap(&self, data_dir: &Path, secret: Option<&str>) -> anyhow::Result<()> {
        if let Some(secret) = secret {
            let hash = sha256(secret);
            let current = lock(&self.state).by_id.get(BOOTSTRAP_ID).map(|t| t.sha256.clone());
            if current.as_deref() != Some(hash.as_str()) {
                self.put(Stored::bootstrap("--bootstrap-token", hash)).await?;
                tracing::info!(id = BOOTSTRAP_ID, "the admin token is the one --bootstrap-token gives");
            }
            return Ok(());
        }
        let has_admin = lock(&self.state).by_id.values().any(|t| t.kind == "admin");
        let file = data_dir.join(ADMIN_TOKEN_FILE);
        if has_admin {
            if file.exists() {
                tracing::info!(file = %file.display(), "admin token in");
            }
            return Ok(());
        }
        let secret = new_secret();
        let stored = Stored::bootstrap("made at first start", sha256(&secret));
        let value = serde_json::to_vec(&stored)?;
        // Created only if absent: replicas that start together on an empty shared store agree
        // on one admin token, and only the one that made it has its secret.
        let held = self.store.create(Table::Tokens, BOOTSTRAP_ID.to_owned(), value.clone()).await?;
        if held != value {
            self.apply_stored(BOOTSTRAP_ID, Some(&held));
            tracing::info!("another replica made the admin token first; its secret is in that replica's data directory");
            return Ok(());
        }
        std::fs::create_dir_all(data_dir)?;
        crate::ca::write_file(&file, &format!("{secret}\n"), 0o600)?;
        self.apply_stored(BOOTSTRAP_ID, Some(&value));
        tracing::info!(file = %file.display(), "created an admin token; its secret is in the file (mode 0600)");
        Ok(())
    }

    /// The id of every token.
    pub fn ids(&self) -> Vec<String> {
        lock(&self.state).by_id.keys().cloned().collect()
    }

    /// Applies a token as the shared store reports it (`None`: revoked).
    pub fn apply_stored(&self, id: &str, value: Option<&[u8]>) {
        let mut state = lock(&self.state);
        match value {
            Some(value) => match serde_json::from_slice::<Stored>(value) {
                Ok(stored) => {
                    if let Some(old) = state.by_id.insert(stored.id.clone(), stored.clone()) {
                        state.by_hash.remove(&old.sha256);
                    }
                    state.by_hash.insert(stored.sha256.clone(), stored.id);
                }
                Err(error) => tracing::warn!(id, %error, "ignoring a token in the store that does not decode"),
            },
            None => {
                if let Some(old) = state.by_id.remove(id) {
                    state.by_hash.remove(&old.sha256);
                }
                if let Some(revoked) = state.revoked.remove(id) {
                    revoked.cancel();
                }
            }
        }
    }

    /// Who presents `secret`, if it is a live token.
    pub fn authenticate(&self, secret: &str) -> Option<Principal> {
        let state = lock(&self.state);
        let id = state.by_hash.get(&sha256(secret))?;
        let stored = state.by_id.get(id)?;
        if stored.expired(SystemTime::now()) {
            return None;
        }
        stored.principal()
    }

    /// When the token `id` expires, if it does.
    pub fn expires_at(&self, id: &str) -> Option<SystemTime> {
        let state = lock(&self.state);
        state.by_id.get(id)?.expires_at.map(|at| SystemTime::UNIX_EPOCH + Duration::from_secs(at))
    }

    /// Fires when the token `id` is revoked.
    pub fn revoked(&self, id: &str) -> CancellationToken {
        let mut state = lock(&self.state);
        let exists = state.by_id.contains_key(id);
        let token = state.revoked.entry(id.to_owned()).or_default().clone();
        if !exists {
            token.cancel();
        }
        // Forget the tokens nobody waits on any more (a clone is held by each waiter).
        state.revoked.retain(|_, t| !t.is_cancelled());
        token
    }

    /// Makes a token; returns it and its secret.
    pub async fn create(
        &self,
        kind: v1::TokenKind,
        service: &str,
        ttl: Option<Duration>,
        description: &str,
    ) -> Result<(v1::Token, String), TokenError> {
        match kind {
            v1::TokenKind::Sidecar => validate::service_name("service", service)
                .map_err(|e| validate::FieldError::new("service", format!("a sidecar token needs its service: {}", e.reason)))?,
            v1::TokenKind::Admin | v1::TokenKind::Read if !service.is_empty() => {
                return Err(validate::FieldError::new("service", "only sidecar tokens are bound to a service").into());
            }
            v1::TokenKind::Admin | v1::TokenKind::Read => {}
            v1::TokenKind::Unspecified => {
                return Err(
                    validate::FieldError::new("kind", "must be TOKEN_KIND_ADMIN, TOKEN_KIND_READ or TOKEN_KIND_SIDECAR").into()
                );
            }
        }
        if description.len() > 256 {
            return Err(validate::FieldError::new("description", "must be at most 256 characters").into());
        }
        if let Some(ttl) = ttl
            && (ttl < Duration::from_secs(1) || ttl > validate::MAX_DURATION)
        {
            return Err(validate::FieldError::new("ttl", "must be 1s to 365 days").into());
        }
        let secret = new_secret();
        let id = format!("{}-{:012x}", kind_name(kind), rand::random::<u64>() >> 16);
        let now = SystemTime::now();
        let stored = Stored {
            id,
            kind: kind_name(kind).into(),
            service: service.to_owned(),
            created_at: seconds(now),
            expires_at: ttl.map(|ttl| seconds(now + ttl)),
            description: description.to_owned(),
            sha256: sha256(&secret),
        };
        let token = stored.to_proto();
        self.put(stored).await?;
        Ok((token, secret))
    }

    /// Every token, by id.
    pub fn list(&self) -> Vec<v1::Token> {
        let state = lock(&self.state);
        let mut tokens: Vec<v1::Token> = state.by_id.values().map(Stored::to_proto).collect();
        tokens.sort_by(|a, b| a.id.cmp(&b.id));
        tokens
    }

    /// Deletes the token `id`; the streams it opened end.
    pub async fn revoke(&self, id: &str) -> Result<v1::Token, TokenError> {
        let stored = lock(&self.state).by_id.get(id).cloned().ok_or_else(|| TokenError::NotFound(id.to_owned()))?;
        self.store.apply(vec![Write { table: Table::Tokens, key: id.to_owned(), value: None }]).await?;
        let mut state = lock(&self.state);
        state.by_id.remove(id);
        state.by_hash.remove(&stored.sha256);
        if let Some(revoked) = state.revoked.remove(id) {
            revoked.cancel();
        }
        Ok(stored.to_proto())
    }

    /// Stores a token, acknowledged once durable.
    async fn put(&self, stored: Stored) -> Result<(), StoreError> {
        let value = serde_json::to_vec(&stored).map_err(|e| StoreError::new(e.to_string()))?;
        self.store.apply(vec![Write { table: Table::Tokens, key: stored.id.clone(), value: Some(value) }]).await?;
        let mut state = lock(&self.state);
        if let Some(old) = state.by_id.insert(stored.id.clone(), stored.clone()) {
            state.by_hash.remove(&old.sha256);
        }
        state.by_hash.insert(stored.sha256.clone(), stored.id);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    #[tokio::test]
    async fn secrets_are_stored_hashed_and_revocation_ends_streams() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
        let tokens = Tokens::open(store.clone()).await.expect("open");
        let (token, secret) = tokens.create(v1::TokenKind::Sidecar, "catalog", None, "").await.expect("created");
        let stored = store.load(Table::Tokens).await.expect("load");
        assert!(!String::from_utf8_lossy(&stored[0].1).contains(&secret), "the secret is never stored");
        assert!(matches!(tokens.authenticate(&secret), Some(Principal::Sidecar { service, .. }) if &*service == "catalog"));
        assert!(tokens.authenticate("ferry_nope").is_none());
        let streams = tokens.revoked(&token.id);
        assert!(!streams.is_cancelled());
        tokens.revoke(&token.id).await.expect("revoked");
        assert!(streams.is_cancelled(), "the streams it opened end");
        assert!(tokens.authenticate(&secret).is_none());
        let reopened = Tokens::open(store).await.expect("reopen");
        assert!(reopened.list().is_empty());
    }

    #[tokio::test]
    async fn the_bootstrap_secret_goes_to_a_private_file_once() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
        let tokens = Tokens::open(store.clone()).await.expect("open");
        tokens.bootstrap(dir.path(), None).await.expect("bootstrap");
        let file = dir.path().join(ADMIN_TOKEN_FILE);
        assert_eq!(std::fs::metadata(&file).expect("file").permissions().mode() & 0o777, 0o600);
        let secret = std::fs::read_to_string(&file).expect("secret");
        assert!(matches!(tokens.authenticate(&secret), Some(Principal::Admin { .. })));
        let again = Tokens::open(store).await.expect("reopen");
        again.bootstrap(dir.path(), None).await.expect("again");
        assert_eq!(std::fs::read_to_string(&file).expect("secret"), secret, "made once");
        again.bootstrap(dir.path(), Some("ferry_chosen")).await.expect("chosen");
        assert!(again.authenticate("ferry_chosen").is_some());
        assert!(again.authenticate(&secret).is_none(), "the bootstrap token's secret was replaced");
    }

    #[tokio::test]
    async fn expired_tokens_authenticate_nobody() {
        let tokens = Tokens::open(Arc::new(MemoryStore::default())).await.expect("open");
        assert!(tokens.create(v1::TokenKind::Read, "catalog", None, "").await.is_err(), "a read token has no service");
        assert!(tokens.create(v1::TokenKind::Sidecar, "", None, "").await.is_err(), "a sidecar token needs one");
        let (_, secret) = tokens.create(v1::TokenKind::Read, "", Some(Duration::from_secs(1)), "").await.expect("created");
        assert!(tokens.authenticate(&secret).is_some());
        let mut state = lock(&tokens.state);
        for token in state.by_id.values_mut() {
            token.expires_at = Some(0);
        }
        drop(state);
        assert!(tokens.authenticate(&secret).is_none());
    }
}
