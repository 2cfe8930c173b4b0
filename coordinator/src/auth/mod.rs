//! Who may call the API: bearer tokens and their scopes (`docs/security.md`).
//!
//! Two kinds of bearer token are accepted when `TASKER_AUTH=on`:
//! - API tokens (`tsk_…`), made with `tasker-coordinator token create` and stored hashed
//!   in PostgreSQL ([`api_tokens`]); revoking one takes effect on the next request.
//! - JWTs signed by someone holding the HS256 secret or the RS256 private key ([`jwt`]).
//!
//! The [`Authenticator`] turns a token into a [`Principal`] (who, and which [`Scopes`]);
//! `http::auth` asks it on every guarded route and compares the scopes with the route's.
//!
//! ## Layout
//! - `scope`: the scopes and how they are parsed.
//! - `api_tokens`: generating, hashing and storing API tokens.
//! - `jwt`: verifying JWTs.
//! - `command`: `tasker-coordinator token create|list|revoke`.

pub(crate) mod api_tokens;
pub(crate) mod command;
pub(crate) mod jwt;
pub(crate) mod scope;

use std::path::Path;

use anyhow::Context;
use chrono::Utc;
use sqlx::PgPool;

use crate::settings::{AuthMode, AuthSettings};
use api_tokens::TokenState;
use jwt::{Expectations, JwtVerifier};
pub(crate) use scope::{Scope, Scopes};

/// Who called, once their token checked out.
#[derive(Debug, Clone)]
pub(crate) struct Principal {
    /// `token:<name>` or `jwt:<sub>`, for logs.
    pub(crate) subject: String,
    /// What the token grants.
    pub(crate) scopes: Scopes,
}

/// Why a token was refused (401). The reason is shown to the caller, so it names what is
/// wrong with the token without revealing anything stored.
#[derive(Debug)]
pub(crate) struct Rejection {
    pub(crate) reason: String,
}

impl Rejection {
    pub(crate) fn new(reason: impl Into<String>) -> Self {
        Rejection {
            reason: reason.into(),
        }
    }
}

/// Why a token could not be checked.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AuthError {
    /// The token is missing, malformed, unknown, revoked, expired or badly signed.
    #[error("{}", .0.reason)]
    Rejected(Rejection),
    /// The token store could not be read.
    #[error(transparent)]
    Store(#[from] sqlx::Error),
}

impl From<Rejection> for AuthError {
    fn from(rejection: Rejection) -> Self {
        AuthError::Rejected(rejection)
    }
}

/// The verifiers of an auth-on coordinator.
struct Verifiers {
    pool: PgPool,
    jwt: Option<JwtVerifier>,
}

/// Decides whether a request's bearer token is good, and what it grants.
pub(crate) struct Authenticator {
    /// `None`: authentication is off and every route is open.
    verifiers: Option<Verifiers>,
    /// Whether `/metrics` and `/health/status` need a token too.
    metrics_auth: bool,
}

impl Authenticator {
    /// Authentication off: every route is open.
    pub(crate) fn off() -> Self {
        Authenticator {
            verifiers: None,
            metrics_auth: false,
        }
    }

    /// Build from the settings, reading the RS256 key, and say loudly when it is off.
    /// Empty settings count as unset (an empty HS256 secret would let anyone sign).
    pub(crate) fn from_settings(settings: &AuthSettings, pool: PgPool) -> anyhow::Result<Self> {
        let hs256_secret = given(settings.jwt_hs256_secret.as_ref().map(|s| s.expose()));
        let rs256_key = given(settings.jwt_rs256_public_key.as_deref());
        if settings.mode == AuthMode::Off {
            tracing::warn!(
                "authentication is OFF (TASKER_AUTH=off): anyone who can reach the API can \
                 register templates and create, cancel, retry and resolve tasks. Set \
                 TASKER_AUTH=on for anything but a local run (docs/security.md)"
            );
            if hs256_secret.is_some() || rs256_key.is_some() || settings.metrics_auth {
                tracing::warn!(
                    "TASKER_JWT_* / TASKER_METRICS_AUTH are set but ignored while TASKER_AUTH=off"
                );
            }
            return Ok(Self::off());
        }
        // RFC 7518 §3.2: an HS256 key must be at least 256 bits. Refusing shorter ones also
        // keeps a forgotten placeholder (`CHANGE-ME`) from becoming a guessable key.
        if let Some(secret) = hs256_secret {
            anyhow::ensure!(
                secret.len() >= 32,
                "TASKER_JWT_HS256_SECRET is {} bytes long: it must be at least 32 (random; \
                 e.g. `openssl rand -base64 48`)",
                secret.len()
            );
        }
        let public_key = rs256_key.map(read_pem).transpose()?;
        let audience: Vec<String> = settings
            .jwt_audience
            .iter()
            .map(|aud| aud.trim().to_owned())
            .filter(|aud| !aud.is_empty())
            .collect();
        let jwt = JwtVerifier::new(
            hs256_secret.map(str::as_bytes),
            public_key.as_deref(),
            &Expectations {
                issuer: given(settings.jwt_issuer.as_deref()),
                audience: &audience,
                leeway_seconds: settings.jwt_leeway_seconds,
            },
        )?;
        let accepted = match &jwt {
            Some(jwt) => format!("API tokens and JWTs ({})", jwt.algorithms().join(", ")),
            None => "API tokens (no TASKER_JWT_* key: JWTs are refused)".to_owned(),
        };
        tracing::info!(
            accepted = %accepted,
            metrics_auth = settings.metrics_auth,
            "authentication is on: API calls need a bearer token"
        );
        Ok(Authenticator {
            verifiers: Some(Verifiers { pool, jwt }),
            metrics_auth: settings.metrics_auth,
        })
    }

    /// Whether tokens are checked at all.
    pub(crate) fn is_on(&self) -> bool {
        self.verifiers.is_some()
    }

    /// Whether the monitoring endpoints (`/metrics`, `/health/status`) need a token.
    pub(crate) fn monitoring_needs_token(&self) -> bool {
        self.is_on() && self.metrics_auth
    }

    /// Check a bearer token (without the `Bearer ` in front).
    pub(crate) async fn authenticate(&self, token: &str) -> Result<Principal, AuthError> {
        let Some(verifiers) = &self.verifiers else {
            return Err(Rejection::new("authentication is off").into());
        };
        if token.starts_with(api_tokens::PREFIX) {
            let Some(stored) = api_tokens::find_by_secret(&verifiers.pool, token).await? else {
                return Err(Rejection::new("unknown API token").into());
            };
            return match stored.state(Utc::now()) {
                TokenState::Active => Ok(Principal {
                    subject: format!("token:{}", stored.name),
                    scopes: stored.scopes(),
                }),
                TokenState::Revoked => Err(Rejection::new("the API token was revoked").into()),
                TokenState::Expired => Err(Rejection::new("the API token expired").into()),
            };
        }
        if token.split('.').count() == 3 {
            return match &verifiers.jwt {
                Some(jwt) => Ok(jwt.verify(token)?),
                None => Err(Rejection::new(
                    "this coordinator accepts no JWTs (no TASKER_JWT_HS256_SECRET or \
                     TASKER_JWT_RS256_PUBLIC_KEY is set)",
                )
                .into()),
            };
        }
        Err(Rejection::new("neither a Tasker API token (tsk_…) nor a JWT").into())
    }
}

/// A setting's value, `None` when unset or blank.
fn given(value: Option<&str>) -> Option<&str> {
    value.map(str::trim).filter(|value| !value.is_empty())
}

/// `TASKER_JWT_RS256_PUBLIC_KEY`: the PEM text itself (it starts with `-----BEGIN`), or
/// the path of a file holding it (a mounted Secret).
fn read_pem(value: &str) -> anyhow::Result<Vec<u8>> {
    if value.trim_start().starts_with("-----BEGIN") {
        return Ok(value.as_bytes().to_vec());
    }
    std::fs::read(Path::new(value)).with_context(|| {
        format!(
            "TASKER_JWT_RS256_PUBLIC_KEY is neither PEM text (-----BEGIN …) nor a readable file: {value}"
        )
    })
}
