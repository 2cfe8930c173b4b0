//! A small client of the coordinator's HTTP API: every call answers the status and the
//! JSON body, or a [`CliError`] that knows its exit code.

use std::time::Duration;

use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderValue};
use reqwest::{Method, StatusCode, Url};
use serde_json::Value;

use super::CliError;

/// How long to wait for a TCP connection before calling the coordinator unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one request may take in all.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// How long an idle connection is kept for the next request.
const IDLE_CONNECTION: Duration = Duration::from_secs(5);

/// The API at one base URL, with an optional bearer token.
pub(crate) struct Client {
    http: reqwest::Client,
    base: Url,
}

/// What the API answered.
pub(crate) struct Response {
    pub(crate) status: StatusCode,
    /// The body as JSON; a body that is not JSON is kept as a JSON string.
    pub(crate) body: Value,
}

/// A request body.
pub(crate) enum Body {
    None,
    Json(Value),
    /// Raw bytes with their content type (template files).
    Raw {
        content_type: &'static str,
        bytes: Vec<u8>,
    },
}

impl Client {
    /// A client of the API at `base` (`http://host:port`, optionally with a path prefix).
    pub(crate) fn new(base: &str, token: Option<&str>) -> Result<Self, CliError> {
        let url = Url::parse(base)
            .map_err(|error| CliError::Usage(format!("--url `{base}` is not a URL: {error}")))?;
        if !matches!(url.scheme(), "http" | "https") || url.cannot_be_a_base() {
            return Err(CliError::Usage(format!(
                "--url `{base}` must be an http:// or https:// URL"
            )));
        }
        let mut headers = HeaderMap::new();
        if let Some(token) = token.filter(|token| !token.is_empty()) {
            let mut value = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
                CliError::Usage("--token contains characters not allowed in a header".into())
            })?;
            value.set_sensitive(true);
            headers.insert(AUTHORIZATION, value);
        }
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            // Under the coordinator's idle limit (TASKER_HTTP_HEADER_TIMEOUT_MS, 10 s by
            // default): a connection it is closing is never reused.
            .pool_idle_timeout(IDLE_CONNECTION)
            .user_agent(concat!("tasker-cli/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|error| CliError::Failed(format!("cannot build the HTTP client: {error}")))?;
        Ok(Client { http, base: url })
    }

    /// The base URL followed by `segments`, each percent-encoded as one path segment.
    pub(crate) fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        url
    }

    /// Send a request; any HTTP status is an answer. Only a coordinator that cannot be
    /// reached (or answers garbage at the HTTP level) is an error.
    pub(crate) async fn send(
        &self,
        method: Method,
        segments: &[&str],
        query: &[(&str, String)],
        body: Body,
    ) -> Result<Response, CliError> {
        let mut url = self.url(segments);
        if !query.is_empty() {
            url.query_pairs_mut()
                .extend_pairs(query.iter().map(|(key, value)| (*key, value.as_str())));
        }
        let mut request = self.http.request(method, url);
        request = match body {
            Body::None => request,
            Body::Json(value) => request.json(&value),
            Body::Raw {
                content_type,
                bytes,
            } => request.header(CONTENT_TYPE, content_type).body(bytes),
        };
        let response = request
            .send()
            .await
            .map_err(|error| self.transport_error(&error))?;
        let status = response.status();
        let bytes = response
            .bytes()
            .await
            .map_err(|error| self.transport_error(&error))?;
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        Ok(Response { status, body })
    }

    /// `GET`, expecting success.
    pub(crate) async fn get(
        &self,
        segments: &[&str],
        query: &[(&str, String)],
    ) -> Result<Value, CliError> {
        let response = self.send(Method::GET, segments, query, Body::None).await?;
        Ok(response.success()?.body)
    }

    /// `GET` a text answer (a diagram), expecting success.
    pub(crate) async fn get_text(
        &self,
        segments: &[&str],
        query: &[(&str, String)],
    ) -> Result<String, CliError> {
        let response = self.send(Method::GET, segments, query, Body::None).await?;
        match response.success()?.body {
            Value::String(text) => Ok(text),
            other => Ok(other.to_string()),
        }
    }

    /// `POST` a JSON body, expecting success.
    pub(crate) async fn post(&self, segments: &[&str], body: Value) -> Result<Response, CliError> {
        self.send(Method::POST, segments, &[], Body::Json(body))
            .await?
            .success()
    }

    /// `PATCH` a JSON body; a non-2xx answer is an error.
    pub(crate) async fn patch(&self, segments: &[&str], body: Value) -> Result<Response, CliError> {
        self.send(Method::PATCH, segments, &[], Body::Json(body))
            .await?
            .success()
    }

    /// `DELETE`; a non-2xx answer is an error.
    pub(crate) async fn delete(&self, segments: &[&str]) -> Result<Response, CliError> {
        self.send(Method::DELETE, segments, &[], Body::None)
            .await?
            .success()
    }

    fn transport_error(&self, error: &reqwest::Error) -> CliError {
        if error.is_builder() {
            return CliError::Usage(format!(
                "cannot build a request to {}: {}",
                self.shown(),
                self.hide_password(error.to_string())
            ));
        }
        // reqwest's own message is terse ("error sending request"); the causes say why.
        let mut message = error.to_string();
        let mut source = std::error::Error::source(error);
        while let Some(cause) = source {
            let text = cause.to_string();
            if !message.contains(&text) {
                message.push_str(": ");
                message.push_str(&text);
            }
            source = cause.source();
        }
        CliError::Unreachable(format!(
            "cannot reach the coordinator at {}: {}",
            self.shown(),
            self.hide_password(message)
        ))
    }

    /// The base URL as it may be shown: a password in it as `***`.
    fn shown(&self) -> Url {
        let mut url = self.base.clone();
        if url.password().is_some() {
            let _ = url.set_password(Some("***"));
        }
        url
    }

    /// `text` with the base URL's password, if it has one, as `***`.
    fn hide_password(&self, text: String) -> String {
        match self.base.password().filter(|password| !password.is_empty()) {
            Some(password) => text.replace(password, "***"),
            None => text,
        }
    }
}

impl Response {
    /// The response itself when its status is a success, else the API error it carries.
    pub(crate) fn success(self) -> Result<Response, CliError> {
        if self.status.is_success() {
            Ok(self)
        } else {
            Err(self.into_error())
        }
    }

    /// The API's `{"error": {code, message, details}}` (or whatever it answered instead).
    pub(crate) fn into_error(self) -> CliError {
        let error = &self.body["error"];
        let (code, message, details) = if error.is_object() {
            (
                error["code"].as_str().unwrap_or("error").to_owned(),
                error["message"].as_str().unwrap_or_default().to_owned(),
                error["details"].as_array().cloned().unwrap_or_default(),
            )
        } else {
            let text = match &self.body {
                Value::String(text) => text.trim().to_owned(),
                Value::Null => String::new(),
                other => other.to_string(),
            };
            let reason = self.status.canonical_reason().unwrap_or("HTTP error");
            let message = if text.is_empty() {
                reason.to_owned()
            } else {
                format!("{reason}: {}", super::render::truncate(&text, 300))
            };
            ("http_error".to_owned(), message, Vec::new())
        };
        CliError::Api {
            status: self.status.as_u16(),
            code,
            message,
            details,
            body: self.body,
        }
    }
}
