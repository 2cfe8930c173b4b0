//! Settings shared by every Tasker process. Each is an environment variable and the same
//! as a command-line flag (clap reads both; the flag wins); every one has a default that
//! works on a developer's machine.

use std::fmt;
use std::str::FromStr;

/// `C` read from the command line and the environment, or the process exits with clap's
/// error (code 2). A bad value that came from an environment variable is named as that
/// variable: clap's message names only the flag it stands for.
pub fn parse_or_exit<C: clap::Parser>() -> C {
    C::try_parse().unwrap_or_else(|error| naming_the_variable(error, &C::command()).exit())
}

/// `error` with a tip naming the environment variable its bad value came from, if it came
/// from one: the argument has one, it is set, and the flag is not on the command line.
fn naming_the_variable(mut error: clap::Error, command: &clap::Command) -> clap::Error {
    use clap::error::{ContextKind, ContextValue};
    let Some(ContextValue::String(invalid)) = error.get(ContextKind::InvalidArg) else {
        return error;
    };
    let Some((long, variable)) = flag_and_variable(command, invalid) else {
        return error;
    };
    let on_command_line = std::env::args_os().any(|arg| {
        let arg = arg.to_string_lossy();
        arg == format!("--{long}") || arg.starts_with(&format!("--{long}="))
    });
    if on_command_line || std::env::var_os(&variable).is_none() {
        return error;
    }
    error.insert(
        ContextKind::Suggested,
        ContextValue::StyledStrs(vec![
            format!("the value was read from the environment variable {variable}").into(),
        ]),
    );
    error
}

/// The long flag and environment variable of the argument clap's error shows as `shown`
/// (`--batch-size <BATCH_SIZE>`), in `command` or any of its subcommands.
fn flag_and_variable(command: &clap::Command, shown: &str) -> Option<(String, String)> {
    let found = command.get_arguments().find_map(|arg| {
        let long = arg.get_long()?;
        let flag = format!("--{long}");
        let matches = shown == flag || shown.starts_with(&format!("{flag} "));
        let variable = arg.get_env().filter(|_| matches)?;
        Some((long.to_owned(), variable.to_string_lossy().into_owned()))
    });
    found.or_else(|| {
        command
            .get_subcommands()
            .find_map(|sub| flag_and_variable(sub, shown))
    })
}

/// Where PostgreSQL's Tasker database is by default.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/tasker";
/// Where RabbitMQ is by default.
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// A connection URL that may hold a password: it never prints the password.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretUrl(String);

impl SecretUrl {
    /// The URL, password included: only for handing to a client library.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with any password replaced by `***`: the one in the user info (up to
    /// the last `@`, so an unencoded `@` in a password does not end it early) and any
    /// query parameter whose name says it holds a secret (`?password=`,
    /// `sslpassword=`, `token=`, `secret=`). When in doubt it hides more, never less.
    pub fn redacted(&self) -> String {
        let url = &self.0;
        let Some(scheme_end) = url.find("://") else {
            return redact_query(url);
        };
        let start = scheme_end + 3;
        let rest = &url[start..];
        let Some(at) = rest.rfind('@') else {
            return format!("{}{}", &url[..start], redact_query(rest));
        };
        let user_info = &rest[..at];
        let shown = match user_info.split_once(':') {
            Some((user, _)) => format!("{user}:***"),
            None => user_info.to_owned(),
        };
        format!("{}{shown}@{}", &url[..start], redact_query(&rest[at + 1..]))
    }
}

/// `text` with the values of its secret-looking query parameters replaced by `***`.
fn redact_query(text: &str) -> String {
    let Some((before, query)) = text.split_once('?') else {
        return text.to_owned();
    };
    let pairs: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((key, _)) if is_secret_name(key) => format!("{key}=***"),
            _ => pair.to_owned(),
        })
        .collect();
    format!("{before}?{}", pairs.join("&"))
}

fn is_secret_name(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    ["pass", "secret", "token", "key"]
        .iter()
        .any(|word| key.contains(word))
}

impl FromStr for SecretUrl {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(SecretUrl(s.to_owned()))
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// A secret setting (a key): never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The secret itself: only for the code that uses it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_owned()))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

/// How to reach PostgreSQL.
#[derive(Debug, Clone, clap::Args)]
pub struct DatabaseSettings {
    /// PostgreSQL connection URL.
    #[arg(long, env = "DATABASE_URL", default_value = DEFAULT_DATABASE_URL, hide_env_values = true)]
    pub database_url: SecretUrl,
    /// Connections in the pool (at least 2: a coordinator's loops hold one while they
    /// ask for another).
    #[arg(long, env = "TASKER_DB_POOL_SIZE", default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(2..))]
    pub db_pool_size: u32,
    /// How long PostgreSQL lets one of Tasker's connections sit idle inside a
    /// transaction before it ends the session (`idle_in_transaction_session_timeout`): a
    /// coordinator that stops mid-transaction (paused, frozen, cut off) releases the rows
    /// it holds after this, instead of holding back every result and sweep that needs them.
    #[arg(long, env = "TASKER_DB_IDLE_IN_TRANSACTION_TIMEOUT_MS", default_value_t = 60_000,
          value_parser = clap::value_parser!(u64).range(1_000..=86_400_000))]
    pub db_idle_in_transaction_timeout_ms: u64,
    /// How long a coordinator's background work (dispatcher, result processor, sweeper,
    /// scheduler, events relay, gauges, retention, task creation) waits for PostgreSQL to
    /// answer one piece of its work. Past it the work is abandoned (a loop's pass runs
    /// again on a new connection, a batch of creations is answered 503): a database host
    /// that vanished without closing its sockets (a failover that moved its address, a
    /// dropped NAT mapping) would otherwise hold a statement already sent for ever.
    #[arg(long, env = "TASKER_DB_ANSWER_TIMEOUT_MS", default_value_t = 30_000,
          value_parser = clap::value_parser!(u64).range(1_000..=3_600_000))]
    pub db_answer_timeout_ms: u64,
}

/// How to reach RabbitMQ, and the names Tasker's exchanges and queues start with.
#[derive(Debug, Clone, clap::Args)]
pub struct BrokerSettings {
    /// RabbitMQ connection URL.
    #[arg(long, env = "AMQP_URL", default_value = DEFAULT_AMQP_URL, hide_env_values = true)]
    pub amqp_url: SecretUrl,
    /// Prefix of every exchange and queue name, so several Tasker installations (or test
    /// runs) can share one broker without seeing each other's messages.
    #[arg(long, env = "TASKER_AMQP_PREFIX", default_value = "tasker")]
    pub amqp_prefix: String,
    /// Shared secret (32 bytes or more) that signs and checks every step, result and
    /// control message (docs/security.md, "The broker"). Unset: messages are not signed.
    #[arg(long, env = "TASKER_MESSAGE_KEY", hide_env_values = true)]
    pub message_key: Option<Secret>,
    /// The key before the current one, still accepted while a new key is rolled out.
    #[arg(long, env = "TASKER_MESSAGE_KEY_PREVIOUS", hide_env_values = true)]
    pub message_key_previous: Option<Secret>,
    /// The type of the step, results and dead-letter queues: `classic`, or `quorum` for a
    /// RabbitMQ cluster (replicated, with a delivery limit for poison messages). Every
    /// process on one broker and prefix must use the same type (docs/operating.md).
    #[arg(long, env = "TASKER_QUEUE_TYPE", value_enum, default_value_t = QueueType::Classic)]
    pub queue_type: QueueType,
}

/// The type of Tasker's durable queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum QueueType {
    /// RabbitMQ's default queue, held by one node.
    #[default]
    Classic,
    /// RabbitMQ's replicated queue (Raft over the cluster's nodes).
    Quorum,
}

impl QueueType {
    /// The value of the `x-queue-type` argument.
    pub fn as_str(self) -> &'static str {
        match self {
            QueueType::Classic => "classic",
            QueueType::Quorum => "quorum",
        }
    }
}

impl BrokerSettings {
    /// The message keys these settings give.
    ///
    /// # Errors
    ///
    /// A key that is too short, or a previous key without a current one.
    pub fn message_keys(&self) -> Result<crate::signing::MessageKeys, String> {
        crate::signing::MessageKeys::new(
            self.message_key.as_ref().map(Secret::expose),
            self.message_key_previous.as_ref().map(Secret::expose),
        )
    }

    /// The topology these settings name: prefix, queue type and message keys.
    ///
    /// # Errors
    ///
    /// As [`BrokerSettings::message_keys`].
    pub fn topology(&self) -> Result<crate::broker::Topology, String> {
        Ok(crate::broker::Topology::new(self.amqp_prefix.clone())
            .with_queue_type(self.queue_type)
            .with_keys(self.message_keys()?))
    }
}

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Readable lines for a terminal.
    Human,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Logging settings.
#[derive(Debug, Clone, clap::Args)]
pub struct LogSettings {
    /// `human` or `json`.
    #[arg(long, env = "TASKER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
    /// Filter in `tracing_subscriber::EnvFilter` syntax, e.g. `info,tasker_coordinator=debug`.
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    pub log_filter: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_print() {
        let url: SecretUrl = "amqp://guest:s3cret@127.0.0.1:5672/%2f".parse().unwrap();
        assert_eq!(url.to_string(), "amqp://guest:***@127.0.0.1:5672/%2f");
        assert!(!format!("{url:?}").contains("s3cret"));
        // An unencoded `@` in the password, and passwords in the query.
        let url: SecretUrl = "amqp://guest:p@ss@broker:5672/%2f".parse().unwrap();
        assert_eq!(url.to_string(), "amqp://guest:***@broker:5672/%2f");
        let url: SecretUrl =
            "postgres://tasker@db/tasker?sslmode=require&password=s3cret&sslpassword=k3y"
                .parse()
                .unwrap();
        assert_eq!(
            url.to_string(),
            "postgres://tasker@db/tasker?sslmode=require&password=***&sslpassword=***"
        );
        let url: SecretUrl = "postgres:///tasker?host=/run/pg&password=s3cret"
            .parse()
            .unwrap();
        assert!(!url.to_string().contains("s3cret"), "{url}");
        let no_password: SecretUrl = "postgres://postgres@127.0.0.1/tasker".parse().unwrap();
        assert_eq!(
            no_password.to_string(),
            "postgres://postgres@127.0.0.1/tasker"
        );
    }
}
