//! `tasker.wait`: a step the coordinator runs, holding no worker slot, that completes
//! with the payload of a signal (`POST /v1/tasks/{task_id}/signals/{signal}`).
//!
//! ```yaml
//!   - name: approval
//!     handler: tasker.wait
//!     depends_on: [quote]
//!     config: {signal: approved, timeout: 2d}   # fails with `wait_timeout` after two days
//! ```
//!
//! Its config is checked when the template is registered: `signal` (identifier rules, 1–128
//! characters) and an optional `timeout` (a whole number of `s`, `m`, `h` or `d`, 1s to
//! 366d, counted from when it starts waiting).

use serde_json::{Map, Value};

use super::limits::about;
use super::walker::{Walker, field, identifier_error, join};
use super::{codes, timeout_ms};

/// The handler the coordinator runs as a wait.
pub const WAIT_HANDLER: &str = "tasker.wait";

/// The longest signal name.
const MAX_SIGNAL_LEN: usize = 128;

/// The `config` of a step the coordinator runs (`handler`), which cannot fan out: the
/// object, or `None` with `missing_key` reported (`usage` says what it needs).
pub(super) fn coordinator_config<'a>(
    w: &mut Walker,
    object: &'a Map<String, Value>,
    path: &str,
    config_key: &str,
    step: Option<&str>,
    handler: &str,
    usage: &str,
) -> Option<&'a Map<String, Value>> {
    if field(object, "for_each").is_some() {
        w.report(
            join(path, "for_each"),
            codes::INVALID_VALUE,
            format!("{}: a `{handler}` step cannot fan out", about(step)),
        );
    }
    let config = field(object, config_key).and_then(Value::as_object);
    if config.is_none() {
        w.report(
            join(path, config_key),
            codes::MISSING_KEY,
            format!("{}: `{handler}` needs `{config_key}: {usage}`", about(step)),
        );
    }
    config
}

/// Check a `tasker.wait` step's config (its key `config_key`, at `path`) and that it
/// does not fan out.
pub(super) fn walk_wait(
    w: &mut Walker,
    object: &Map<String, Value>,
    path: &str,
    config_key: &str,
    step: Option<&str>,
) {
    let config_path = join(path, config_key);
    let Some(config) = coordinator_config(
        w,
        object,
        path,
        config_key,
        step,
        WAIT_HANDLER,
        "{signal: <name>, timeout?: <duration>}",
    ) else {
        return;
    };
    w.unknown_keys(config, &config_path, &["signal", "timeout"], &[]);
    match config.get("signal") {
        Some(Value::String(signal)) => {
            if let Some(error) = identifier_error(signal, MAX_SIGNAL_LEN) {
                w.report(
                    join(&config_path, "signal"),
                    codes::INVALID_VALUE,
                    format!("{}: the signal `{signal}` {error}", about(step)),
                );
            } else if signal.is_empty() {
                w.report(
                    join(&config_path, "signal"),
                    codes::INVALID_VALUE,
                    format!("{}: the signal is empty", about(step)),
                );
            }
        }
        Some(other) => w.wrong_type(&join(&config_path, "signal"), "a string", other),
        None => w.report(
            join(&config_path, "signal"),
            codes::MISSING_KEY,
            format!(
                "{}: `tasker.wait` needs the `signal` it waits for",
                about(step)
            ),
        ),
    }
    match config.get("timeout") {
        None => {}
        Some(Value::String(text)) if timeout_ms(text).is_some() => {}
        Some(other) => w.report(
            join(&config_path, "timeout"),
            codes::INVALID_VALUE,
            format!(
                "{}: the timeout is {other}: expected a whole number of seconds, minutes, hours or days (`90s`, `30m`, `12h`, `7d`), from 1s to 366d",
                about(step)
            ),
        ),
    }
}

/// A `tasker.wait` step's timeout in milliseconds, from its (checked) config.
pub fn wait_timeout_ms(config: &Value) -> Option<i64> {
    config
        .get("timeout")
        .and_then(Value::as_str)
        .and_then(timeout_ms)
}
