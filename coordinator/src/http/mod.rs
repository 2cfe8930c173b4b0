//! The HTTP API (`../shared/API.md` fixes its names).

mod body;
mod error;
mod health;
mod openapi;
mod operate;
mod tasks;
mod templates;

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::handler::Handler;
use axum::http::Method;
use axum::routing::{MethodFilter, MethodRouter, on};
use sqlx::PgPool;
use tokio::sync::Notify;

use crate::control::Control;
use crate::metrics::CoordinatorMetrics;
use crate::publisher::StepPublisher;

pub(crate) use templates::register_template;

/// What every handler can reach.
#[derive(Clone)]
pub(crate) struct AppState {
    pub(crate) pool: PgPool,
    pub(crate) publisher: Arc<StepPublisher>,
    pub(crate) metrics: Arc<CoordinatorMetrics>,
    pub(crate) control: Control,
    /// Wakes the dispatcher when a task is created.
    pub(crate) wake_dispatcher: Arc<Notify>,
    /// Wakes the events relay after the API committed transitions.
    pub(crate) wake_events: Arc<Notify>,
    /// Selects tasker-engine `environments` overrides.
    pub(crate) environment: String,
    pub(crate) broker: Arc<lapin::Connection>,
}

/// One route of the API: a method, a path and its handler.
pub(crate) struct Route {
    pub(crate) method: Method,
    pub(crate) path: &'static str,
    /// The handler, routed for the method it is given: `method`, so the two cannot differ.
    handler: Box<dyn FnOnce(MethodFilter) -> MethodRouter<AppState>>,
}

fn route<H, T>(method: Method, path: &'static str, handler: H) -> Route
where
    H: Handler<T, AppState>,
    T: 'static,
{
    Route {
        method,
        path,
        handler: Box::new(move |filter| on(filter, handler)),
    }
}

/// Every route the API serves: the one table [`router`] is built from. A test
/// (`openapi::tests`) checks that `openapi::ApiDoc` describes exactly these, so add a
/// route here, with its `#[utoipa::path]` and an entry in `ApiDoc`, and nowhere else.
pub(crate) fn routes() -> Vec<Route> {
    vec![
        route(Method::POST, "/v1/templates", templates::create),
        route(Method::GET, "/v1/templates", templates::list),
        route(
            Method::GET,
            "/v1/templates/{namespace}/{name}",
            templates::get,
        ),
        route(Method::POST, "/v1/tasks", tasks::create),
        route(Method::GET, "/v1/tasks", tasks::list),
        route(Method::GET, "/v1/tasks/{task_id}", tasks::get),
        route(Method::POST, "/v1/tasks/{task_id}/cancel", operate::cancel),
        route(Method::POST, "/v1/tasks/{task_id}/retry", operate::retry),
        route(
            Method::POST,
            "/v1/tasks/{task_id}/steps/{step_name}/resolve",
            operate::resolve,
        ),
        route(
            Method::GET,
            "/v1/tasks/{task_id}/readiness",
            operate::readiness,
        ),
        route(
            Method::GET,
            "/v1/tasks/{task_id}/transitions",
            operate::history,
        ),
        route(Method::GET, "/health/live", health::live),
        route(Method::GET, "/health/ready", health::ready),
        route(Method::GET, "/health/status", health::status),
        route(Method::GET, "/metrics", health::metrics),
        route(Method::GET, "/openapi.json", openapi::document),
    ]
}

/// The API without its state: [`routes`], the fallback and the body limit.
fn stateless_router(max_body_bytes: usize) -> Router<AppState> {
    routes()
        .into_iter()
        .fold(Router::new(), |router, r| {
            let filter = MethodFilter::try_from(r.method).expect("a method axum can route");
            router.route(r.path, (r.handler)(filter))
        })
        .fallback(health::not_found)
        .layer(DefaultBodyLimit::max(max_body_bytes))
}

pub(crate) fn router(state: AppState, max_body_bytes: usize) -> Router {
    stateless_router(max_body_bytes).with_state(state)
}
