//! The web console (`/ui/`, `docs/console.md`): its assets, served from the binary, and the
//! two calls it needs beside the API: who the token is (`GET /v1/whoami`) and the live
//! event stream (`GET /v1/events/stream`).
//!
//! The assets hold no data and are served to anyone; everything they show comes from the
//! API with the token the user pasted, so the scopes apply as they do to any client.

use std::convert::Infallible;
use std::sync::LazyLock;
use std::time::Duration;

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, ETAG, IF_NONE_MATCH,
};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::{Extension, Router};
use futures::Stream;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::broadcast::error::RecvError;
use utoipa::ToSchema;
use uuid::Uuid;

use super::AppState;
use super::body::query_rejection;
use super::error::{ApiError, ApiResult, ErrorBody};
use super::tasks::name_parameter_problem;
use crate::auth::{Principal, Scope};
use crate::live::LiveEvent;

/// One asset of the console.
struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static str,
}

/// Every file of the console, compiled into the binary.
const ASSETS: &[Asset] = &[
    Asset {
        name: "index.html",
        content_type: "text/html; charset=utf-8",
        body: include_str!("../../ui/index.html"),
    },
    Asset {
        name: "app.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("../../ui/app.js"),
    },
    Asset {
        name: "graph.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("../../ui/graph.js"),
    },
    Asset {
        name: "style.css",
        content_type: "text/css; charset=utf-8",
        body: include_str!("../../ui/style.css"),
    },
];

/// Only this origin's scripts, styles and calls: the console loads nothing from elsewhere.
const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; \
    frame-ancestors 'none'";

/// The console's routes, outside the API's route table (they are not API calls).
pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/ui", get(|| async { Redirect::permanent("/ui/") }))
        .route("/ui/", get(|headers: HeaderMap| async move { asset("index.html", &headers) }))
        .route(
            "/ui/{file}",
            get(|Path(file): Path<String>, headers: HeaderMap| async move {
                asset(&file, &headers)
            }),
        )
}

/// An asset, with an entity tag so a browser revalidates instead of downloading again.
fn asset(name: &str, headers: &HeaderMap) -> Response {
    let Some(index) = ASSETS.iter().position(|a| a.name == name) else {
        return ApiError::not_found("route_not_found", format!("no console file `{name}`"))
            .into_response();
    };
    let (asset, etag) = (&ASSETS[index], &ETAGS[index]);
    let fresh = headers
        .get(IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|tag| tag.trim() == etag.as_str()));
    let mut response = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        ([(CONTENT_TYPE, asset.content_type)], asset.body).into_response()
    };
    let headers = response.headers_mut();
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(CONTENT_SECURITY_POLICY, HeaderValue::from_static(POLICY));
    headers.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    if let Ok(value) = HeaderValue::from_str(etag) {
        headers.insert(ETAG, value);
    }
    response
}

/// Each asset's entity tag, in [`ASSETS`] order, computed once.
static ETAGS: LazyLock<Vec<String>> = LazyLock::new(|| {
    ASSETS
        .iter()
        .map(|asset| format!("\"{:016x}\"", fingerprint(asset.body)))
        .collect()
});

/// FNV-1a: a stable fingerprint of an asset for its entity tag.
fn fingerprint(body: &str) -> u64 {
    body.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The caller's token, as the API sees it.
#[derive(Serialize, ToSchema)]
pub(crate) struct WhoAmI {
    /// Whether the API checks tokens (`TASKER_AUTH`); when off every call is allowed.
    authentication: bool,
    /// `token:<name>` or `jwt:<sub>`; absent when authentication is off.
    #[serde(skip_serializing_if = "Option::is_none")]
    subject: Option<String>,
    /// What the token grants (`admin` implies every other); every scope when
    /// authentication is off.
    scopes: Vec<String>,
    /// Whether lifecycle events are published (`TASKER_EVENTS`): without them
    /// `/v1/events/stream` stays silent.
    events: bool,
    /// When `TASKER_EVENTS` names only some events: their routing-key patterns
    /// (`task.*`); the others are never published, so no view updates on them.
    #[serde(skip_serializing_if = "Option::is_none")]
    events_only: Option<Vec<String>>,
}

/// Who the bearer token is and what it may do (the console offers only what it allows).
#[utoipa::path(
    get,
    path = "/v1/whoami",
    tag = "console",
    operation_id = "whoami",
    responses(
        (status = 200, description = "The token's subject and scopes.", body = WhoAmI),
    ),
)]
pub(crate) async fn whoami(
    State(state): State<AppState>,
    principal: Option<Extension<Principal>>,
) -> Json<WhoAmI> {
    let events = state.live.enabled();
    let events_only = state.live.only().map(<[String]>::to_vec);
    Json(match principal {
        Some(Extension(principal)) => WhoAmI {
            authentication: true,
            subject: Some(principal.subject),
            scopes: principal.scopes.names(),
            events,
            events_only,
        },
        None => WhoAmI {
            authentication: false,
            subject: None,
            scopes: Scope::ALL.iter().map(|s| s.as_str().to_owned()).collect(),
            events,
            events_only,
        },
    })
}

/// How long a new stream waits for the events consumer to be bound before `ready`.
const READY_PATIENCE: Duration = Duration::from_secs(10);

/// How often an open event stream's token is checked again (authentication on).
const RECHECK: Duration = Duration::from_secs(30);

/// Which events a stream carries.
struct Filter {
    task_id: Option<Uuid>,
    namespace: Option<String>,
    /// `task`, `step` or `schedule`: the event name's first part.
    kind: Option<String>,
}

impl Filter {
    fn parse(query: Vec<(String, String)>) -> ApiResult<Filter> {
        let mut problems: Vec<Value> = Vec::new();
        let mut filter = Filter {
            task_id: None,
            namespace: None,
            kind: None,
        };
        for (key, value) in query {
            match key.as_str() {
                "task_id" => match Uuid::parse_str(&value) {
                    Ok(id) => filter.task_id = Some(id),
                    Err(_) => problems.push(json!({"path": "task_id", "message": "`task_id` must be a UUID"})),
                },
                "namespace" if let Some(message) = name_parameter_problem(&key, &value) => {
                    problems.push(json!({"path": "namespace", "message": message}));
                }
                "namespace" => filter.namespace = Some(value),
                "kind" if ["task", "step", "schedule"].contains(&value.as_str()) => {
                    filter.kind = Some(value);
                }
                "kind" => problems.push(json!({"path": "kind", "message": "`kind` must be task, step or schedule"})),
                _ => problems.push(json!({"path": key, "message": format!("unknown query parameter `{key}`; expected task_id, namespace, kind")})),
            }
        }
        if problems.is_empty() {
            Ok(filter)
        } else {
            Err(ApiError::malformed("invalid query parameters").with_details(problems))
        }
    }

    fn accepts(&self, event: &LiveEvent) -> bool {
        self.task_id.is_none_or(|id| event.task_id == Some(id))
            && self
                .namespace
                .as_ref()
                .is_none_or(|ns| *ns == event.namespace)
            && self.kind.as_ref().is_none_or(|kind| {
                event
                    .event
                    .split_once('.')
                    .is_some_and(|(first, _)| first == kind)
            })
    }
}

/// Lifecycle events as they happen, as server-sent events.
///
/// The first event is `ready` (`{"events": bool}`): with `true`, every lifecycle event
/// published from then on reaches the stream; `false` when `TASKER_EVENTS` is off (or the
/// broker cannot be consumed: reconnect later). When `TASKER_EVENTS` names only some
/// events, `ready` carries their patterns too (`"only": ["task.*"]`). Each lifecycle
/// event follows as an unnamed event whose data is its JSON (`docs/observability.md`,
/// "Lifecycle events"); `lagged` means the stream missed some (it fell behind, or the
/// coordinator lost the broker for a while; `missed` says how many when it is known):
/// reload what you show. A comment every 15 s keeps proxies from closing the connection.
#[utoipa::path(
    get,
    path = "/v1/events/stream",
    tag = "console",
    operation_id = "stream_events",
    params(
        ("task_id" = Option<Uuid>, Query, description = "Only this task's events."),
        ("namespace" = Option<String>, Query, min_length = 1, max_length = 128, pattern = "^[^\\x00]*$", description = "Only this namespace's events."),
        ("kind" = Option<String>, Query, description = "Only `task`, `step` or `schedule` events."),
    ),
    responses(
        (status = 200, description = "A `text/event-stream` that stays open.", body = String, content_type = "text/event-stream"),
        (status = 400, description = "`malformed_request`: every bad or unknown parameter.", body = ErrorBody),
        (status = 503, description = "`overloaded`: too many streams are open on this coordinator.", body = ErrorBody),
    ),
)]
pub(crate) async fn stream(
    State(state): State<AppState>,
    principal: Option<Extension<Principal>>,
    headers: HeaderMap,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> ApiResult<Sse<impl Stream<Item = Result<Event, Infallible>>>> {
    let Query(query) = query.map_err(query_rejection)?;
    let filter = Filter::parse(query)?;
    // With authentication on, the token that opened the stream is checked again every
    // RECHECK: a stream ends once its token is revoked or expired (the client's next
    // request is refused), as a request would be.
    let token = principal
        .and_then(|_| super::auth::bearer_token(&headers).ok())
        .map(|token| (token, state.auth.clone()));
    let live = state.live.clone();
    let Some(receiver) = live.subscribe() else {
        return Err(ApiError::overloaded(format!(
            "{} event streams are open on this coordinator (at most half of \
             TASKER_HTTP_MAX_CONNECTIONS, and 256); try again later",
            live.max_streams()
        )));
    };
    let closing = live.closing();
    // The stream is subscribed before `ready` is sent: nothing published after `ready`
    // is missed.
    let first = futures::stream::once(async move {
        let ready = match (live.ready(READY_PATIENCE).await, live.only()) {
            (true, Some(only)) => json!({"events": true, "only": only}),
            (ready, _) => json!({"events": ready}),
        };
        Ok(Event::default().event("ready").data(ready.to_string()))
    });
    let mut recheck = tokio::time::interval_at(tokio::time::Instant::now() + RECHECK, RECHECK);
    recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let events = futures::stream::unfold(
        (receiver, filter, closing, recheck, token),
        |(mut receiver, filter, closing, mut recheck, token)| async move {
            loop {
                let received = tokio::select! {
                    () = closing.cancelled() => return None,
                    _ = recheck.tick(), if token.is_some() => {
                        let (token, auth) = token.as_ref()?;
                        match auth.authenticate(token).await {
                            Ok(principal) if principal.scopes.allows(Scope::TasksRead) => continue,
                            // Revoked, expired, or its scope taken away; a database
                            // that cannot answer ends it too (the client reconnects).
                            _ => return None,
                        }
                    }
                    received = receiver.recv() => received,
                };
                let event = match received {
                    // The coordinator lost the broker for a while: how many is unknown.
                    Ok(event) if event.missed => Event::default()
                        .event("lagged")
                        .data(json!({"missed": null}).to_string()),
                    Ok(event) if filter.accepts(&event) => Event::default().data(&event.json),
                    Ok(_) => continue,
                    Err(RecvError::Lagged(missed)) => Event::default()
                        .event("lagged")
                        .data(json!({"missed": missed}).to_string()),
                    Err(RecvError::Closed) => return None,
                };
                return Some((Ok(event), (receiver, filter, closing, recheck, token)));
            }
        },
    );
    Ok(Sse::new(futures::StreamExt::chain(first, events))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}
