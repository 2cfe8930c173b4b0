//! Opaque API tokens: `tsk_` and 64 hex digits (32 random bytes from the operating
//! system), stored as their SHA-256 only (table `api_tokens`, migration 0004).
//!
//! A plain hash, not a password hash (argon2, bcrypt), is the right tool here: the secret
//! is 256 random bits, not something a person chose, so there is nothing to brute-force
//! and a slow hash would only slow every request. Lookup is by the hash (a unique index):
//! an attacker timing the index cannot steer it, since finding a secret whose hash shares
//! a prefix with a stored one gains nothing towards that hash's preimage.

use chrono::{DateTime, Utc};
use rand::TryRngCore;
use rand::rngs::OsRng;
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use uuid::Uuid;

use super::scope::Scopes;

/// What every API token starts with, so it is told apart from a JWT (and found by secret
/// scanners).
pub(crate) const PREFIX: &str = "tsk_";

/// How long `last_used_at` may lag: it is written at most this often per token, so
/// reading it costs no write on most requests.
const LAST_USED_RESOLUTION_SECONDS: i64 = 60;

/// A new token's secret: shown once, never stored.
pub(crate) fn generate_secret() -> anyhow::Result<String> {
    let mut bytes = [0u8; 32];
    OsRng
        .try_fill_bytes(&mut bytes)
        .map_err(|error| anyhow::anyhow!("the operating system's random source failed: {error}"))?;
    let mut secret = String::with_capacity(PREFIX.len() + 64);
    secret.push_str(PREFIX);
    for byte in bytes {
        secret.push_str(&format!("{byte:02x}"));
    }
    Ok(secret)
}

/// What is stored of a secret.
pub(crate) fn hash(secret: &str) -> Vec<u8> {
    Sha256::digest(secret.as_bytes()).to_vec()
}

/// A stored token (never its secret).
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct ApiToken {
    pub(crate) token_id: Uuid,
    pub(crate) name: String,
    pub(crate) scopes: Vec<String>,
    pub(crate) created_at: DateTime<Utc>,
    pub(crate) expires_at: Option<DateTime<Utc>>,
    pub(crate) revoked_at: Option<DateTime<Utc>>,
    pub(crate) last_used_at: Option<DateTime<Utc>>,
}

impl ApiToken {
    /// The granted scopes (names a newer version may have stored are skipped).
    pub(crate) fn scopes(&self) -> Scopes {
        Scopes::parse_lenient(self.scopes.iter().map(String::as_str))
    }

    /// Whether the token may be used at `now`.
    pub(crate) fn state(&self, now: DateTime<Utc>) -> TokenState {
        if self.revoked_at.is_some() {
            TokenState::Revoked
        } else if self.expires_at.is_some_and(|at| at <= now) {
            TokenState::Expired
        } else {
            TokenState::Active
        }
    }
}

/// Whether a stored token may be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TokenState {
    Active,
    Revoked,
    Expired,
}

impl TokenState {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            TokenState::Active => "active",
            TokenState::Revoked => "revoked",
            TokenState::Expired => "expired",
        }
    }
}

const COLUMNS: &str = "token_id, name, scopes, created_at, expires_at, revoked_at, last_used_at";

/// Store a new token; answers it with its secret. Fails when an active token already has
/// this name.
pub(crate) async fn create(
    pool: &PgPool,
    name: &str,
    scopes: &Scopes,
    expires_at: Option<DateTime<Utc>>,
) -> anyhow::Result<(ApiToken, String)> {
    let secret = generate_secret()?;
    let sql = format!(
        "INSERT INTO api_tokens (token_id, name, secret_hash, scopes, expires_at)
         VALUES ($1, $2, $3, $4, $5) RETURNING {COLUMNS}"
    );
    let token = sqlx::query_as::<_, ApiToken>(sqlx::AssertSqlSafe(sql))
        .bind(Uuid::now_v7())
        .bind(name)
        .bind(hash(&secret))
        .bind(scopes.names())
        .bind(expires_at)
        .fetch_one(pool)
        .await
        .map_err(|error| match &error {
            sqlx::Error::Database(db) if db.is_unique_violation() => anyhow::anyhow!(
                "an active token is already named `{name}`: revoke it first or choose another name"
            ),
            _ => anyhow::Error::new(error).context("storing the token"),
        })?;
    Ok((token, secret))
}

/// Every token, revoked ones included, oldest first.
pub(crate) async fn list(pool: &PgPool) -> sqlx::Result<Vec<ApiToken>> {
    let sql = format!("SELECT {COLUMNS} FROM api_tokens ORDER BY created_at, token_id");
    sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .fetch_all(pool)
        .await
}

/// Revoke the token with this id, or the active one with this name. Answers the revoked
/// token, or `None` when nothing active matched.
pub(crate) async fn revoke(pool: &PgPool, id_or_name: &str) -> sqlx::Result<Option<ApiToken>> {
    let sql = format!(
        "UPDATE api_tokens SET revoked_at = now()
         WHERE revoked_at IS NULL AND (token_id = $1 OR ($1 IS NULL AND name = $2))
         RETURNING {COLUMNS}"
    );
    sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(Uuid::parse_str(id_or_name).ok())
        .bind(id_or_name)
        .fetch_optional(pool)
        .await
}

/// The token whose secret this is, revoked or expired ones included (the caller says
/// which); notes its use.
pub(crate) async fn find_by_secret(pool: &PgPool, secret: &str) -> sqlx::Result<Option<ApiToken>> {
    let sql = format!("SELECT {COLUMNS} FROM api_tokens WHERE secret_hash = $1");
    let token: Option<ApiToken> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(hash(secret))
        .fetch_optional(pool)
        .await?;
    if let Some(token) = &token {
        let stale = token
            .last_used_at
            .is_none_or(|at| (Utc::now() - at).num_seconds() >= LAST_USED_RESOLUTION_SECONDS);
        if stale && token.revoked_at.is_none() {
            sqlx::query("UPDATE api_tokens SET last_used_at = now() WHERE token_id = $1")
                .bind(token.token_id)
                .execute(pool)
                .await?;
        }
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_prefixed_random_hex_and_hashed_to_32_bytes() {
        let a = generate_secret().unwrap();
        let b = generate_secret().unwrap();
        assert_ne!(a, b);
        assert!(a.starts_with(PREFIX));
        assert_eq!(a.len(), PREFIX.len() + 64);
        assert!(a[PREFIX.len()..].chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(hash(&a).len(), 32);
        assert_eq!(hash(&a), hash(&a.clone()));
        assert_ne!(hash(&a), hash(&b));
    }
}
