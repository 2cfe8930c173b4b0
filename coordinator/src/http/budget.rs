//! A bound on the memory that requests in progress hold: each request with a body takes
//! its size (its `Content-Length`, or `TASKER_MAX_BODY_BYTES` when it does not say) from
//! `TASKER_MAX_INFLIGHT_BODY_BYTES` before the body is read, and gives it back when its
//! answer is made. A request that does not fit is answered 503 `overloaded` with
//! `Retry-After: 1`, so a burst of large task creations cannot grow the coordinator
//! without bound. The body must arrive within `TASKER_HTTP_BODY_TIMEOUT_MS`, else 408
//! `request_timeout`: a client that sends a body slowly, or never finishes it, would
//! otherwise hold its share of the budget for ever.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::http::header::{CONTENT_LENGTH, TRANSFER_ENCODING};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::sync::Semaphore;

use super::body::payload_too_large;
use super::error::ApiError;

/// Bytes of request bodies in progress, counted in KiB.
#[derive(Clone)]
pub(crate) struct BodyBudget {
    permits: Arc<Semaphore>,
    total_kib: u32,
    total_bytes: usize,
    max_body_bytes: usize,
    read_timeout: Duration,
}

impl BodyBudget {
    pub(crate) fn new(total_bytes: usize, max_body_bytes: usize, read_timeout: Duration) -> Self {
        let total_kib = u32::try_from(total_bytes.div_ceil(1024)).unwrap_or(u32::MAX);
        BodyBudget {
            permits: Arc::new(Semaphore::new(total_kib as usize)),
            total_kib,
            total_bytes,
            max_body_bytes,
            read_timeout,
        }
    }
}

pub(crate) async fn limit(
    State(budget): State<BodyBudget>,
    request: Request,
    next: Next,
) -> Response {
    let headers = request.headers();
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<usize>().ok());
    let bytes = match declared {
        Some(length) => length.min(budget.max_body_bytes),
        None if headers.contains_key(TRANSFER_ENCODING) => budget.max_body_bytes,
        None => 0,
    };
    if bytes == 0 {
        return next.run(request).await;
    }
    let kib = u32::try_from(bytes.div_ceil(1024))
        .unwrap_or(u32::MAX)
        .min(budget.total_kib);
    let Ok(_held) = budget.permits.clone().try_acquire_many_owned(kib) else {
        return ApiError::overloaded(format!(
            "requests in progress already hold {} bytes of bodies \
             (TASKER_MAX_INFLIGHT_BODY_BYTES); retry after the Retry-After delay",
            budget.total_bytes
        ))
        .into_response();
    };
    if declared.is_some_and(|length| length > budget.max_body_bytes) {
        // Refused by its length alone, unread (the handler's extractor says so).
        return next.run(request).await;
    }
    // Read here, within the deadline; the handler then takes the bytes as they came.
    let (parts, body) = request.into_parts();
    let read = axum::body::to_bytes(body, budget.max_body_bytes);
    let body = match tokio::time::timeout(budget.read_timeout, read).await {
        Ok(Ok(bytes)) => Body::from(bytes),
        Ok(Err(error)) if over_the_limit(&error) => {
            return payload_too_large(budget.max_body_bytes).into_response();
        }
        Ok(Err(error)) => {
            return ApiError::malformed(format!("the body could not be read: {error}"))
                .into_response();
        }
        Err(_) => {
            return ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                format!(
                    "the body did not arrive within {} ms (TASKER_HTTP_BODY_TIMEOUT_MS)",
                    budget.read_timeout.as_millis()
                ),
            )
            .into_response();
        }
    };
    next.run(Request::from_parts(parts, body)).await
}

/// Whether reading a body failed because it is larger than the limit (a chunked body,
/// which declares no length).
fn over_the_limit(error: &axum::Error) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(error) = cause {
        if error.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        cause = error.source();
    }
    false
}
