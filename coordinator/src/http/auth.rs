//! The API's gate: each route of [`super::routes`] names its [`Access`], and [`guard`]
//! wraps its handler in a middleware that asks the [`Authenticator`] about the request's
//! bearer token. Handlers never see authentication; a request that reaches one is allowed.
//!
//! Answers, in the API's error shape and with the `WWW-Authenticate` header of RFC 6750:
//! - 401 `unauthenticated`: no bearer token, or one that is malformed, unknown, revoked,
//!   expired or badly signed;
//! - 403 `insufficient_scope`: a good token without the route's scope (named in the
//!   message and in `details`).

use std::sync::Arc;

use axum::extract::Request;
use axum::http::header::{AUTHORIZATION, WWW_AUTHENTICATE};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{Next, from_fn};
use axum::response::{IntoResponse, Response};
use axum::routing::MethodRouter;
use serde_json::json;
use utoipa::Modify;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};

use super::AppState;
use super::error::ApiError;
use crate::auth::{AuthError, Authenticator, Principal, Scope};

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    /// Anyone, always: probes (`/health/live`, `/health/ready`) and `/openapi.json`.
    Open,
    /// Monitoring (`/metrics`, `/health/status`): open, unless `TASKER_METRICS_AUTH=on`,
    /// then `metrics:read`.
    Monitoring,
    /// A token with this scope (or `admin`), when authentication is on.
    Scope(Scope),
}

/// The scheme's name in the OpenAPI document.
const SCHEME: &str = "bearer";

/// Wrap a route's handler so it runs only for callers `access` lets in. The
/// [`Authenticator`] is read from the request's extensions (put there by
/// [`super::router`]); without one, guarded routes refuse every request.
pub(crate) fn guard(access: Access, handler: MethodRouter<AppState>) -> MethodRouter<AppState> {
    match access {
        Access::Open => handler,
        Access::Monitoring | Access::Scope(_) => {
            handler.route_layer(from_fn(move |request: Request, next: Next| {
                check(access, request, next)
            }))
        }
    }
}

async fn check(access: Access, mut request: Request, next: Next) -> Response {
    let Some(authenticator) = request.extensions().get::<Arc<Authenticator>>().cloned() else {
        return ApiError::internal(anyhow::anyhow!(
            "a guarded route was called without an Authenticator: refusing"
        ))
        .into_response();
    };
    let needed = match access {
        Access::Open => None,
        Access::Monitoring => authenticator
            .monitoring_needs_token()
            .then_some(Scope::MetricsRead),
        Access::Scope(scope) => authenticator.is_on().then_some(scope),
    };
    let Some(needed) = needed else {
        return next.run(request).await;
    };
    let token = match bearer_token(request.headers()) {
        Ok(token) => token,
        Err(reason) => return unauthorized(reason),
    };
    match authenticator.authenticate(&token).await {
        Ok(principal) if principal.scopes.allows(needed) => {
            tracing::debug!(subject = %principal.subject, scope = %needed, "authorised");
            request.extensions_mut().insert(principal);
            next.run(request).await
        }
        Ok(principal) => forbidden(needed, &principal),
        Err(AuthError::Rejected(rejection)) => {
            tracing::debug!(reason = %rejection.reason, "bearer token refused");
            unauthorized(Some(&rejection.reason))
        }
        Err(AuthError::Store(error)) => ApiError::from(error).into_response(),
    }
}

/// The token of `Authorization: Bearer <token>`; else why not, for [`unauthorized`]
/// (`None`: no credentials at all).
pub(crate) fn bearer_token(headers: &HeaderMap) -> Result<String, Option<&'static str>> {
    let mut values = headers.get_all(AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Err(None);
    };
    if values.next().is_some() {
        return Err(Some("more than one Authorization header"));
    }
    let value = value
        .to_str()
        .map_err(|_| Some("the Authorization header is not ASCII"))?;
    let (scheme, token) = value.trim().split_once(' ').unwrap_or((value, ""));
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(Some("the Authorization header must be `Bearer <token>`"));
    }
    let token = token.trim();
    if token.is_empty() {
        return Err(Some("the bearer token is empty"));
    }
    Ok(token.to_owned())
}

/// The 401 answer. Without a reason (no credentials at all) the challenge carries no
/// error, as RFC 6750 asks; with one, `error="invalid_token"` and the reason.
fn unauthorized(reason: Option<&str>) -> Response {
    let (challenge, message) = match reason {
        None => (
            r#"Bearer realm="tasker""#.to_owned(),
            "this call needs a bearer token: send `Authorization: Bearer <token>`".to_owned(),
        ),
        Some(reason) => (
            format!(
                r#"Bearer realm="tasker", error="invalid_token", error_description="{}""#,
                quotable(reason)
            ),
            format!("the bearer token was refused: {reason}"),
        ),
    };
    let error = ApiError::new(StatusCode::UNAUTHORIZED, "unauthenticated", message);
    with_challenge(&challenge, error)
}

/// The 403 answer, naming the scope the call needs.
fn forbidden(needed: Scope, principal: &Principal) -> Response {
    tracing::debug!(subject = %principal.subject, scope = %needed, "scope missing");
    let error = ApiError::new(
        StatusCode::FORBIDDEN,
        "insufficient_scope",
        format!(
            "this call needs the scope `{needed}` (or `admin`); the token grants: {}",
            principal.scopes
        ),
    )
    .with_details(vec![json!({
        "required_scope": needed.as_str(),
        "granted_scopes": principal.scopes.names(),
    })]);
    let challenge =
        format!(r#"Bearer realm="tasker", error="insufficient_scope", scope="{needed}""#);
    with_challenge(&challenge, error)
}

fn with_challenge(challenge: &str, error: ApiError) -> Response {
    let value = HeaderValue::from_str(challenge)
        .unwrap_or_else(|_| HeaderValue::from_static(r#"Bearer realm="tasker""#));
    ([(WWW_AUTHENTICATE, value)], error).into_response()
}

/// Text safe inside a quoted-string of the challenge (RFC 6750 §3: no `"` or `\`,
/// printable ASCII only).
fn quotable(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '"' | '\\' => '\'',
            ' '..='~' => c,
            _ => '?',
        })
        .collect()
}

/// Describes the bearer scheme in the OpenAPI document, and on each route the scope it
/// needs (from [`super::routes`], so the document cannot disagree with the gate) and its
/// 401 and 403 answers.
pub(crate) struct SecurityDoc;

impl Modify for SecurityDoc {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            SCHEME,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("Tasker API token (tsk_…) or JWT (HS256/RS256)")
                    .description(Some(
                        "Required when the coordinator runs with `TASKER_AUTH=on` (off by \
                         default for local runs). The scopes listed on each operation are \
                         the ones it needs; `admin` grants them all. See docs/security.md.",
                    ))
                    .build(),
            ),
        );
        for route in super::routes() {
            let requirement = match route.access {
                Access::Open => continue,
                // `{}` first: no token needed unless TASKER_METRICS_AUTH=on.
                Access::Monitoring => vec![
                    SecurityRequirement::default(),
                    SecurityRequirement::new(SCHEME, [Scope::MetricsRead.as_str()]),
                ],
                Access::Scope(scope) => vec![SecurityRequirement::new(SCHEME, [scope.as_str()])],
            };
            let Some(item) = openapi.paths.paths.get_mut(route.path) else {
                continue;
            };
            let operation = match route.method {
                Method::GET => item.get.as_mut(),
                Method::POST => item.post.as_mut(),
                Method::PUT => item.put.as_mut(),
                Method::PATCH => item.patch.as_mut(),
                Method::DELETE => item.delete.as_mut(),
                _ => None,
            };
            let Some(operation) = operation else {
                continue;
            };
            operation.security = Some(requirement);
            for (status, description) in [
                (
                    "401",
                    "`unauthenticated`: no bearer token, or a malformed, unknown, revoked, \
                     expired or badly signed one (with `WWW-Authenticate: Bearer`).",
                ),
                (
                    "403",
                    "`insufficient_scope`: the token lacks the scope this call needs \
                     (named in the message and in `details`).",
                ),
            ] {
                operation
                    .responses
                    .responses
                    .entry(status.to_owned())
                    .or_insert_with(|| {
                        RefOr::T(
                            ResponseBuilder::new()
                                .description(description)
                                .content(
                                    "application/json",
                                    ContentBuilder::new()
                                        .schema(Some(Ref::from_schema_name("ErrorBody")))
                                        .build(),
                                )
                                .build(),
                        )
                    });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append(AUTHORIZATION, HeaderValue::from_str(value).unwrap());
        }
        headers
    }

    #[test]
    fn bearer_tokens_are_read_from_one_authorization_header() {
        assert_eq!(
            bearer_token(&headers(&["Bearer tsk_abc"])).unwrap(),
            "tsk_abc"
        );
        assert_eq!(
            bearer_token(&headers(&["bearer  a.b.c "])).unwrap(),
            "a.b.c"
        );
        for bad in [
            &[][..],
            &["Basic dXNlcjpwYXNz"],
            &["Bearer"],
            &["Bearer   "],
            &["Bearer a", "Bearer b"],
        ] {
            let reason = bearer_token(&headers(bad)).unwrap_err();
            assert_eq!(reason.is_none(), bad.is_empty(), "{bad:?}");
            let response = unauthorized(reason);
            assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{bad:?}");
            let challenge = response.headers()[WWW_AUTHENTICATE].to_str().unwrap();
            assert!(
                challenge.starts_with("Bearer realm=\"tasker\""),
                "{challenge}"
            );
        }
    }

    #[test]
    fn challenges_stay_valid_header_values() {
        assert_eq!(quotable(r#"a "quoted" \ thing é"#), "a 'quoted' ' thing ?");
        let response = unauthorized(Some("the JWT has no `exp` claim"));
        let challenge = response.headers()[WWW_AUTHENTICATE].to_str().unwrap();
        assert!(
            challenge.contains(r#"error="invalid_token""#),
            "{challenge}"
        );
    }

    /// Every route names its access in the table; the ones that must stay open do, and
    /// every `/v1` route needs a scope.
    #[test]
    fn the_route_table_guards_every_api_route() {
        for route in super::super::routes() {
            let expected = match (route.method.as_str(), route.path) {
                ("GET", "/health/live" | "/health/ready" | "/openapi.json") => Access::Open,
                ("GET", "/metrics" | "/health/status") => Access::Monitoring,
                ("POST", "/v1/templates") => Access::Scope(Scope::TemplatesWrite),
                ("POST", "/v1/tasks") => Access::Scope(Scope::TasksWrite),
                // A schedule creates tasks.
                ("POST", "/v1/schedules") | ("PATCH" | "DELETE", "/v1/schedules/{name}") => {
                    Access::Scope(Scope::TasksWrite)
                }
                ("POST", path) if path.starts_with("/v1/tasks/") => {
                    Access::Scope(Scope::TasksOperate)
                }
                ("GET", path) if path.starts_with("/v1/") => Access::Scope(Scope::TasksRead),
                (method, path) => panic!("{method} {path}: decide its access in this test"),
            };
            assert_eq!(route.access, expected, "{} {}", route.method, route.path);
        }
    }
}
