//! The HTTP API (`docs/api.md` describes its contract).

mod analytics;
mod auth;
mod body;
mod budget;
mod bulk;
mod console;
mod diagram;
mod error;
mod health;
pub(crate) mod openapi;
mod operate;
mod schedules;
pub(crate) mod server;
mod tasks;
mod templates;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::handler::Handler;
use axum::http::Method;
use axum::routing::{MethodFilter, MethodRouter, on};
use tasker_shared::db::Database;
use tokio::sync::Notify;

use crate::auth::{Authenticator, Scope};
use auth::Access;

use crate::control::Control;
use crate::metrics::CoordinatorMetrics;
use crate::publisher::StepPublisher;

pub(crate) use body::Limits;
pub(crate) use templates::register_template;

/// What every handler can reach.
#[derive(Clone)]
pub(crate) struct AppState {
    /// PostgreSQL. Each read or write of a handler waits at most its patience
    /// (`TASKER_DB_ANSWER_TIMEOUT_MS`), past which the request is answered 503
    /// `database_unavailable`.
    pub(crate) db: Database,
    /// The templates task creations named (`TemplateCache`).
    pub(crate) templates: Arc<tasker_shared::store::templates::TemplateCache>,
    /// Writes task creations, batching those that arrive together.
    pub(crate) creator: crate::creator::TaskCreator,
    pub(crate) publisher: Arc<StepPublisher>,
    pub(crate) metrics: Arc<CoordinatorMetrics>,
    pub(crate) control: Control,
    /// Wakes the dispatcher when a task is created.
    pub(crate) wake_dispatcher: Arc<Notify>,
    /// Wakes the events relay after the API committed transitions.
    pub(crate) wake_events: Arc<Notify>,
    /// Wakes the scheduler after the API changed a schedule.
    pub(crate) wake_scheduler: Arc<Notify>,
    /// Selects tasker-engine `environments` overrides.
    pub(crate) environment: String,
    /// The current RabbitMQ connection (replaced after a reconnect).
    pub(crate) broker: Arc<crate::link::BrokerLink>,
    /// Request size limits (`TASKER_MAX_CONTEXT_BYTES`, `TASKER_MAX_TEMPLATE_*`).
    pub(crate) limits: Limits,
    /// Checks bearer tokens (`TASKER_AUTH`); the router hands it to the guarded routes.
    pub(crate) auth: Arc<Authenticator>,
    /// Lifecycle events for the console's live streams.
    pub(crate) live: Arc<crate::live::LiveEvents>,
    /// `/health/status`'s counts, shared by its callers for a few seconds.
    pub(crate) status_counts: Arc<health::CountsCache>,
    /// What requests' commits promised (publish claimed steps, tell workers), carried out
    /// in tasks of their own, which a client that hangs up does not drop; waited for at
    /// shutdown before the last publishes.
    pub(crate) effects: tokio_util::task::TaskTracker,
}

/// One route of the API: a method, a path and its handler.
pub(crate) struct Route {
    pub(crate) method: Method,
    pub(crate) path: &'static str,
    /// Who may call it (`auth::guard` enforces it; the OpenAPI document shows it).
    pub(crate) access: Access,
    /// The handler, routed for the method it is given: `method`, so the two cannot differ.
    handler: Box<dyn FnOnce(MethodFilter) -> MethodRouter<AppState>>,
}

fn route<H, T>(method: Method, path: &'static str, access: Access, handler: H) -> Route
where
    H: Handler<T, AppState>,
    T: 'static,
{
    Route {
        method,
        path,
        access,
        handler: Box::new(move |filter| on(filter, handler)),
    }
}

/// Every route the API serves: the one table [`router`] is built from. A test
/// (`openapi::tests`) checks that `openapi::ApiDoc` describes exactly these, so add a
/// route here, with its `#[utoipa::path]` and an entry in `ApiDoc`, and nowhere else.
///
/// Each route names who may call it (`docs/security.md` has the table): reading
/// templates is `tasks:read`, since whoever reads tasks needs their templates.
pub(crate) fn routes() -> Vec<Route> {
    let templates_write = Access::Scope(Scope::TemplatesWrite);
    let read = Access::Scope(Scope::TasksRead);
    let write = Access::Scope(Scope::TasksWrite);
    let operate = Access::Scope(Scope::TasksOperate);
    vec![
        route(
            Method::POST,
            "/v1/templates",
            templates_write,
            templates::create,
        ),
        route(Method::GET, "/v1/templates", read, templates::list),
        route(
            Method::GET,
            "/v1/templates/{namespace}/{name}",
            read,
            templates::get,
        ),
        route(
            Method::GET,
            "/v1/templates/{namespace}/{name}/diagram",
            read,
            diagram::template,
        ),
        route(Method::POST, "/v1/tasks", write, tasks::create),
        route(Method::GET, "/v1/tasks", read, tasks::list),
        route(Method::POST, "/v1/tasks/cancel", operate, bulk::cancel),
        route(Method::POST, "/v1/tasks/retry", operate, bulk::retry),
        route(Method::GET, "/v1/tasks/{task_id}", read, tasks::get),
        route(
            Method::GET,
            "/v1/tasks/{task_id}/diagram",
            read,
            diagram::task,
        ),
        route(
            Method::POST,
            "/v1/tasks/{task_id}/cancel",
            operate,
            operate::cancel,
        ),
        route(
            Method::POST,
            "/v1/tasks/{task_id}/resolve",
            operate,
            operate::resolve_task,
        ),
        route(
            Method::POST,
            "/v1/tasks/{task_id}/retry",
            operate,
            operate::retry,
        ),
        route(
            Method::GET,
            "/v1/tasks/{task_id}/steps/{step_name}",
            read,
            tasks::step,
        ),
        route(
            Method::POST,
            "/v1/tasks/{task_id}/steps/{step_name}/resolve",
            operate,
            operate::resolve,
        ),
        route(
            Method::POST,
            "/v1/tasks/{task_id}/signals/{signal}",
            operate,
            operate::signal,
        ),
        route(
            Method::GET,
            "/v1/tasks/{task_id}/readiness",
            read,
            operate::readiness,
        ),
        route(
            Method::GET,
            "/v1/tasks/{task_id}/transitions",
            read,
            operate::history,
        ),
        route(
            Method::GET,
            "/v1/analytics/templates",
            read,
            analytics::templates,
        ),
        route(Method::GET, "/v1/analytics/steps", read, analytics::steps),
        route(
            Method::GET,
            "/v1/analytics/bottlenecks",
            read,
            analytics::bottlenecks,
        ),
        route(Method::POST, "/v1/schedules", write, schedules::create),
        route(Method::GET, "/v1/schedules", read, schedules::list),
        route(Method::GET, "/v1/schedules/{name}", read, schedules::get),
        route(
            Method::PATCH,
            "/v1/schedules/{name}",
            write,
            schedules::update,
        ),
        route(
            Method::DELETE,
            "/v1/schedules/{name}",
            write,
            schedules::delete,
        ),
        route(Method::GET, "/v1/whoami", read, console::whoami),
        route(Method::GET, "/v1/events/stream", read, console::stream),
        route(Method::GET, "/health/live", Access::Open, health::live),
        route(Method::GET, "/health/ready", Access::Open, health::ready),
        route(
            Method::GET,
            "/health/status",
            Access::Monitoring,
            health::status,
        ),
        route(Method::GET, "/metrics", Access::Monitoring, health::metrics),
        route(
            Method::GET,
            "/openapi.json",
            Access::Open,
            openapi::document,
        ),
    ]
}

/// The API without its state: [`routes`], the fallback and the body limit. A route's
/// body counts against the bodies in progress ([`budget`]) once its caller passed the
/// route's guard: a request refused for its token holds none of it, whatever its
/// `Content-Length` said.
fn stateless_router(
    max_body_bytes: usize,
    max_inflight_body_bytes: usize,
    body_timeout: Duration,
) -> Router<AppState> {
    let budget = axum::middleware::from_fn_with_state(
        budget::BodyBudget::new(max_inflight_body_bytes, max_body_bytes, body_timeout),
        budget::limit,
    );
    routes()
        .into_iter()
        .fold(Router::new(), |router, r| {
            let filter = MethodFilter::try_from(r.method).expect("a method axum can route");
            router.route(
                r.path,
                auth::guard(r.access, (r.handler)(filter).layer(budget.clone())),
            )
        })
        .merge(console::routes())
        .fallback(health::not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body_bytes))
}

pub(crate) fn router(
    state: AppState,
    max_body_bytes: usize,
    max_inflight_body_bytes: usize,
    body_timeout: Duration,
) -> Router {
    // The guarded routes find the authenticator in every request's extensions.
    let authenticator: Arc<Authenticator> = state.auth.clone();
    stateless_router(max_body_bytes, max_inflight_body_bytes, body_timeout)
        .layer(axum::Extension(authenticator))
        .with_state(state)
}
