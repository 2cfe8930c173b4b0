//! `tasker`, the command-line client of the coordinator's HTTP API: the commands
//! (clap), what each one asks the API, and the exit codes. `client` speaks HTTP,
//! `render` turns the answers into tables and diagrams, `progress` shows a task run.

/// `print!` and friends that ignore a closed pipe (`tasker … | head`) instead of panicking.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stdout(), $($arg)*);
    }};
}
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}
macro_rules! err {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stderr(), $($arg)*);
    }};
}
macro_rules! errln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

mod client;
mod progress;
mod render;

use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use chrono::Utc;
use clap::builder::PossibleValuesParser;
use clap::{Args, Parser, Subcommand, ValueEnum};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::time::Instant;

use client::{Body, Client};
use render::{Style, text};
use tasker_shared::states::TaskStatus;

/// How often `--wait` reads the task.
const POLL_INTERVAL: Duration = Duration::from_millis(250);

const EXIT_CODES: &str = "\
Exit codes:
  0  success (with --wait: the task is complete)
  1  the API answered an error, or a template did not apply
  2  usage error (bad arguments, unreadable file, invalid JSON)
  3  the coordinator is unreachable
  4  with --wait: the task ended error, cancelled or resolved_manually
  5  with --wait: --timeout passed before the task finished";

#[derive(Parser)]
#[command(
    name = "tasker",
    version,
    about = "Command-line client of Tasker's coordinator API",
    after_help = EXIT_CODES
)]
struct Cli {
    /// Base URL of the coordinator's API.
    #[arg(
        long,
        global = true,
        env = "TASKER_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    url: String,
    /// Bearer token, sent as `Authorization: Bearer <token>`.
    #[arg(long, global = true, env = "TASKER_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// `table` for people; `json` prints the API's JSON as it answered (for scripts).
    #[arg(
        long,
        short = 'o',
        global = true,
        value_enum,
        default_value_t = Output::Table
    )]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Register and list workflow templates.
    #[command(subcommand)]
    Templates(TemplatesCommand),
    /// Create, inspect and operate tasks.
    #[command(subcommand)]
    Tasks(TasksCommand),
    /// Act on single steps.
    #[command(subcommand)]
    Steps(StepsCommand),
    /// Create, inspect, pause and delete schedules: tasks created on a clock.
    #[command(subcommand)]
    Schedules(SchedulesCommand),
    /// Figures from the stored tasks: per template, per step, a template's critical path.
    #[command(subcommand)]
    Analytics(AnalyticsCommand),
}

#[derive(Subcommand)]
enum AnalyticsCommand {
    /// Per template: tasks, outcomes, duration percentiles, throughput.
    Templates {
        /// Only this namespace.
        #[arg(long)]
        namespace: Option<String>,
        #[command(flatten)]
        window: WindowArgs,
    },
    /// Per step of a template: runs, attempts, error and retry rates, run and wait
    /// percentiles.
    Steps {
        /// The template: NAMESPACE/NAME.
        template: String,
        #[command(flatten)]
        window: WindowArgs,
    },
    /// A template's critical path: the chain of steps with the largest mean time from
    /// ready to done.
    Bottlenecks {
        /// The template: NAMESPACE/NAME.
        template: String,
        #[command(flatten)]
        window: WindowArgs,
    },
}

/// The window of task creation times (default the last 24 hours, at most 31 days).
#[derive(Args)]
struct WindowArgs {
    /// From this time (RFC 3339).
    #[arg(long, value_name = "TIME", value_parser = rfc3339)]
    since: Option<String>,
    /// Up to this time (RFC 3339; default now).
    #[arg(long, value_name = "TIME", value_parser = rfc3339)]
    until: Option<String>,
}

impl WindowArgs {
    fn query(self) -> Vec<(&'static str, String)> {
        let mut query = Vec::new();
        if let Some(since) = self.since {
            query.push(("since", since));
        }
        if let Some(until) = self.until {
            query.push(("until", until));
        }
        query
    }
}

#[derive(Subcommand)]
enum SchedulesCommand {
    /// List the schedules by name, with each one's next fire and last run.
    List {
        /// Only schedules of this template namespace.
        #[arg(long)]
        namespace: Option<String>,
        /// Most schedules to show (1–500).
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u16).range(1..=500))]
        limit: u16,
        /// Continue after an earlier page (its `next_cursor`; give the same namespace).
        #[arg(long)]
        cursor: Option<String>,
    },
    /// Show a schedule with its next fire times and its last fires.
    Get {
        /// The schedule's name.
        name: String,
    },
    /// Create a schedule.
    Create(ScheduleArgs),
    /// Stop a schedule's fires until it is resumed.
    Pause {
        /// The schedule's name.
        name: String,
    },
    /// Fire a paused schedule again, from its next fire time (nothing is caught up).
    Resume {
        /// The schedule's name.
        name: String,
    },
    /// Delete a schedule (the tasks it created stay).
    Delete {
        /// The schedule's name.
        name: String,
    },
}

#[derive(Args)]
struct ScheduleArgs {
    /// Its name: letters, digits, `_`, `-` and `.`.
    name: String,
    /// The template: NAMESPACE/NAME.
    template: String,
    /// Five cron fields (minute hour day-of-month month day-of-week), or six (a second
    /// first), quoted: '0 7 * * MON-FRI'.
    cron: String,
    /// An IANA time zone (default UTC).
    #[arg(long)]
    timezone: Option<String>,
    /// Template version (default: the newest at each fire).
    #[arg(long)]
    version: Option<String>,
    /// Each task's context: a JSON object, `@file.json`, or `@-` for stdin.
    #[arg(long)]
    context: Option<String>,
    /// While the previous fire's task runs: allow (default), skip or cancel_previous.
    #[arg(long, value_parser = PossibleValuesParser::new(["allow", "skip", "cancel_previous"]))]
    overlap: Option<String>,
    /// Fire times no coordinator ran at: none (default), latest or all.
    #[arg(long, value_parser = PossibleValuesParser::new(["none", "latest", "all"]))]
    catch_up: Option<String>,
    /// Create it paused.
    #[arg(long)]
    paused: bool,
}

#[derive(Subcommand)]
enum TemplatesCommand {
    /// Register a template file, or every *.yaml, *.yml and *.json file of a folder.
    Apply {
        /// A template file (YAML or JSON) or a folder of them.
        path: PathBuf,
    },
    /// List the registered templates, each with all its versions.
    List {
        /// Only this namespace's templates.
        #[arg(long)]
        namespace: Option<String>,
        /// Only templates of this name.
        #[arg(long)]
        name: Option<String>,
        /// Most templates to show (1–500), each with all its versions.
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u16).range(1..=500))]
        limit: u16,
        /// Continue after an earlier page (its `next_cursor`; give the same filters).
        #[arg(long)]
        cursor: Option<String>,
    },
    /// Print a Mermaid flowchart of a template's steps.
    Diagram {
        /// The template's namespace.
        namespace: String,
        /// The template's name.
        name: String,
        /// Template version (default: the latest).
        #[arg(long)]
        version: Option<String>,
    },
}

#[derive(Subcommand)]
enum TasksCommand {
    /// Create a task from a template (optionally wait for it to finish).
    Create(CreateArgs),
    /// Show a task and its steps.
    Get {
        /// The task id.
        id: String,
    },
    /// List tasks, newest first.
    List(ListArgs),
    /// Cancel a pending or running task, or every one a filter matches.
    #[command(after_help = BULK_HELP)]
    Cancel(OperateArgs),
    /// Retry a task in error (its failed steps get a fresh attempt budget), or every
    /// task in error a filter matches.
    #[command(after_help = BULK_HELP)]
    Retry(OperateArgs),
    /// Close a task in error by hand: its failure was dealt with outside Tasker, and
    /// nothing more of it runs (`resolved_manually`).
    Resolve {
        /// The task id.
        id: String,
        /// Why, for the history.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Send a signal to a task: its `tasker.wait` steps waiting for it complete with the
    /// payload as their results.
    Signal {
        /// The task id.
        id: String,
        /// The signal, as the step's `config.signal` names it.
        signal: String,
        /// The payload: JSON, `@file` or `@-` for stdin (default `{}`).
        #[arg(long)]
        data: Option<String>,
    },
    /// Explain, per step, why it is or is not running.
    Explain {
        /// The task id.
        id: String,
    },
    /// Print a Mermaid flowchart of the task's steps, coloured by status.
    Diagram {
        /// The task id.
        id: String,
    },
}

#[derive(Args)]
struct CreateArgs {
    /// The template: NAMESPACE/NAME.
    template: String,
    /// Template version (default: the latest).
    #[arg(long)]
    version: Option<String>,
    /// The task's context: a JSON object, `@file.json`, or `@-` for stdin.
    #[arg(long)]
    context: Option<String>,
    /// Creating twice with the same key answers the first task.
    #[arg(long)]
    idempotency_key: Option<String>,
    /// Priority, 0 to 9: among ready steps the higher is claimed first (default: the
    /// template's).
    #[arg(long, value_parser = clap::value_parser!(u8).range(0..=9))]
    priority: Option<u8>,
    /// Run its first steps no earlier than this time (RFC 3339, e.g.
    /// 2026-12-24T06:00:00Z).
    #[arg(long, value_name = "TIME", conflicts_with = "delay", value_parser = rfc3339)]
    run_at: Option<String>,
    /// Run its first steps after this long: a whole number and s, m, h or d (`90s`,
    /// `15m`).
    #[arg(long, value_name = "SPAN", value_parser = delay_ms)]
    delay: Option<i64>,
    /// End it in error if it has not finished by this time (RFC 3339).
    #[arg(long, value_name = "TIME", value_parser = rfc3339)]
    deadline: Option<String>,
    /// Show the task's progress and wait until it finishes.
    #[arg(long)]
    wait: bool,
    /// With --wait: give up after this many seconds (exit code 5).
    #[arg(long, requires = "wait", value_name = "SECS", value_parser = positive_seconds)]
    timeout: Option<f64>,
}

#[derive(Args)]
struct ListArgs {
    #[command(flatten)]
    filter: FilterArgs,
    /// Only tasks in this status.
    #[arg(long, value_parser = PossibleValuesParser::new(TaskStatus::ALL.iter().map(|s| s.as_str())))]
    status: Option<String>,
    /// `-created_at` (newest first, the default) or `created_at` (oldest first).
    #[arg(long, allow_hyphen_values = true,
          value_parser = PossibleValuesParser::new(["-created_at", "created_at"]))]
    order: Option<String>,
    /// Most tasks to show (1–500).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u16).range(1..=500))]
    limit: u16,
    /// Continue after an earlier page (its `next_cursor`; give the same filters and order).
    #[arg(long)]
    cursor: Option<String>,
}

/// The filters `tasks list`, `tasks cancel` and `tasks retry` share.
#[derive(Args)]
struct FilterArgs {
    /// Only tasks of this namespace.
    #[arg(long)]
    namespace: Option<String>,
    /// Only tasks of templates with this name.
    #[arg(long)]
    name: Option<String>,
    /// Only tasks having this tag; repeat for tasks having all of them.
    #[arg(long = "tag", value_name = "TAG")]
    tags: Vec<String>,
    /// Only tasks created after this time: RFC 3339, or an age such as 30m, 2h, 7d.
    #[arg(long, value_name = "TIME", value_parser = time_argument)]
    created_after: Option<String>,
    /// Only tasks created before this time: RFC 3339, or an age such as 30m, 2h, 7d.
    #[arg(long, value_name = "TIME", value_parser = time_argument)]
    created_before: Option<String>,
}

impl FilterArgs {
    fn is_empty(&self) -> bool {
        self.namespace.is_none()
            && self.name.is_none()
            && self.tags.is_empty()
            && self.created_after.is_none()
            && self.created_before.is_none()
    }
}

const BULK_HELP: &str = "\
With a task id, acts on that task. Without one, acts on every task the filter flags
match (at least one is needed), oldest first, at most --limit (default 1000, at most
10000): cancel on pending and in-progress tasks, retry on tasks in error. Each task is
changed exactly as if named alone. --dry-run lists what matches and changes nothing.
The ids acted on are printed one per line on stdout; the counts go to stderr.";

#[derive(Args)]
struct OperateArgs {
    /// The task id (or use the filter flags instead).
    #[arg(conflicts_with_all = ["namespace", "name", "tags", "created_after", "created_before", "status", "limit", "dry_run"])]
    id: Option<String>,
    /// Why (kept in each task's history).
    #[arg(long)]
    reason: Option<String>,
    #[command(flatten)]
    filter: FilterArgs,
    /// Only tasks in this status (cancel: pending or in_progress; retry: error).
    #[arg(long, value_parser = PossibleValuesParser::new(["pending", "in_progress", "error"]))]
    status: Option<String>,
    /// Most tasks to act on (1–10000; default 1000).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=10_000))]
    limit: Option<u16>,
    /// Show what matches; change nothing.
    #[arg(long)]
    dry_run: bool,
}

#[derive(Subcommand)]
enum StepsCommand {
    /// Show one step with its results whole (a task's page leaves out results past 16 MiB).
    Show {
        /// The task id.
        id: String,
        /// The step's name (an instance's: `load[3]`).
        step: String,
    },
    /// Resolve a step by hand: it counts as done and its dependents run.
    Resolve {
        /// The task id.
        id: String,
        /// The step's name.
        step: String,
        /// The step's results as its dependents will see them: JSON, `@file.json` or `@-`.
        #[arg(long)]
        results: Option<String>,
        /// Why (kept in the task's history).
        #[arg(long)]
        reason: Option<String>,
    },
}

fn rfc3339(text: &str) -> Result<String, String> {
    chrono::DateTime::parse_from_rfc3339(text)
        .map(|at| at.to_utc().to_rfc3339())
        .map_err(|error| {
            format!("`{text}` is not an RFC 3339 time such as 2026-12-24T06:00:00Z: {error}")
        })
}

fn delay_ms(text: &str) -> Result<i64, String> {
    tasker_shared::span::parse_span(text, &["s", "m", "h", "d"])
        .map(|span| span.num_milliseconds())
        .map_err(|_| format!("`{text}` is not a whole number and one of s, m, h, d (`90s`, `15m`)"))
}

fn positive_seconds(text: &str) -> Result<f64, String> {
    /// A year: any wait longer is a mistake, and would overflow the clock.
    const MAX_SECONDS: f64 = 31_536_000.0;
    match text.parse::<f64>() {
        Ok(seconds) if seconds.is_finite() && seconds > 0.0 && seconds <= MAX_SECONDS => {
            Ok(seconds)
        }
        Ok(seconds) if seconds.is_finite() && seconds > MAX_SECONDS => Err(format!(
            "`{text}` seconds is more than a year ({MAX_SECONDS} seconds)"
        )),
        _ => Err(format!("`{text}` is not a positive number of seconds")),
    }
}

/// Why a command failed; each kind has its exit code.
#[derive(Debug)]
pub(crate) enum CliError {
    /// The API answered an error (exit 1).
    Api {
        status: u16,
        code: String,
        message: String,
        details: Vec<Value>,
        /// The body as answered, for `--output json`.
        body: Value,
    },
    /// Something else did not work; already explained where needed (exit 1).
    Failed(String),
    /// Bad arguments or input files (exit 2).
    Usage(String),
    /// No coordinator at the URL (exit 3).
    Unreachable(String),
    /// A waited-for task ended other than `complete` (exit 4).
    TaskFailed(String),
    /// `--timeout` passed (exit 5).
    Timeout(String),
}

impl CliError {
    fn exit_code(&self) -> u8 {
        match self {
            CliError::Api { .. } | CliError::Failed(_) => 1,
            CliError::Usage(_) => 2,
            CliError::Unreachable(_) => 3,
            CliError::TaskFailed(_) => 4,
            CliError::Timeout(_) => 5,
        }
    }

    /// Explain on stderr; with `--output json`, an API error's body goes to stdout too.
    fn report(&self, output: Output) {
        match self {
            CliError::Api {
                status,
                code,
                message,
                details,
                body,
            } => {
                if output == Output::Json && !body.is_null() {
                    outln!("{}", pretty(body));
                }
                err!("{}", render::api_error(*status, code, message, details));
            }
            CliError::Usage(message) => {
                errln!("error: {message}");
                errln!("\nFor more information, try '--help'.");
            }
            CliError::Failed(message)
            | CliError::Unreachable(message)
            | CliError::TaskFailed(message)
            | CliError::Timeout(message) => errln!("error: {message}"),
        }
    }
}

/// Parse the arguments, run the command, and exit with its code.
pub(crate) fn main() -> ExitCode {
    let cli: Cli = tasker_shared::config::parse_or_exit();
    let output = cli.output;
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            errln!("error: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            error.report(output);
            ExitCode::from(error.exit_code())
        }
    }
}

/// What every command needs.
struct Context {
    client: Client,
    output: Output,
    /// Colours on stdout.
    style: Style,
}

impl Context {
    /// Print the answer: its JSON, or the table `render` makes of it.
    fn print(&self, body: &Value, render: impl FnOnce(&Value, Style) -> String) {
        match self.output {
            Output::Json => outln!("{}", pretty(body)),
            Output::Table => out!("{}", render(body, self.style)),
        }
    }
}

fn pretty(value: &Value) -> String {
    serde_json::to_string_pretty(value).unwrap_or_default()
}

fn colors(terminal: bool) -> Style {
    Style {
        color: terminal && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
    }
}

async fn run(cli: Cli) -> Result<(), CliError> {
    let context = Context {
        client: Client::new(&cli.url, cli.token.as_deref())?,
        output: cli.output,
        style: colors(std::io::stdout().is_terminal()),
    };
    match cli.command {
        Command::Templates(TemplatesCommand::Apply { path }) => apply(&context, &path).await,
        Command::Templates(TemplatesCommand::Diagram {
            namespace,
            name,
            version,
        }) => {
            let query: Vec<(&str, String)> = version.map(|v| ("version", v)).into_iter().collect();
            let diagram = context
                .client
                .get_text(&["v1", "templates", &namespace, &name, "diagram"], &query)
                .await?;
            out!("{diagram}");
            Ok(())
        }
        Command::Templates(TemplatesCommand::List {
            namespace,
            name,
            limit,
            cursor,
        }) => {
            let mut query = vec![("limit", limit.to_string())];
            for (key, value) in [("namespace", namespace), ("name", name), ("cursor", cursor)] {
                if let Some(value) = value {
                    query.push((key, value));
                }
            }
            let body = context.client.get(&["v1", "templates"], &query).await?;
            context.print(&body, render::template_list);
            if context.output == Output::Table
                && let Some(cursor) = body["next_cursor"].as_str()
            {
                errln!("more templates: add --cursor {cursor}");
            }
            Ok(())
        }
        Command::Tasks(TasksCommand::Create(args)) => create(&context, args).await,
        Command::Tasks(TasksCommand::Get { id }) => {
            let task = context.client.get(&["v1", "tasks", &id], &[]).await?;
            context.print(&task, |task, style| render::task(task, style, Utc::now()));
            Ok(())
        }
        Command::Tasks(TasksCommand::List(args)) => list(&context, args).await,
        Command::Tasks(TasksCommand::Cancel(args)) => {
            operate(&context, args, "cancel", "cancelled").await
        }
        Command::Tasks(TasksCommand::Retry(args)) => {
            operate(&context, args, "retry", "retried").await
        }
        Command::Tasks(TasksCommand::Resolve { id, reason }) => {
            let mut body = json!({});
            if let Some(reason) = reason {
                body["reason"] = json!(reason);
            }
            let response = context
                .client
                .post(&["v1", "tasks", &id, "resolve"], body)
                .await?;
            if context.output == Output::Table {
                errln!("resolved task {id}");
            }
            context.print(&response.body, |task, style| {
                render::task(task, style, Utc::now())
            });
            Ok(())
        }
        Command::Tasks(TasksCommand::Signal { id, signal, data }) => {
            let payload = match data {
                Some(text) => json_argument("--data", &text)?,
                None => json!({}),
            };
            let response = context
                .client
                .post(&["v1", "tasks", &id, "signals", &signal], payload)
                .await?;
            context.print(&response.body, |answer, _| {
                let steps = answer["steps"]
                    .as_array()
                    .map(|steps| {
                        steps
                            .iter()
                            .filter_map(Value::as_str)
                            .collect::<Vec<_>>()
                            .join(", ")
                    })
                    .unwrap_or_default();
                if answer["completed"] == true {
                    format!("signal `{signal}` received: {steps} completed\n")
                } else {
                    format!("signal `{signal}` kept: {steps} will complete when it waits\n")
                }
            });
            Ok(())
        }
        Command::Schedules(command) => schedules(&context, command).await,
        Command::Analytics(command) => analytics(&context, command).await,
        Command::Tasks(TasksCommand::Explain { id }) => {
            let body = context
                .client
                .get(&["v1", "tasks", &id, "readiness"], &[])
                .await?;
            context.print(&body, render::readiness);
            Ok(())
        }
        Command::Tasks(TasksCommand::Diagram { id }) => {
            let diagram = context
                .client
                .get_text(&["v1", "tasks", &id, "diagram"], &[])
                .await?;
            out!("{diagram}");
            Ok(())
        }
        Command::Steps(StepsCommand::Show { id, step }) => {
            let response = context
                .client
                .get(&["v1", "tasks", &id, "steps", &step], &[])
                .await?;
            context.print(&response, render::step);
            Ok(())
        }
        Command::Steps(StepsCommand::Resolve {
            id,
            step,
            results,
            reason,
        }) => {
            let mut body = json!({});
            if let Some(results) = results {
                body["results"] = json_argument("--results", &results)?;
            }
            if let Some(reason) = reason {
                body["reason"] = json!(reason);
            }
            let response = context
                .client
                .post(&["v1", "tasks", &id, "steps", &step, "resolve"], body)
                .await?;
            if context.output == Output::Table {
                errln!("resolved step `{step}` of task {id}");
            }
            context.print(&response.body, render::step);
            Ok(())
        }
    }
}

/// A JSON argument: inline JSON, `@path` for a file, `@-` for stdin.
fn json_argument(flag: &str, argument: &str) -> Result<Value, CliError> {
    let (source, text) = match argument.strip_prefix('@') {
        Some("-") => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .map_err(|error| {
                    CliError::Usage(format!("{flag} @-: cannot read stdin: {error}"))
                })?;
            ("stdin".to_owned(), text)
        }
        Some(path) => (
            path.to_owned(),
            std::fs::read_to_string(path)
                .map_err(|error| CliError::Usage(format!("{flag} @{path}: {error}")))?,
        ),
        None => ("the argument".to_owned(), argument.to_owned()),
    };
    serde_json::from_str(&text)
        .map_err(|error| CliError::Usage(format!("{flag}: {source} is not valid JSON: {error}")))
}

// ------------------------------------------------------------- templates ---

/// The template files `path` names: itself, or a folder's `*.yaml`, `*.yml`, `*.json`.
fn template_files(path: &Path) -> Result<Vec<PathBuf>, CliError> {
    let metadata = std::fs::metadata(path)
        .map_err(|error| CliError::Usage(format!("{}: {error}", path.display())))?;
    if !metadata.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let entries = std::fs::read_dir(path)
        .map_err(|error| CliError::Usage(format!("{}: {error}", path.display())))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|file| {
            file.is_file()
                && file
                    .extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"))
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(CliError::Usage(format!(
            "{} holds no *.yaml, *.yml or *.json file",
            path.display()
        )));
    }
    Ok(files)
}

/// `templates apply`: register each file; report each; fail if any did not apply.
async fn apply(context: &Context, path: &Path) -> Result<(), CliError> {
    let files = template_files(path)?;
    let style = context.style;
    let err_style = colors(std::io::stderr().is_terminal());
    let mut failed = 0;
    let mut report = Vec::new();
    let width = files
        .iter()
        .map(|f| f.display().to_string().chars().count())
        .max()
        .unwrap_or(0);
    for file in &files {
        let shown = file.display().to_string();
        let bytes =
            std::fs::read(file).map_err(|error| CliError::Usage(format!("{shown}: {error}")))?;
        let content_type = if file.extension().is_some_and(|e| e == "json") {
            "application/json"
        } else {
            "application/yaml"
        };
        let response = context
            .client
            .send(
                Method::POST,
                &["v1", "templates"],
                &[],
                Body::Raw {
                    content_type,
                    bytes,
                },
            )
            .await?;
        let status = response.status;
        let outcome = match status {
            StatusCode::CREATED => "created",
            StatusCode::OK => "unchanged",
            StatusCode::CONFLICT => "conflict",
            _ => "failed",
        };
        if context.output == Output::Json {
            report.push(
                json!({"file": shown, "outcome": outcome, "status": status.as_u16(),
                               "response": response.body}),
            );
            if !status.is_success() {
                failed += 1;
            }
            continue;
        }
        if status.is_success() {
            let body = &response.body;
            outln!(
                "{}  {shown:<width$}  {}/{} {}",
                style.paint(
                    Some(if status == StatusCode::CREATED {
                        "32"
                    } else {
                        "2"
                    }),
                    &format!("{outcome:<9}")
                ),
                text(body, "namespace"),
                text(body, "name"),
                text(body, "version"),
            );
        } else {
            failed += 1;
            let CliError::Api {
                status,
                code,
                message,
                details,
                ..
            } = response.into_error()
            else {
                unreachable!("into_error answers an API error");
            };
            err!(
                "{}  {shown:<width$}  {}",
                err_style.paint(Some("31"), &format!("{outcome:<9}")),
                render::api_error(status, &code, &message, &details).trim_start_matches("error: ")
            );
        }
    }
    if context.output == Output::Json {
        outln!("{}", pretty(&Value::Array(report)));
    }
    if failed > 0 {
        return Err(CliError::Failed(format!(
            "{failed} of {} template file(s) did not apply",
            files.len()
        )));
    }
    Ok(())
}

// ----------------------------------------------------------------- tasks ---

/// `tasks create`, and with `--wait` the progress display until the task finishes.
async fn create(context: &Context, args: CreateArgs) -> Result<(), CliError> {
    let (namespace, name) = args
        .template
        .split_once('/')
        .filter(|(namespace, name)| !namespace.is_empty() && !name.is_empty())
        .ok_or_else(|| {
            CliError::Usage(format!(
                "`{}` is not NAMESPACE/NAME (for example `shop/order`)",
                args.template
            ))
        })?;
    let mut body = json!({"namespace": namespace, "name": name});
    if let Some(version) = &args.version {
        body["version"] = json!(version);
    }
    if let Some(text) = &args.context {
        body["context"] = json_argument("--context", text)?;
    }
    if let Some(key) = &args.idempotency_key {
        body["idempotency_key"] = json!(key);
    }
    if let Some(priority) = args.priority {
        body["priority"] = json!(priority);
    }
    if let Some(at) = &args.run_at {
        body["run_at"] = json!(at);
    }
    if let Some(ms) = args.delay {
        body["delay_ms"] = json!(ms);
    }
    if let Some(at) = &args.deadline {
        body["deadline"] = json!(at);
    }
    let response = context.client.post(&["v1", "tasks"], body).await?;
    let mut task = response.body;
    let id = text(&task, "task_id").to_owned();
    if context.output == Output::Table {
        if response.status == StatusCode::CREATED {
            errln!("created task {id}");
        } else {
            errln!("task {id} already exists with this idempotency key");
        }
    }
    if !args.wait {
        context.print(&task, |task, style| render::task(task, style, Utc::now()));
        return Ok(());
    }

    let deadline = args
        .timeout
        .map(|seconds| Instant::now() + Duration::from_secs_f64(seconds));
    // With `-o json`, nothing is drawn while it waits, even on a terminal.
    let json = context.output == Output::Json;
    let terminal = std::io::stderr().is_terminal() && !json;
    let mut progress = progress::Progress::new(terminal, json, colors(terminal));
    loop {
        progress.update(&task);
        if render::task_finished(text(&task, "status")) {
            break;
        }
        let next = Instant::now() + POLL_INTERVAL;
        if let Some(deadline) = deadline
            && next > deadline
        {
            tokio::time::sleep_until(deadline).await;
            task = poll_task(context, &id, Some(deadline)).await?;
            progress.update(&task);
            if render::task_finished(text(&task, "status")) {
                break;
            }
            if context.output == Output::Table {
                outln!();
            }
            context.print(&task, |task, style| render::task(task, style, Utc::now()));
            return Err(CliError::Timeout(format!(
                "task {id} is still {} after {}s",
                text(&task, "status"),
                args.timeout.unwrap_or_default()
            )));
        }
        tokio::time::sleep_until(next).await;
        task = poll_task(context, &id, deadline).await?;
    }
    if context.output == Output::Table {
        outln!();
    }
    context.print(&task, |task, style| render::task(task, style, Utc::now()));
    match text(&task, "status").parse::<TaskStatus>() {
        Ok(TaskStatus::Complete) => Ok(()),
        _ => Err(CliError::TaskFailed(format!(
            "task {id} ended {}",
            text(&task, "status")
        ))),
    }
}

/// `tasks list`.
async fn list(context: &Context, args: ListArgs) -> Result<(), CliError> {
    let mut query = vec![("limit", args.limit.to_string())];
    filter_query(&args.filter, &mut query);
    for (key, value) in [
        ("status", args.status),
        ("order", args.order),
        ("cursor", args.cursor),
    ] {
        if let Some(value) = value {
            query.push((key, value));
        }
    }
    let body = context.client.get(&["v1", "tasks"], &query).await?;
    context.print(&body, render::task_list);
    if context.output == Output::Table
        && let Some(cursor) = body["next_cursor"].as_str()
    {
        errln!("more tasks: add --cursor {cursor}");
    }
    Ok(())
}

/// The filter flags as `GET /v1/tasks` query parameters.
fn filter_query(filter: &FilterArgs, query: &mut Vec<(&'static str, String)>) {
    for (key, value) in [
        ("namespace", &filter.namespace),
        ("name", &filter.name),
        ("created_after", &filter.created_after),
        ("created_before", &filter.created_before),
    ] {
        if let Some(value) = value {
            query.push((key, value.clone()));
        }
    }
    for tag in &filter.tags {
        query.push(("tag", tag.clone()));
    }
}

/// The task `id`, asked again while the coordinator cannot answer (unreachable, or a
/// 5xx while it restarts, say) until `deadline` (then the `--timeout` error): the task
/// exists and goes on meanwhile.
async fn poll_task(
    context: &Context,
    id: &str,
    deadline: Option<Instant>,
) -> Result<Value, CliError> {
    let mut said = false;
    loop {
        let path = ["v1", "tasks", id];
        let request = context.client.get(&path, &[]);
        // A request still unanswered at the deadline ends the wait there.
        let outcome = match deadline {
            Some(deadline) => tokio::time::timeout_at(deadline, request)
                .await
                .map_err(|_| {
                    CliError::Timeout(format!(
                        "task {id}: the coordinator had not answered by the timeout"
                    ))
                })?,
            None => request.await,
        };
        let unanswered = match &outcome {
            Err(CliError::Unreachable(why)) => why.clone(),
            Err(CliError::Api {
                status, message, ..
            }) if *status >= 500 => message.clone(),
            _ => return outcome,
        };
        if deadline.is_some_and(|deadline| Instant::now() + POLL_INTERVAL >= deadline) {
            return Err(CliError::Timeout(format!(
                "task {id}: no answer from the coordinator by the timeout ({unanswered})"
            )));
        }
        if !said {
            errln!("task {id}: the coordinator does not answer ({unanswered}); asking again");
            said = true;
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// A time flag: RFC 3339 as given, or an age (`90s`, `30m`, `2h`, `7d`) as the RFC 3339
/// time that long ago.
fn time_argument(text: &str) -> Result<String, String> {
    if chrono::DateTime::parse_from_rfc3339(text).is_ok() {
        return Ok(text.to_owned());
    }
    let age = text
        .char_indices()
        .last()
        .and_then(|(at, unit)| {
            let amount: i64 = text[..at].parse().ok().filter(|n| *n >= 0)?;
            match unit {
                's' => chrono::TimeDelta::try_seconds(amount),
                'm' => chrono::TimeDelta::try_minutes(amount),
                'h' => chrono::TimeDelta::try_hours(amount),
                'd' => chrono::TimeDelta::try_days(amount),
                _ => None,
            }
        })
        .ok_or_else(|| {
            format!("`{text}` is neither an RFC 3339 time (2026-12-01T00:00:00Z) nor an age such as 30m, 2h or 7d")
        })?;
    let then = Utc::now()
        .checked_sub_signed(age)
        .ok_or_else(|| format!("`{text}` ago is before any time that can be written"))?;
    Ok(then.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
}

/// `tasks cancel` and `tasks retry`: one task (post `{"reason"?}`, show the task as it is
/// now), or every task the filter flags match (`POST /v1/tasks/{action}`).
async fn operate(
    context: &Context,
    args: OperateArgs,
    action: &str,
    done: &str,
) -> Result<(), CliError> {
    let Some(id) = args.id else {
        return operate_many(context, args, action, done).await;
    };
    let body = match args.reason {
        Some(reason) => json!({"reason": reason}),
        None => json!({}),
    };
    let response = context
        .client
        .post(&["v1", "tasks", &id, action], body)
        .await?;
    if context.output == Output::Table {
        errln!("{done} task {id}");
    }
    context.print(&response.body, |task, style| {
        render::task(task, style, Utc::now())
    });
    Ok(())
}

/// The bulk form of `tasks cancel` and `tasks retry`.
async fn operate_many(
    context: &Context,
    args: OperateArgs,
    action: &str,
    done: &str,
) -> Result<(), CliError> {
    if args.filter.is_empty() && args.status.is_none() {
        return Err(CliError::Usage(format!(
            "give a task id, or at least one filter (--namespace, --name, --status, --tag, \
             --created-after, --created-before) to {action} every task it matches"
        )));
    }
    let statuses: &[&str] = if action == "cancel" {
        &["pending", "in_progress"]
    } else {
        &["error"]
    };
    if let Some(status) = args.status.as_deref()
        && !statuses.contains(&status)
    {
        return Err(CliError::Usage(format!(
            "--status {status}: {action} acts on tasks {}",
            statuses.join(" or ")
        )));
    }
    let filter = args.filter;
    let mut body = json!({"dry_run": args.dry_run});
    for (key, value) in [
        ("namespace", filter.namespace),
        ("name", filter.name),
        ("status", args.status),
        ("created_after", filter.created_after),
        ("created_before", filter.created_before),
        ("reason", args.reason),
    ] {
        if let Some(value) = value {
            body[key] = json!(value);
        }
    }
    if !filter.tags.is_empty() {
        body["tags"] = json!(filter.tags);
    }
    if let Some(limit) = args.limit {
        body["limit"] = json!(limit);
    }
    let response = context.client.post(&["v1", "tasks", action], body).await?;
    let answer = response.body;
    if context.output == Output::Json {
        outln!("{}", pretty(&answer));
        return Ok(());
    }
    for id in answer["task_ids"].as_array().into_iter().flatten() {
        outln!("{}", id.as_str().unwrap_or_default());
    }
    let matched = answer["matched"].as_u64().unwrap_or_default();
    if args.dry_run {
        errln!("dry run: {matched} task(s) match; nothing was {done}");
    } else {
        let changed = answer["changed"].as_u64().unwrap_or_default();
        errln!("{done} {changed} of {matched} matching task(s)");
        if changed < matched {
            errln!("the others changed state before they were reached");
        }
    }
    if answer["has_more"].as_bool() == Some(true) {
        errln!("more tasks match than --limit: run again for the rest");
    }
    Ok(())
}

async fn schedules(context: &Context, command: SchedulesCommand) -> Result<(), CliError> {
    let client = &context.client;
    match command {
        SchedulesCommand::List {
            namespace,
            limit,
            cursor,
        } => {
            let mut query = vec![("limit", limit.to_string())];
            for (key, value) in [("namespace", namespace), ("cursor", cursor)] {
                if let Some(value) = value {
                    query.push((key, value));
                }
            }
            let body = client.get(&["v1", "schedules"], &query).await?;
            context.print(&body, render::schedule_list);
            if context.output == Output::Table
                && let Some(cursor) = body["next_cursor"].as_str()
            {
                errln!("more schedules: add --cursor {cursor}");
            }
        }
        SchedulesCommand::Get { name } => {
            let body = client.get(&["v1", "schedules", &name], &[]).await?;
            context.print(&body, render::schedule);
        }
        SchedulesCommand::Create(args) => {
            let Some((namespace, template)) = args.template.split_once('/') else {
                return Err(CliError::Usage(format!(
                    "the template is NAMESPACE/NAME, not `{}`",
                    args.template
                )));
            };
            let mut body = json!({
                "name": args.name, "namespace": namespace, "template": template,
                "cron": args.cron, "paused": args.paused,
            });
            for (key, value) in [
                ("timezone", args.timezone),
                ("version", args.version),
                ("overlap", args.overlap),
                ("catch_up", args.catch_up),
            ] {
                if let Some(value) = value {
                    body[key] = json!(value);
                }
            }
            if let Some(text) = args.context {
                body["context"] = json_argument("--context", &text)?;
            }
            let response = client.post(&["v1", "schedules"], body).await?;
            context.print(&response.body, render::schedule);
        }
        SchedulesCommand::Pause { name } => {
            let response = client
                .patch(&["v1", "schedules", &name], json!({"paused": true}))
                .await?;
            context.print(&response.body, render::schedule);
        }
        SchedulesCommand::Resume { name } => {
            let response = client
                .patch(&["v1", "schedules", &name], json!({"paused": false}))
                .await?;
            context.print(&response.body, render::schedule);
        }
        SchedulesCommand::Delete { name } => {
            client.delete(&["v1", "schedules", &name]).await?;
            if context.output == Output::Table {
                errln!("deleted schedule {name}");
            }
        }
    }
    Ok(())
}

async fn analytics(context: &Context, command: AnalyticsCommand) -> Result<(), CliError> {
    let template = |text: &str| -> Result<Vec<(&'static str, String)>, CliError> {
        match text.split_once('/') {
            Some((namespace, name)) => Ok(vec![
                ("namespace", namespace.to_owned()),
                ("name", name.to_owned()),
            ]),
            None => Err(CliError::Usage(format!(
                "the template is NAMESPACE/NAME, not `{text}`"
            ))),
        }
    };
    let (path, query, render): (&str, _, fn(&Value, Style) -> String) = match command {
        AnalyticsCommand::Templates { namespace, window } => {
            let mut query = window.query();
            if let Some(namespace) = namespace {
                query.push(("namespace", namespace));
            }
            ("templates", query, render::analytics_templates)
        }
        AnalyticsCommand::Steps {
            template: t,
            window,
        } => {
            let mut query = template(&t)?;
            query.extend(window.query());
            ("steps", query, render::analytics_steps)
        }
        AnalyticsCommand::Bottlenecks {
            template: t,
            window,
        } => {
            let mut query = template(&t)?;
            query.extend(window.query());
            ("bottlenecks", query, render::analytics_bottlenecks)
        }
    };
    let body = context
        .client
        .get(&["v1", "analytics", path], &query)
        .await?;
    context.print(&body, render);
    Ok(())
}
