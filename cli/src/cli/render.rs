//! Turning the API's JSON into text for people: tables, the task view, the readiness
//! explanation, API errors and the Mermaid diagram. Pure functions of the JSON, so they
//! are tested without a coordinator.

use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use serde_json::Value;
use tasker_shared::states::{StepStatus, TaskStatus};
use tasker_shared::template::DEFAULT_PRIORITY;

/// Whether to colour the output (ANSI escapes).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Style {
    pub(crate) color: bool,
}

impl Style {
    #[cfg(test)]
    pub(crate) const PLAIN: Style = Style { color: false };

    /// `text` in the colour of a task or step status.
    pub(crate) fn status(self, status: &str) -> String {
        self.paint(status_color(status), status)
    }

    /// `text` in an ANSI colour (an SGR code such as `"31"`), when colouring.
    pub(crate) fn paint(self, code: Option<&str>, text: &str) -> String {
        match code {
            Some(code) if self.color => format!("\x1b[{code}m{text}\x1b[0m"),
            _ => text.to_owned(),
        }
    }

    pub(crate) fn bold(self, text: &str) -> String {
        self.paint(Some("1"), text)
    }

    pub(crate) fn dim(self, text: &str) -> String {
        self.paint(Some("2"), text)
    }
}

/// The terminal colour of a task's or step's status (a task's statuses are step statuses
/// too): complete green, error red, running blue, retrying orange (yellow), pending grey,
/// cancelled magenta, resolved by hand cyan, skipped dim. A status this build does not know (from a
/// newer server) is left plain.
pub(crate) fn status_color(status: &str) -> Option<&'static str> {
    Some(match status.parse::<StepStatus>().ok()? {
        StepStatus::Complete => "32",
        StepStatus::Error => "31",
        StepStatus::InProgress | StepStatus::Enqueued => "34",
        StepStatus::WaitingForRetry => "33",
        StepStatus::Pending => "90",
        StepStatus::Cancelled => "35",
        StepStatus::ResolvedManually => "36",
        StepStatus::Skipped => "2",
    })
}

/// Whether a task in this status changes no more without an operator.
pub(crate) fn task_finished(status: &str) -> bool {
    status
        .parse::<TaskStatus>()
        .is_ok_and(TaskStatus::is_finished)
}

// ---------------------------------------------------------------- tables ---

/// A table with a header row; columns are padded to their widest cell.
pub(crate) struct Table {
    headers: Vec<&'static str>,
    rows: Vec<Vec<Cell>>,
}

/// One cell: its text, and the colour to paint it in.
pub(crate) struct Cell {
    text: String,
    color: Option<&'static str>,
}

impl From<String> for Cell {
    fn from(text: String) -> Self {
        Cell { text, color: None }
    }
}

impl From<&str> for Cell {
    fn from(text: &str) -> Self {
        Cell {
            text: text.to_owned(),
            color: None,
        }
    }
}

impl Cell {
    /// A status, coloured by [`status_color`].
    pub(crate) fn status(status: &str) -> Self {
        Cell {
            text: status.to_owned(),
            color: status_color(status),
        }
    }
}

impl Table {
    pub(crate) fn new(headers: &[&'static str]) -> Self {
        Table {
            headers: headers.to_vec(),
            rows: Vec::new(),
        }
    }

    pub(crate) fn row(&mut self, cells: Vec<Cell>) {
        self.rows.push(cells);
    }

    pub(crate) fn render(&self, style: Style) -> String {
        let columns = self.headers.len();
        let mut widths: Vec<usize> = self.headers.iter().map(|h| width(h)).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate().take(columns) {
                widths[i] = widths[i].max(width(&cell.text));
            }
        }
        let mut out = String::new();
        let line = |out: &mut String, cells: Vec<(String, Option<&str>)>| {
            let last = cells.len().saturating_sub(1);
            let mut text = String::new();
            for (i, (cell, color)) in cells.into_iter().enumerate() {
                let pad = widths[i].saturating_sub(width(&cell));
                text.push_str(&style.paint(color, &cell));
                if i < last {
                    text.push_str(&" ".repeat(pad + 2));
                }
            }
            out.push_str(text.trim_end());
            out.push('\n');
        };
        line(
            &mut out,
            self.headers
                .iter()
                .map(|h| ((*h).to_owned(), Some("1")))
                .collect(),
        );
        for row in &self.rows {
            line(
                &mut out,
                (0..columns)
                    .map(|i| {
                        row.get(i)
                            .map_or((String::new(), None), |c| (c.text.clone(), c.color))
                    })
                    .collect(),
            );
        }
        out
    }
}

/// Display width of a cell (one column per character; the API's names are ASCII).
fn width(text: &str) -> usize {
    text.chars().count()
}

/// `text` cut to `max` characters, with `…` when cut; newlines become spaces.
pub(crate) fn truncate(text: &str, max: usize) -> String {
    let flat: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if flat.chars().count() <= max {
        flat
    } else {
        let mut cut: String = flat.chars().take(max.saturating_sub(1)).collect();
        cut.push('…');
        cut
    }
}

// ------------------------------------------------------------ formatting ---

pub(crate) fn text<'a>(value: &'a Value, key: &str) -> &'a str {
    value[key].as_str().unwrap_or_default()
}

pub(crate) fn time(value: &Value, key: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(value[key].as_str()?)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// `1.23s`, `450ms`, `2m05s`, `1h02m`.
pub(crate) fn duration(seconds: f64) -> String {
    let seconds = seconds.max(0.0);
    if seconds < 1.0 {
        format!("{}ms", (seconds * 1000.0).round() as u64)
    } else if seconds < 60.0 {
        format!("{seconds:.2}s")
    } else if seconds < 3600.0 {
        let whole = seconds.round() as u64;
        format!("{}m{:02}s", whole / 60, whole % 60)
    } else {
        let minutes = (seconds / 60.0).round() as u64;
        format!("{}h{:02}m", minutes / 60, minutes % 60)
    }
}

fn seconds_between(from: DateTime<Utc>, to: DateTime<Utc>) -> f64 {
    (to - from).num_milliseconds() as f64 / 1000.0
}

/// How long a step ran: until it completed, or until now while it runs (`…` after).
pub(crate) fn step_duration(step: &Value, now: DateTime<Utc>) -> String {
    match (time(step, "started_at"), time(step, "completed_at")) {
        (Some(start), Some(end)) => duration(seconds_between(start, end)),
        (Some(start), None) if text(step, "status").parse() == Ok(StepStatus::InProgress) => {
            format!("{}…", duration(seconds_between(start, now)))
        }
        _ => "-".to_owned(),
    }
}

/// `attempts/retry_limit`.
pub(crate) fn attempts(step: &Value) -> String {
    format!(
        "{}/{}",
        step["attempts"].as_i64().unwrap_or(0),
        step["retry_limit"].as_i64().unwrap_or(0)
    )
}

/// A step's `last_error` in one line: `kind code: message`.
pub(crate) fn last_error(step: &Value) -> String {
    let error = &step["last_error"];
    if !error.is_object() {
        return String::new();
    }
    let mut label = text(error, "kind").to_owned();
    if let Some(code) = error["code"]
        .as_str()
        .filter(|c| !c.is_empty() && *c != label)
    {
        if !label.is_empty() {
            label.push(' ');
        }
        label.push_str(code);
    }
    let mut message = text(error, "message");
    // Handlers often start their message with the code; say it once.
    if let Some(code) = error["code"].as_str().filter(|c| !c.is_empty())
        && let Some(rest) = message.strip_prefix(code).and_then(|r| r.strip_prefix(':'))
    {
        message = rest.trim_start();
    }
    match (label.is_empty(), message.is_empty()) {
        (true, _) => message.to_owned(),
        (false, true) => label,
        (false, false) => format!("{label}: {message}"),
    }
}

fn full_time(time: DateTime<Utc>) -> String {
    time.format("%Y-%m-%d %H:%M:%S%.3fZ").to_string()
}

fn compact_json(value: &Value) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

// ----------------------------------------------------------------- views ---

/// A task: a header of `key  value` lines, then its steps.
pub(crate) fn task(task: &Value, style: Style, now: DateTime<Utc>) -> String {
    let mut header: Vec<(&str, String)> = vec![
        ("Task", style.bold(text(task, "task_id"))),
        (
            "Template",
            format!(
                "{}/{} {}",
                text(task, "namespace"),
                text(task, "name"),
                text(task, "version")
            ),
        ),
        ("Status", style.status(text(task, "status"))),
    ];
    let execution = &task["execution"];
    if execution.is_object() {
        let mut progress = format!(
            "{}/{} steps done ({:.0}%)",
            execution["completed_steps"].as_i64().unwrap_or(0),
            execution["total_steps"].as_i64().unwrap_or(0),
            execution["completion_percentage"].as_f64().unwrap_or(0.0)
        );
        for key in ["execution_status", "health"] {
            let value = text(execution, key);
            if !value.is_empty() {
                let _ = write!(progress, ", {value}");
            }
        }
        let action = text(execution, "recommended_action");
        if !action.is_empty() && action != "none" {
            let _ = write!(progress, " (next: {action})");
        }
        header.push(("Progress", progress));
    }
    if let Some(created) = time(task, "created_at") {
        header.push(("Created", full_time(created)));
        if let Some(completed) = time(task, "completed_at") {
            header.push((
                "Finished",
                format!(
                    "{} (took {})",
                    full_time(completed),
                    duration(seconds_between(created, completed))
                ),
            ));
        }
    }
    if let Some(at) = time(task, "run_at") {
        header.push(("Runs at", full_time(at)));
    }
    if let Some(at) = time(task, "deadline_at") {
        header.push(("Deadline", full_time(at)));
    }
    // Shown when it is not the default, which most tasks have.
    if let Some(priority) = task["priority"]
        .as_i64()
        .filter(|&priority| priority != i64::from(DEFAULT_PRIORITY))
    {
        header.push(("Priority", priority.to_string()));
    }
    for (label, key) in [
        ("Parent", "parent_task_id"),
        ("Key", "idempotency_key"),
        ("Initiator", "initiator"),
        ("Source", "source_system"),
        ("Reason", "reason"),
    ] {
        if let Some(value) = task[key].as_str() {
            header.push((label, value.to_owned()));
        }
    }
    if task["context"].is_object() {
        header.push(("Context", truncate(&compact_json(&task["context"]), 100)));
    }

    let mut out = String::new();
    for (label, value) in header {
        let _ = writeln!(out, "{label:<9} {value}");
    }
    let steps = task["steps"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    if !steps.is_empty() {
        out.push('\n');
        out.push_str(&steps_table(steps, style, now));
    }
    let children = task["children"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    if !children.is_empty() {
        out.push('\n');
        out.push_str(&children_table(children, style));
    }
    out
}

/// The child tasks of a task (`tasker.task` steps): id, step, template, status.
fn children_table(children: &[Value], style: Style) -> String {
    let mut table = Table::new(&["CHILD TASK", "STEP", "TEMPLATE", "STATUS"]);
    for child in children {
        table.row(vec![
            text(child, "task_id").into(),
            text(child, "step").into(),
            format!(
                "{}/{} {}",
                text(child, "namespace"),
                text(child, "name"),
                text(child, "version")
            )
            .into(),
            Cell::status(text(child, "status")),
        ]);
    }
    table.render(style)
}

/// The steps of a task: name, status, attempts, started, duration, last error.
pub(crate) fn steps_table(steps: &[Value], style: Style, now: DateTime<Utc>) -> String {
    let mut table = Table::new(&[
        "STEP",
        "STATUS",
        "ATTEMPTS",
        "STARTED",
        "DURATION",
        "LAST ERROR",
    ]);
    for step in steps {
        let started = time(step, "started_at")
            .map(|t| t.format("%H:%M:%S%.3f").to_string())
            .unwrap_or_else(|| "-".into());
        table.row(vec![
            text(step, "name").into(),
            Cell::status(text(step, "status")),
            attempts(step).into(),
            started.into(),
            step_duration(step, now).into(),
            truncate(&last_error(step), 80).into(),
        ]);
    }
    table.render(style)
}

/// One step (as `POST …/resolve` answers it).
pub(crate) fn step(step: &Value, style: Style) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{:<9} {}", "Step", style.bold(text(step, "name")));
    let _ = writeln!(
        out,
        "{:<9} {}",
        "Status",
        style.status(text(step, "status"))
    );
    let _ = writeln!(out, "{:<9} {}", "Handler", text(step, "handler"));
    let _ = writeln!(out, "{:<9} {}", "Attempts", attempts(step));
    if !step["results"].is_null() {
        let _ = writeln!(
            out,
            "{:<9} {}",
            "Results",
            truncate(&compact_json(&step["results"]), 200)
        );
    } else if step["results_omitted"] == true {
        let _ = writeln!(
            out,
            "{:<9} left out of the task's page: `tasker steps show`",
            "Results"
        );
    }
    let error = last_error(step);
    if !error.is_empty() {
        let _ = writeln!(out, "{:<9} {error}", "Error");
    }
    out
}

/// `GET /v1/tasks`: one line per task.
pub(crate) fn task_list(body: &Value, style: Style) -> String {
    let tasks = body["tasks"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    if tasks.is_empty() {
        return "no tasks\n".to_owned();
    }
    let mut table = Table::new(&["TASK", "TEMPLATE", "VERSION", "STATUS", "CREATED", "TOOK"]);
    for task in tasks {
        let took = match (time(task, "created_at"), time(task, "completed_at")) {
            (Some(start), Some(end)) => duration(seconds_between(start, end)),
            _ => "-".to_owned(),
        };
        table.row(vec![
            text(task, "task_id").into(),
            format!("{}/{}", text(task, "namespace"), text(task, "name")).into(),
            text(task, "version").into(),
            Cell::status(text(task, "status")),
            time(task, "created_at")
                .map(|t| t.format("%Y-%m-%d %H:%M:%SZ").to_string())
                .unwrap_or_default()
                .into(),
            took.into(),
        ]);
    }
    table.render(style)
}

/// `GET /v1/templates`.
pub(crate) fn template_list(body: &Value, style: Style) -> String {
    let templates = body["templates"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    if templates.is_empty() {
        return "no templates\n".to_owned();
    }
    let mut table = Table::new(&["NAMESPACE", "NAME", "VERSION", "STEPS", "DESCRIPTION"]);
    for template in templates {
        table.row(vec![
            text(template, "namespace").into(),
            text(template, "name").into(),
            text(template, "version").into(),
            template["step_count"]
                .as_i64()
                .map(|n| n.to_string())
                .unwrap_or_default()
                .into(),
            truncate(text(template, "description"), 60).into(),
        ]);
    }
    table.render(style)
}

/// Percentiles as `p50 / p95 / p99` in milliseconds, or `-`.
fn percentiles(value: &Value) -> String {
    match (
        value["p50"].as_f64(),
        value["p95"].as_f64(),
        value["p99"].as_f64(),
    ) {
        (Some(p50), Some(p95), Some(p99)) => format!("{p50:.0} / {p95:.0} / {p99:.0}"),
        _ => "-".to_owned(),
    }
}

fn rate(value: &Value) -> String {
    value
        .as_f64()
        .map(|rate| format!("{:.1}%", rate * 100.0))
        .unwrap_or_else(|| "-".to_owned())
}

/// `GET /v1/analytics/templates`: one line per template.
pub(crate) fn analytics_templates(body: &Value, style: Style) -> String {
    let rows = body["templates"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    if rows.is_empty() {
        return "no tasks in the window\n".to_owned();
    }
    let mut table = Table::new(&[
        "TEMPLATE",
        "TASKS",
        "COMPLETE",
        "ERROR",
        "CANCELLED",
        "DURATION MS P50/P95/P99",
        "PER MIN",
    ]);
    for row in rows {
        table.row(vec![
            format!("{}/{}", text(row, "namespace"), text(row, "name")).into(),
            row["tasks"].to_string().into(),
            row["complete"].to_string().into(),
            row["error"].to_string().into(),
            row["cancelled"].to_string().into(),
            percentiles(&row["duration_ms"]).into(),
            format!("{:.1}", row["throughput_per_min"].as_f64().unwrap_or(0.0)).into(),
        ]);
    }
    table.render(style)
}

/// `GET /v1/analytics/steps`: one line per step.
pub(crate) fn analytics_steps(body: &Value, style: Style) -> String {
    let rows = body["steps"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    if rows.is_empty() {
        return "no steps in the window\n".to_owned();
    }
    let mut table = Table::new(&[
        "STEP",
        "RUNS",
        "ATTEMPTS",
        "ERRORS",
        "RETRIED",
        "RUN MS P50/P95/P99",
        "WAIT MS P50/P95/P99",
    ]);
    for row in rows {
        table.row(vec![
            text(row, "step").into(),
            row["runs"].to_string().into(),
            row["mean_attempts"]
                .as_f64()
                .map(|a| format!("{a:.1}"))
                .unwrap_or_else(|| "-".into())
                .into(),
            rate(&row["error_rate"]).into(),
            rate(&row["retry_rate"]).into(),
            percentiles(&row["run_ms"]).into(),
            percentiles(&row["wait_ms"]).into(),
        ]);
    }
    table.render(style)
}

/// `GET /v1/analytics/bottlenecks`: the critical path, one line per step.
pub(crate) fn analytics_bottlenecks(body: &Value, style: Style) -> String {
    let rows = body["path"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    let mut table = Table::new(&["STEP", "MEAN MS", "SHARE"]);
    for row in rows {
        table.row(vec![
            text(row, "step").into(),
            format!("{:.1}", row["mean_ms"].as_f64().unwrap_or(0.0)).into(),
            rate(&row["share"]).into(),
        ]);
    }
    format!(
        "critical path of {}/{}: {:.1} ms\n{}",
        text(body, "namespace"),
        text(body, "name"),
        body["total_ms"].as_f64().unwrap_or(0.0),
        table.render(style)
    )
}

/// A schedule's fire as one cell: its time, and its task's status (or, without a task,
/// what became of the fire: `skipped`, `missed`, `failed`).
fn last_run(fire: &Value) -> String {
    match time(fire, "time") {
        None => "-".into(),
        Some(at) => {
            let what = fire["status"].as_str().or(fire["outcome"].as_str());
            format!("{} {}", full_time(at), what.unwrap_or("-"))
        }
    }
}

/// `GET /v1/schedules`: one line per schedule.
pub(crate) fn schedule_list(body: &Value, style: Style) -> String {
    let schedules = body["schedules"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    if schedules.is_empty() {
        return "no schedules\n".to_owned();
    }
    let mut table = Table::new(&[
        "NAME",
        "TEMPLATE",
        "CRON",
        "TIMEZONE",
        "NEXT FIRE",
        "LAST RUN",
        "STATE",
    ]);
    for schedule in schedules {
        table.row(vec![
            text(schedule, "name").into(),
            format!(
                "{}/{}",
                text(schedule, "namespace"),
                text(schedule, "template")
            )
            .into(),
            text(schedule, "cron").into(),
            text(schedule, "timezone").into(),
            time(schedule, "next_fire_at")
                .map(full_time)
                .unwrap_or_else(|| "-".into())
                .into(),
            last_run(&schedule["last_runs"][0]).into(),
            Cell::status(if schedule["paused"] == true {
                "paused"
            } else {
                "active"
            }),
        ]);
    }
    table.render(style)
}

/// One schedule: its settings, next fire times and last fires.
pub(crate) fn schedule(schedule: &Value, style: Style) -> String {
    let mut out = String::new();
    let version = schedule["version"].as_str().unwrap_or("newest");
    for (label, value) in [
        ("Schedule", style.bold(text(schedule, "name"))),
        (
            "Template",
            format!(
                "{}/{} ({version})",
                text(schedule, "namespace"),
                text(schedule, "template")
            ),
        ),
        (
            "Cron",
            format!(
                "{} ({})",
                text(schedule, "cron"),
                text(schedule, "timezone")
            ),
        ),
        (
            "Policy",
            format!(
                "overlap {}, catch_up {}",
                text(schedule, "overlap"),
                text(schedule, "catch_up")
            ),
        ),
        (
            "State",
            if schedule["paused"] == true {
                "paused".to_owned()
            } else {
                "active".to_owned()
            },
        ),
        (
            "Context",
            truncate(&compact_json(&schedule["context"]), 100),
        ),
    ] {
        let _ = writeln!(out, "{label:<9} {value}");
    }
    let next: Vec<String> = schedule["next_runs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(str::to_owned)
        .collect();
    if !next.is_empty() {
        let _ = writeln!(out, "Next      {}", next.join(", "));
    }
    let runs = schedule["last_runs"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    if !runs.is_empty() {
        out.push('\n');
        let mut table = Table::new(&["FIRED FOR", "OUTCOME", "TASK", "STATUS"]);
        for run in runs {
            table.row(vec![
                text(run, "time").into(),
                text(run, "outcome").into(),
                run["task_id"].as_str().unwrap_or("-").into(),
                Cell::status(run["status"].as_str().unwrap_or("-")),
            ]);
        }
        out.push_str(&table.render(style));
    }
    out
}

/// `GET /v1/tasks/{id}/readiness`: one line per step, why it is (not) running.
pub(crate) fn readiness(body: &Value, style: Style) -> String {
    let steps = body["steps"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    let mut table = Table::new(&["STEP", "STATUS", "REASON", "MESSAGE"]);
    for step in steps {
        let reason = text(step, "reason");
        table.row(vec![
            text(step, "name").into(),
            Cell::status(text(step, "status")),
            Cell {
                text: reason.to_owned(),
                color: if step["ready"].as_bool() == Some(true) {
                    Some("32")
                } else {
                    None
                },
            },
            text(step, "message").into(),
        ]);
    }
    table.render(style)
}

/// An API error in a few lines: `error: code (status): message`, then each detail.
pub(crate) fn api_error(status: u16, code: &str, message: &str, details: &[Value]) -> String {
    let mut out = format!("error: {code} (HTTP {status})");
    if !message.is_empty() {
        let _ = write!(out, ": {message}");
    }
    out.push('\n');
    for detail in details {
        let _ = writeln!(out, "  - {}", detail_line(detail));
    }
    out
}

/// One entry of an error's `details`: `path: message (code)` when it has those fields.
fn detail_line(detail: &Value) -> String {
    let Some(message) = detail["message"].as_str() else {
        return compact_json(detail);
    };
    let mut line = String::new();
    if let Some(path) = detail["path"].as_str().filter(|p| !p.is_empty()) {
        let _ = write!(line, "{path}: ");
    }
    line.push_str(message);
    if let Some(code) = detail["code"].as_str().filter(|c| !c.is_empty()) {
        let _ = write!(line, " ({code})");
    }
    line
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn sample_task() -> Value {
        json!({
            "task_id": "0195f3c2-0000-7000-8000-000000000001",
            "namespace": "shop", "name": "order", "version": "1.0.0",
            "status": "error",
            "context": {"order": 7},
            "created_at": "2025-03-01T10:00:00Z",
            "completed_at": "2025-03-01T10:00:02.500Z",
            "execution": {"total_steps": 3, "completed_steps": 1, "completion_percentage": 33.3,
                          "execution_status": "blocked_by_failures", "health": "blocked",
                          "recommended_action": "handle_failures"},
            "steps": [
                {"name": "fetch", "status": "complete", "attempts": 1, "retry_limit": 3,
                 "depends_on": [], "started_at": "2025-03-01T10:00:00.100Z",
                 "completed_at": "2025-03-01T10:00:00.350Z"},
                {"name": "charge", "status": "error", "attempts": 3, "retry_limit": 3,
                 "depends_on": ["fetch"], "started_at": "2025-03-01T10:00:01Z",
                 "completed_at": "2025-03-01T10:00:02Z",
                 "last_error": {"kind": "permanent", "code": "declined", "message": "card declined"}},
                {"name": "end", "status": "pending", "attempts": 0, "retry_limit": 3,
                 "depends_on": ["fetch", "charge"]}
            ],
            "children": [
                {"task_id": "0195f3c2-0000-7000-8000-000000000002", "step": "fetch",
                 "namespace": "shop", "name": "lookup", "version": "2.0.0",
                 "status": "complete"}
            ]
        })
    }

    #[test]
    fn the_task_view_shows_the_header_and_every_step() {
        let text = task(&sample_task(), Style::PLAIN, Utc::now());
        assert!(text.contains("Template  shop/order 1.0.0"), "{text}");
        assert!(
            text.contains("1/3 steps done (33%), blocked_by_failures, blocked"),
            "{text}"
        );
        assert!(text.contains("took 2.50s"), "{text}");
        let lines: Vec<&str> = text.lines().collect();
        let header = lines.iter().position(|l| l.starts_with("STEP")).unwrap();
        assert!(lines[header].contains("ATTEMPTS") && lines[header].contains("LAST ERROR"));
        assert!(lines[header + 1].starts_with("fetch "));
        assert!(lines[header + 1].contains("250ms"), "{}", lines[header + 1]);
        assert!(
            lines[header + 2].contains("permanent declined: card declined"),
            "{}",
            lines[header + 2]
        );
        assert!(lines[header + 3].contains("0/3"));
        // Columns line up: STATUS starts at the same place on every row.
        let column = lines[header].find("STATUS").unwrap();
        assert_eq!(lines[header + 1].find("complete"), Some(column));
        assert_eq!(lines[header + 2].find("error"), Some(column));
        // The child tasks its steps started.
        let children = lines
            .iter()
            .position(|l| l.starts_with("CHILD TASK"))
            .unwrap();
        assert!(
            lines[children + 1].starts_with("0195f3c2-0000-7000-8000-000000000002  fetch"),
            "{text}"
        );
        assert!(lines[children + 1].contains("shop/lookup 2.0.0"), "{text}");
    }

    #[test]
    fn a_schedule_shows_its_clock_its_next_fires_and_its_last_runs() {
        let body = json!({
            "name": "morning", "namespace": "reports", "template": "daily", "version": null,
            "cron": "0 7 * * *", "timezone": "Europe/Paris", "overlap": "skip",
            "catch_up": "none", "paused": false, "context": {"format": "pdf"},
            "next_fire_at": "2026-12-06T06:00:00Z",
            "next_runs": ["2026-12-06T06:00:00Z", "2026-12-07T06:00:00Z"],
            "last_runs": [{"time": "2026-12-05T06:00:00Z", "outcome": "fired",
                           "task_id": "0195f3c2-0000-7000-8000-000000000009",
                           "status": "complete"}]
        });
        let text = schedule(&body, Style::PLAIN);
        assert!(text.contains("Template  reports/daily (newest)"), "{text}");
        assert!(
            text.contains("Cron      0 7 * * * (Europe/Paris)"),
            "{text}"
        );
        assert!(
            text.contains("Policy    overlap skip, catch_up none"),
            "{text}"
        );
        assert!(
            text.contains("Next      2026-12-06T06:00:00Z, 2026-12-07T06:00:00Z"),
            "{text}"
        );
        let run = text.lines().find(|l| l.starts_with("2026-12-05")).unwrap();
        assert!(run.contains("fired") && run.contains("complete"), "{run}");
        let list = schedule_list(&json!({"schedules": [body]}), Style::PLAIN);
        let row = list.lines().nth(1).unwrap();
        assert!(
            row.starts_with("morning  reports/daily  0 7 * * *"),
            "{list}"
        );
        assert!(row.ends_with("active"), "{list}");
    }

    #[test]
    fn analytics_tables_show_percentiles_and_rates() {
        let steps = json!({"steps": [
            {"step": "slow", "runs": 3, "mean_attempts": 1.0, "error_rate": 0.0,
             "retry_rate": 0.0, "run_ms": {"p50": 403.2, "p95": 404.0, "p99": 404.4},
             "wait_ms": {"p50": 4.0, "p95": 5.0, "p99": 5.0}},
            {"step": "never", "runs": 0, "mean_attempts": null, "error_rate": null,
             "retry_rate": null, "run_ms": null, "wait_ms": null}
        ]});
        let text = analytics_steps(&steps, Style::PLAIN);
        let slow = text.lines().find(|l| l.starts_with("slow")).unwrap();
        assert!(
            slow.contains("403 / 404 / 404") && slow.contains("0.0%"),
            "{text}"
        );
        let never = text.lines().find(|l| l.starts_with("never")).unwrap();
        assert!(never.contains(" -"), "{text}");
        let path = json!({"namespace": "s", "name": "shop", "total_ms": 420.5,
            "path": [{"step": "slow", "mean_ms": 400.0, "share": 0.9512}]});
        let text = analytics_bottlenecks(&path, Style::PLAIN);
        assert!(
            text.starts_with("critical path of s/shop: 420.5 ms"),
            "{text}"
        );
        assert!(text.contains("95.1%"), "{text}");
    }

    #[test]
    fn api_errors_list_their_details() {
        let text = api_error(
            422,
            "invalid_context",
            "1 problem",
            &[
                json!({"path": "/who", "code": "type", "message": "7 is not a string"}),
                json!({"other": 1}),
            ],
        );
        assert_eq!(
            text,
            "error: invalid_context (HTTP 422): 1 problem\n  - /who: 7 is not a string (type)\n  - {\"other\":1}\n"
        );
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(duration(0.0123), "12ms");
        assert_eq!(duration(2.5), "2.50s");
        assert_eq!(duration(125.0), "2m05s");
        assert_eq!(duration(3720.0), "1h02m");
        assert_eq!(truncate("abcdef", 4), "abc…");
    }
}
