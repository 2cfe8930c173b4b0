//! The `backoff` key of a step (or of `defaults`): how long a failed step waits before its
//! next attempt.
//!
//! ```yaml
//! backoff: {base_seconds: 1, max_seconds: 30, jitter: true}   # exponential (the default)
//! backoff: {schedule: [1, 5, 30, 120]}                        # attempt n waits schedule[n]
//! ```

use serde_json::{Map, Value};

use super::walker::{Walker, field, join, kind};
use super::{Backoff, MAX_RETRY_LIMIT, codes};

/// The most delays a `schedule` may list: one per retry of a step's most attempts.
const MAX_SCHEDULE: usize = MAX_RETRY_LIMIT as usize;

pub(super) const KEYS: &[&str] = &["base_seconds", "max_seconds", "jitter", "schedule"];
pub(super) const HINTS: &[(&str, &str)] = &[
    ("base", "base_seconds"),
    ("base_ms", "base_seconds"),
    ("max", "max_seconds"),
    ("max_ms", "max_seconds"),
    ("cap_seconds", "max_seconds"),
    ("delays", "schedule"),
];
/// Longest wait between two attempts: one day.
const MAX_SECONDS: f64 = 86_400.0;

/// Read `backoff` from `object`, starting from `inherited` (the template's defaults).
pub(super) fn walk_backoff(
    w: &mut Walker,
    object: &Map<String, Value>,
    parent: &str,
    inherited: &Backoff,
) -> Backoff {
    let Some(value) = field(object, "backoff") else {
        return inherited.clone();
    };
    let path = join(parent, "backoff");
    let Some(spec) = value.as_object() else {
        w.not_an_object(&path, value, "`backoff`");
        return inherited.clone();
    };
    w.unknown_keys(spec, &path, KEYS, HINTS);
    let base = seconds(w, spec, &path, "base_seconds");
    let max = seconds(w, spec, &path, "max_seconds");
    let jitter = w.optional_bool(spec, &path, "jitter");

    if let Some(schedule) = field(spec, "schedule") {
        let schedule_path = join(&path, "schedule");
        if base.is_some() || jitter.is_some() {
            w.report(
                &path,
                codes::INVALID_VALUE,
                "`schedule` replaces the exponential policy: drop `base_seconds` and `jitter`",
            );
        }
        let Some(entries) = schedule.as_array() else {
            w.wrong_type(&schedule_path, "a list of seconds", schedule);
            return inherited.clone();
        };
        if entries.is_empty() {
            w.report(
                &schedule_path,
                codes::INVALID_VALUE,
                "`schedule` must list at least one delay",
            );
            return inherited.clone();
        }
        // A step has at most MAX_RETRY_LIMIT attempts, so no more waits; and the schedule
        // is copied into every step, and every step row of every task.
        if entries.len() > MAX_SCHEDULE {
            w.report(
                &schedule_path,
                codes::INVALID_VALUE,
                format!(
                    "`schedule` lists {} delays; at most {MAX_SCHEDULE} (a step has at most \
                     {MAX_RETRY_LIMIT} attempts)",
                    entries.len()
                ),
            );
            return inherited.clone();
        }
        let mut delays_ms = Vec::with_capacity(entries.len());
        for (index, entry) in entries.iter().enumerate() {
            if let Some(ms) = to_ms(w, entry, &format!("{schedule_path}[{index}]")) {
                delays_ms.push(ms);
            }
        }
        let longest = delays_ms.iter().copied().max().unwrap_or(0);
        return Backoff {
            base_ms: Backoff::default().base_ms,
            max_ms: max.unwrap_or(longest.max(1)),
            jitter: false,
            schedule_ms: Some(delays_ms),
        };
    }

    let resolved = Backoff {
        base_ms: base.unwrap_or(inherited.base_ms),
        max_ms: max.unwrap_or(inherited.max_ms),
        jitter: jitter.unwrap_or(inherited.jitter),
        schedule_ms: None,
    };
    if resolved.max_ms < resolved.base_ms {
        w.report(
            &path,
            codes::INVALID_VALUE,
            format!(
                "`max_seconds` ({}) must not be below `base_seconds` ({})",
                resolved.max_ms as f64 / 1000.0,
                resolved.base_ms as f64 / 1000.0
            ),
        );
    }
    resolved
}

fn seconds(w: &mut Walker, object: &Map<String, Value>, parent: &str, key: &str) -> Option<i64> {
    let value = field(object, key)?;
    let ms = to_ms(w, value, &join(parent, key))?;
    if ms == 0 {
        w.report(
            join(parent, key),
            codes::INVALID_VALUE,
            format!("`{key}` must be above 0"),
        );
        return None;
    }
    Some(ms)
}

/// Seconds (a number, fractions allowed) to whole milliseconds.
fn to_ms(w: &mut Walker, value: &Value, path: &str) -> Option<i64> {
    let Some(seconds) = value.as_f64() else {
        w.report(
            path,
            codes::WRONG_TYPE,
            format!("expected a number of seconds, found {}", kind(value)),
        );
        return None;
    };
    if !(0.0..=MAX_SECONDS).contains(&seconds) {
        w.report(
            path,
            codes::INVALID_VALUE,
            format!("must be between 0 and {MAX_SECONDS} seconds, got {seconds}"),
        );
        return None;
    }
    Some((seconds * 1000.0).round() as i64)
}
