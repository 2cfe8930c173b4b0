//! `tasker.http`: one HTTP call.
//!
//! Config: `url` (required), `method` (default `GET`), `headers` (object of strings),
//! `body` (a string is sent as is; any other JSON is sent as JSON), `timeout_ms` (default:
//! the step's timeout).
//!
//! Outcome: 2xx succeeds with `{"status", "body"}` (the body parsed as JSON when it is
//! JSON, else text); 429 and 503 are retryable, honouring `Retry-After` (seconds or an
//! HTTP date); other 5xx, timeouts and network errors are retryable; other statuses are
//! permanent, with code `http_<status>`.
//!
//! Where it may connect is the [outbound policy](super::outbound): a refused destination
//! (the first one or a redirect's) fails the step permanently with code `http_denied`.
//! At most [`MAX_REDIRECTS`] redirects are followed. A response body larger than
//! `TASKER_HTTP_MAX_RESPONSE_BYTES` (default: 1 MiB) is not read past the limit and fails
//! the step permanently with code `http_response_too_large`.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};
use reqwest::{Method, StatusCode, redirect};
use serde_json::{Value, json};

use super::outbound::{Denied, OutboundPolicy, PolicyResolver};
use crate::handler::{StepContext, StepError, StepHandler};

/// Redirects followed before the call fails.
pub const MAX_REDIRECTS: usize = 5;
/// Default for `TASKER_HTTP_MAX_RESPONSE_BYTES`.
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 1024 * 1024;
/// The setting for the largest response body read.
pub const MAX_RESPONSE_VAR: &str = "TASKER_HTTP_MAX_RESPONSE_BYTES";
/// How much of an unsuccessful answer's body is read, for its error's snippet.
const ERROR_BODY_BYTES: usize = 4096;

/// The `tasker.http` handler: one connection pool shared by every step.
pub struct Http {
    client: reqwest::Client,
    policy: Arc<OutboundPolicy>,
    max_response_bytes: usize,
    /// A setting that could not be read: every call fails with it (`Worker::build`
    /// refuses to start with it, through [`check_settings`]).
    misconfigured: Option<String>,
}

/// `TASKER_HTTP_ALLOW` and `TASKER_HTTP_MAX_RESPONSE_BYTES` can be read.
///
/// # Errors
///
/// Names what cannot be read.
pub fn check_settings() -> Result<(), String> {
    settings_from_env().map(|_| ())
}

/// The outbound policy (`TASKER_HTTP_ALLOW`) and the response limit
/// (`TASKER_HTTP_MAX_RESPONSE_BYTES`) the environment gives.
fn settings_from_env() -> Result<(OutboundPolicy, usize), String> {
    let policy = OutboundPolicy::from_env()?;
    let max_response_bytes = match std::env::var(MAX_RESPONSE_VAR) {
        Err(_) => DEFAULT_MAX_RESPONSE_BYTES,
        Ok(text) => text
            .trim()
            .parse()
            .map_err(|_| format!("{MAX_RESPONSE_VAR}: `{text}` is not a number of bytes"))?,
    };
    Ok((policy, max_response_bytes))
}

impl Http {
    /// A handler with its own connection pool, its outbound policy from
    /// `TASKER_HTTP_ALLOW` and its response limit from `TASKER_HTTP_MAX_RESPONSE_BYTES`.
    pub fn new() -> Self {
        match settings_from_env() {
            Ok((policy, max_response_bytes)) => Self::with_policy(policy, max_response_bytes),
            Err(problem) => {
                let mut http = Self::with_policy(OutboundPolicy::default(), 0);
                http.misconfigured = Some(problem);
                http
            }
        }
    }

    /// A handler with the given policy and response limit.
    pub fn with_policy(policy: OutboundPolicy, max_response_bytes: usize) -> Self {
        let policy = Arc::new(policy);
        let redirects = policy.clone();
        let client = reqwest::Client::builder()
            .user_agent(concat!("tasker-worker/", env!("CARGO_PKG_VERSION")))
            // A proxy would resolve names itself, past the policy.
            .no_proxy()
            .dns_resolver(Arc::new(PolicyResolver {
                policy: policy.clone(),
            }))
            .redirect(redirect::Policy::custom(move |attempt| {
                if attempt.previous().len() >= MAX_REDIRECTS {
                    attempt.error(Denied(format!("more than {MAX_REDIRECTS} redirects")))
                } else if let Err(denied) = redirects.check_url(attempt.url()) {
                    attempt.error(denied)
                } else {
                    attempt.follow()
                }
            }))
            .build()
            .unwrap_or_default();
        Http {
            client,
            policy,
            max_response_bytes,
            misconfigured: None,
        }
    }
}

impl Default for Http {
    fn default() -> Self {
        Self::new()
    }
}

fn denied(url: &str, why: &Denied) -> StepError {
    StepError::permanent(format!("{url}: refused by the outbound policy: {why}"))
        .with_code("http_denied")
}

/// The policy's refusal somewhere in a request error's causes, if that is what it was.
fn denial(error: &reqwest::Error) -> Option<Denied> {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(current) = cause {
        if let Some(denied) = current.downcast_ref::<Denied>() {
            return Some(denied.clone());
        }
        cause = current.source();
    }
    None
}

fn invalid_config(message: impl Into<String>) -> StepError {
    StepError::permanent(message).with_code("invalid_config")
}

#[async_trait::async_trait]
impl StepHandler for Http {
    async fn call(&self, step: &StepContext) -> Result<Value, StepError> {
        if let Some(problem) = &self.misconfigured {
            return Err(StepError::permanent(problem.clone()).with_code("http_denied"));
        }
        let config = &step.config;
        let url = config
            .get("url")
            .and_then(Value::as_str)
            .ok_or_else(|| invalid_config("config.url (a string) is required"))?;
        // Messages become the step's `last_error`, readable through the API: the URL
        // appears there without its password or secret-looking query parameters.
        let shown = url
            .parse::<tasker_protocol::config::SecretUrl>()
            .map(|u| u.redacted())
            .unwrap_or_default();
        let parsed: reqwest::Url = url.parse().map_err(|error| {
            invalid_config(format!("config.url `{shown}` is not a URL: {error}"))
        })?;
        self.policy
            .check_url(&parsed)
            .map_err(|why| denied(&shown, &why))?;
        let method = match config.get("method") {
            None => Method::GET,
            Some(Value::String(name)) => Method::from_bytes(name.to_ascii_uppercase().as_bytes())
                .map_err(|_| {
                invalid_config(format!("config.method `{name}` is not an HTTP method"))
            })?,
            Some(other) => {
                return Err(invalid_config(format!(
                    "config.method must be a string, got {other}"
                )));
            }
        };
        let timeout = match config.get("timeout_ms") {
            None => step.timeout,
            Some(value) => Duration::from_millis(value.as_u64().ok_or_else(|| {
                invalid_config(format!(
                    "config.timeout_ms must be a whole number, got {value}"
                ))
            })?),
        };
        let mut request = self
            .client
            .request(method, parsed)
            .timeout(timeout)
            .headers(headers(config.get("headers"))?);
        match config.get("body") {
            None | Some(Value::Null) => {}
            Some(Value::String(text)) => request = request.body(text.clone()),
            Some(other) => request = request.json(other),
        }

        let mut response = request.send().await.map_err(|error| {
            if let Some(why) = denial(&error) {
                return denied(&shown, &why);
            }
            let kind = if error.is_timeout() {
                "timeout"
            } else {
                "http_network"
            };
            StepError::retryable(format!("{shown}: {}", error.without_url())).with_code(kind)
        })?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, Utc::now()));
        let too_large = || {
            StepError::permanent(format!(
                "{shown}: the response body is larger than {} bytes ({MAX_RESPONSE_VAR})",
                self.max_response_bytes
            ))
            .with_code("http_response_too_large")
        };
        // A success's body is the result, whole or not at all. Of any other answer only
        // the start is read, for the error's snippet: its status decides what happens,
        // whatever the size of its body (a large error page of a 503 is still a 503).
        let success = status.is_success();
        if success
            && response
                .content_length()
                .is_some_and(|length| length > self.max_response_bytes as u64)
        {
            return Err(too_large());
        }
        let limit = if success {
            self.max_response_bytes
        } else {
            ERROR_BODY_BYTES.min(self.max_response_bytes)
        };
        let mut bytes = Vec::new();
        loop {
            let chunk = match response.chunk().await {
                Ok(Some(chunk)) => chunk,
                Ok(None) => break,
                // The status says what went wrong; the body was only for the message.
                Err(_) if !success => break,
                Err(error) => {
                    let kind = if error.is_timeout() {
                        "timeout"
                    } else {
                        "http_network"
                    };
                    return Err(StepError::retryable(format!(
                        "{shown}: reading the body: {}",
                        error.without_url()
                    ))
                    .with_code(kind));
                }
            };
            if bytes.len() + chunk.len() > limit {
                if success {
                    return Err(too_large());
                }
                bytes.extend_from_slice(&chunk[..limit - bytes.len()]);
                break;
            }
            bytes.extend_from_slice(&chunk);
        }
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let body = serde_json::from_str::<Value>(&text).unwrap_or(Value::String(text));

        if status.is_success() {
            return Ok(json!({"status": status.as_u16(), "body": body}));
        }
        let message = format!("{shown} answered {status}: {}", snippet(&body));
        let code = format!("http_{}", status.as_u16());
        if status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE {
            let error = StepError::retryable(message).with_code(code);
            Err(match retry_after {
                Some(delay) => error.retry_after(delay),
                None => error,
            })
        } else if status.is_server_error() {
            Err(StepError::retryable(message).with_code(code))
        } else {
            Err(StepError::permanent(message).with_code(code))
        }
    }
}

fn headers(config: Option<&Value>) -> Result<HeaderMap, StepError> {
    let mut map = HeaderMap::new();
    let Some(config) = config else { return Ok(map) };
    let object = config
        .as_object()
        .ok_or_else(|| invalid_config("config.headers must be an object of strings"))?;
    for (name, value) in object {
        let value = value
            .as_str()
            .ok_or_else(|| invalid_config(format!("config.headers.{name} must be a string")))?;
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| invalid_config(format!("`{name}` is not a valid header name")))?;
        let value = HeaderValue::from_str(value)
            .map_err(|_| invalid_config(format!("the value of header `{name}` is not valid")))?;
        map.insert(name, value);
    }
    Ok(map)
}

/// `Retry-After` as seconds (`120`) or an HTTP date (`Wed, 21 Oct 2015 07:28:00 GMT`).
/// A date in the past means "now".
pub fn parse_retry_after(value: &str, now: DateTime<Utc>) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<f64>() {
        // Past what a `Duration` holds is "as late as may be": the retry policy's
        // maximum caps it.
        return (seconds >= 0.0)
            .then(|| Duration::try_from_secs_f64(seconds).unwrap_or(Duration::MAX));
    }
    let when = DateTime::parse_from_rfc2822(value)
        .ok()?
        .with_timezone(&Utc);
    Some((when - now).to_std().unwrap_or(Duration::ZERO))
}

fn snippet(body: &Value) -> String {
    let text = match body {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    };
    let mut cut: String = text.chars().take(200).collect();
    if cut.len() < text.len() {
        cut.push('…');
    }
    cut
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_reads_seconds_and_http_dates() {
        let now = DateTime::parse_from_rfc3339("2015-10-21T07:27:00Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(parse_retry_after("2", now), Some(Duration::from_secs(2)));
        assert_eq!(
            parse_retry_after(" 1.5 ", now),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now),
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-3", now), None);
        assert_eq!(parse_retry_after("NaN", now), None);
        // Beyond what a `Duration` holds: as late as may be (the policy's maximum caps
        // it), not a panic.
        assert_eq!(parse_retry_after("1e20", now), Some(Duration::MAX));
    }
}
