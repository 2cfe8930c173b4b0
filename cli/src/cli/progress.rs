//! The live display of `tasks create --wait`, on stderr: on a terminal, one line for the
//! task and one per step, redrawn in place at every poll; elsewhere (a pipe, a CI log),
//! one line whenever the task or a step changes.

use std::collections::HashMap;
use std::io::Write;
use std::time::Instant;

use chrono::Utc;
use serde_json::Value;
use tasker_shared::states::StepStatus;

use super::render::{self, Style, text};

/// Width of the bars.
const BAR: usize = 12;
/// Longest step name shown on a redrawn line.
const NAME: usize = 24;

pub(crate) struct Progress {
    started: Instant,
    style: Style,
    mode: Mode,
}

enum Mode {
    /// Redraw `drawn` lines in place.
    Terminal { drawn: usize, tick: usize },
    /// Print changes: the last task status and each step's (status, attempts).
    Lines {
        task: String,
        steps: HashMap<String, (String, i64)>,
    },
    /// Show nothing.
    Quiet,
}

impl Progress {
    /// `terminal`: stderr is a terminal; `quiet`: show nothing unless it is.
    pub(crate) fn new(terminal: bool, quiet: bool, style: Style) -> Self {
        let mode = if terminal {
            Mode::Terminal { drawn: 0, tick: 0 }
        } else if quiet {
            Mode::Quiet
        } else {
            Mode::Lines {
                task: String::new(),
                steps: HashMap::new(),
            }
        };
        Progress {
            started: Instant::now(),
            style,
            mode,
        }
    }

    /// Show the task as last read.
    pub(crate) fn update(&mut self, task: &Value) {
        let elapsed = self.started.elapsed().as_secs_f64();
        let style = self.style;
        let mut out = String::new();
        match &mut self.mode {
            Mode::Quiet => return,
            Mode::Terminal { drawn, tick } => {
                *tick += 1;
                let lines = terminal_lines(task, style, *tick, elapsed);
                // Autowrap off while drawing: a line wider than the terminal is clipped
                // instead of wrapped, so moving up `drawn` lines always lands at the top.
                out.push_str("\x1b[?7l");
                if *drawn > 0 {
                    out.push_str(&format!("\x1b[{drawn}A"));
                }
                for line in &lines {
                    out.push_str("\r\x1b[2K");
                    out.push_str(line);
                    out.push('\n');
                }
                out.push_str("\x1b[?7h");
                *drawn = lines.len();
            }
            Mode::Lines { task: last, steps } => {
                let stamp = format!("[{elapsed:>7.2}s]");
                let status = text(task, "status");
                if status != last {
                    let done = task["execution"]["completed_steps"].as_i64().unwrap_or(0);
                    let total = task["steps"].as_array().map_or(0, Vec::len);
                    let change = if last.is_empty() {
                        status.to_owned()
                    } else {
                        format!("{last} → {status}")
                    };
                    out.push_str(&format!(
                        "{stamp} task {} {change} ({done}/{total} steps done)\n",
                        text(task, "task_id")
                    ));
                    *last = status.to_owned();
                }
                for step in task["steps"].as_array().into_iter().flatten() {
                    let name = text(step, "name");
                    let status = text(step, "status").to_owned();
                    let attempts = step["attempts"].as_i64().unwrap_or(0);
                    let before = steps.insert(name.to_owned(), (status.clone(), attempts));
                    let change = match &before {
                        Some((old, old_attempts))
                            if *old == status && *old_attempts == attempts =>
                        {
                            continue;
                        }
                        Some((old, _)) if *old != status => format!("{old} → {status}"),
                        _ => status.clone(),
                    };
                    let mut line = format!("{stamp} step {name}: {change}");
                    if attempts > 0 {
                        line.push_str(&format!(" (attempt {})", render::attempts(step)));
                    }
                    if matches!(status.as_str(), "error" | "waiting_for_retry") {
                        let error = render::last_error(step);
                        if !error.is_empty() {
                            line.push_str(&format!(": {}", render::truncate(&error, 120)));
                        }
                    }
                    out.push_str(&line);
                    out.push('\n');
                }
            }
        }
        let mut stderr = std::io::stderr().lock();
        let _ = stderr.write_all(out.as_bytes());
        let _ = stderr.flush();
    }
}

/// The task line and one line per step.
fn terminal_lines(task: &Value, style: Style, tick: usize, elapsed: f64) -> Vec<String> {
    let steps = task["steps"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    let total = steps.len();
    let done = steps
        .iter()
        .filter(|s| matches!(text(s, "status"), "complete" | "resolved_manually"))
        .count();
    let status = text(task, "status");
    let filled = (done * BAR).checked_div(total).unwrap_or(0);
    let mut lines = vec![format!(
        "{} {}/{} {}  {}  {} {done}/{total} steps  {}",
        style.bold("task"),
        text(task, "namespace"),
        text(task, "name"),
        style.dim(text(task, "task_id")),
        style.paint(render::status_color(status), &format!("{status:<11}")),
        style.paint(
            render::status_color(status),
            &format!("{}{}", "█".repeat(filled), "░".repeat(BAR - filled))
        ),
        render::duration(elapsed),
    )];
    let now = Utc::now();
    let name_width = steps
        .iter()
        .map(|s| text(s, "name").chars().count())
        .max()
        .unwrap_or(0)
        .min(NAME);
    for step in steps {
        let status = text(step, "status");
        let mut line = format!(
            "  {:<name_width$}  {}  {:>5}  {}  {:>8}",
            render::truncate(text(step, "name"), name_width),
            style.paint(render::status_color(status), &format!("{status:<17}")),
            render::attempts(step),
            style.paint(render::status_color(status), &step_bar(status, tick)),
            render::step_duration(step, now),
        );
        if matches!(status, "error" | "waiting_for_retry") {
            let error = render::last_error(step);
            if !error.is_empty() {
                line.push_str("  ");
                line.push_str(&style.dim(&render::truncate(&error, 50)));
            }
        }
        lines.push(line);
    }
    lines
}

/// A step's bar: full when done, a moving block while it runs, empty while it waits.
fn step_bar(status: &str, tick: usize) -> String {
    let Ok(status) = status.parse::<StepStatus>() else {
        return "░".repeat(BAR);
    };
    match status {
        StepStatus::Complete | StepStatus::ResolvedManually | StepStatus::Error => "█".repeat(BAR),
        StepStatus::Skipped => "·".repeat(BAR),
        StepStatus::Cancelled => "─".repeat(BAR),
        StepStatus::InProgress => {
            let block = 3;
            let span = BAR - block;
            // Bounce left and right, one cell per poll.
            let phase = tick % (2 * span);
            let at = if phase < span {
                phase
            } else {
                2 * span - phase
            };
            format!(
                "{}{}{}",
                "░".repeat(at),
                "█".repeat(block),
                "░".repeat(BAR - block - at)
            )
        }
        StepStatus::Enqueued => format!("▒{}", "░".repeat(BAR - 1)),
        StepStatus::WaitingForRetry => {
            format!("{}{}", "▓".repeat(BAR / 2), "░".repeat(BAR - BAR / 2))
        }
        StepStatus::Pending => "░".repeat(BAR),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_keep_their_width() {
        for status in [
            "complete",
            "error",
            "cancelled",
            "enqueued",
            "waiting_for_retry",
            "pending",
        ] {
            assert_eq!(step_bar(status, 0).chars().count(), BAR, "{status}");
        }
        for tick in 0..40 {
            assert_eq!(step_bar("in_progress", tick).chars().count(), BAR);
        }
    }
}
