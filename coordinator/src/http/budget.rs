//! A bound on the memory that requests in progress hold: each request with a body takes
//! its size (its `Content-Length`, or `TASKER_MAX_BODY_BYTES` when it does not say) from
//! `TASKER_MAX_INFLIGHT_BODY_BYTES` before the body is read, and gives it back when its
//! answer is made. A request that does not fit is answered 503 `overloaded` with
//! `Retry-After: 1`, so a burst of large task creations cannot grow the coordinator
//! without bound.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header::{CONTENT_LENGTH, TRANSFER_ENCODING};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::sync::Semaphore;

use super::error::ApiError;

/// Bytes of request bodies in progress, counted in KiB.
#[derive(Clone)]
pub(crate) struct BodyBudget {
    permits: Arc<Semaphore>,
    total_kib: u32,
    total_bytes: usize,
    max_body_bytes: usize,
}

impl BodyBudget {
    pub(crate) fn new(total_bytes: usize, max_body_bytes: usize) -> Self {
        let total_kib = u32::try_from(total_bytes.div_ceil(1024)).unwrap_or(u32::MAX);
        BodyBudget {
            permits: Arc::new(Semaphore::new(total_kib as usize)),
            total_kib,
            total_bytes,
            max_body_bytes,
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
    next.run(request).await
}
