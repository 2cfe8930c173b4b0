//! The built-in handlers.
//!
//! | handler | config | does |
//! |---|---|---|
//! | `tasker.noop` | — | succeeds with `{}` |
//! | `tasker.sleep` | `ms` | sleeps, then succeeds with `{"slept_ms"}` |
//! | `tasker.echo` | any | succeeds with `{"config", "context", "parents"}` |
//! | `tasker.fail` | `times`, `kind`, `retry_after_seconds` | fails while `attempt <= times`, then succeeds |
//! | `tasker.http` | `method`, `url`, `headers`, `body`, `timeout_ms` | an HTTP call; see [`http`] |

mod basic;
pub mod http;
pub mod outbound;

use crate::handler::HandlerRegistry;

pub(crate) fn register_builtins(registry: HandlerRegistry) -> HandlerRegistry {
    let registry = registry
        .register("tasker.noop", basic::Noop)
        .register("tasker.sleep", basic::Sleep)
        .register("tasker.echo", basic::Echo)
        .register("tasker.fail", basic::Fail)
        .register("tasker.http", http::Http::new());
    #[cfg(feature = "failpoints")]
    let registry = registry.register("failpoint.crash", crate::failpoint::Crash);
    registry
}
