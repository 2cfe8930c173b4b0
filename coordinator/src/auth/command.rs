//! `tasker-coordinator token create|list|revoke`: manage API tokens in the database
//! directly (like `migrate`, it needs `DATABASE_URL` and applies pending migrations first).

use chrono::{DateTime, Duration, Utc};
use clap::{Args, Subcommand};
use tasker_shared::config::DatabaseSettings;
use tasker_shared::span::{SpanError, parse_span};

use super::api_tokens::{self, ApiToken};
use super::scope::Scopes;

/// `tasker-coordinator token …`.
#[derive(Debug, Args)]
pub struct TokenArgs {
    /// How to reach PostgreSQL.
    #[command(flatten)]
    database: DatabaseSettings,
    #[command(subcommand)]
    command: TokenCommand,
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Create an API token and print its secret (on stdout, once: it is stored hashed).
    Create {
        /// A name for people and logs, unique among active tokens (e.g. `ci`).
        #[arg(long)]
        name: String,
        /// Comma-separated scopes: templates:write, tasks:read, tasks:write,
        /// tasks:operate, metrics:read, admin.
        #[arg(long, required = true)]
        scopes: String,
        /// Expire after this long: a number and a unit, s, m, h, d or w (e.g. `30d`).
        /// Without it the token lasts until revoked.
        #[arg(long, value_parser = parse_duration)]
        expires_in: Option<Duration>,
    },
    /// List every token (never their secrets), revoked and expired ones included.
    List,
    /// Revoke a token by id, or the active token with this name. Takes effect on its next
    /// request.
    Revoke {
        /// The token's id or name.
        token: String,
    },
}

impl TokenArgs {
    /// Run the command; messages go to stderr, the secret and the list to stdout.
    pub async fn run(self) -> anyhow::Result<()> {
        tasker_shared::db::migrate(&self.database).await?;
        let pool = tasker_shared::db::connect_lazy(&self.database)?;
        let outcome = run(&pool, self.command).await;
        pool.close().await;
        outcome
    }
}

async fn run(pool: &sqlx::PgPool, command: TokenCommand) -> anyhow::Result<()> {
    match command {
        TokenCommand::Create {
            name,
            scopes,
            expires_in,
        } => {
            let name = name.trim();
            anyhow::ensure!(!name.is_empty(), "--name must not be empty");
            let scopes = Scopes::parse_strict(&scopes)?;
            anyhow::ensure!(!scopes.is_empty(), "--scopes names no scope");
            let expires_at = expires_in.map(|after| Utc::now() + after);
            let (token, secret) = api_tokens::create(pool, name, &scopes, expires_at).await?;
            eprintln!(
                "created API token `{}` (id {}) with scopes {}, {}.\n\
                 Its secret follows, shown this once: keep it in a secret store and send it \
                 as `Authorization: Bearer <secret>` (the tasker CLI reads TASKER_TOKEN).",
                token.name,
                token.token_id,
                scopes,
                expiry(token.expires_at),
            );
            println!("{secret}");
        }
        TokenCommand::List => print!("{}", table(&api_tokens::list(pool).await?, Utc::now())),
        TokenCommand::Revoke { token } => match api_tokens::revoke(pool, &token).await? {
            Some(revoked) => eprintln!(
                "revoked API token `{}` (id {})",
                revoked.name, revoked.token_id
            ),
            None => anyhow::bail!("no active API token has the id or name `{token}`"),
        },
    }
    Ok(())
}

fn expiry(expires_at: Option<DateTime<Utc>>) -> String {
    match expires_at {
        Some(at) => format!("expiring {}", at.to_rfc3339()),
        None => "never expiring (revoke it when no longer needed)".to_owned(),
    }
}

/// The tokens as an aligned table.
fn table(tokens: &[ApiToken], now: DateTime<Utc>) -> String {
    let time = |at: Option<DateTime<Utc>>| {
        at.map_or_else(
            || "-".to_owned(),
            |at| at.format("%Y-%m-%d %H:%M").to_string(),
        )
    };
    let mut rows = vec![[
        "ID".to_owned(),
        "NAME".to_owned(),
        "STATE".to_owned(),
        "SCOPES".to_owned(),
        "CREATED".to_owned(),
        "EXPIRES".to_owned(),
        "LAST USED".to_owned(),
    ]];
    rows.extend(tokens.iter().map(|token| {
        [
            token.token_id.to_string(),
            token.name.clone(),
            token.state(now).as_str().to_owned(),
            token.scopes.join(","),
            time(Some(token.created_at)),
            time(token.expires_at),
            time(token.last_used_at),
        ]
    }));
    let widths: Vec<usize> = (0..7)
        .map(|column| {
            rows.iter()
                .map(|row| row[column].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:width$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// `90s`, `15m`, `12h`, `30d`, `2w`.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    match parse_span(text, &["s", "m", "h", "d", "w"]) {
        Ok(span) if span > Duration::zero() && span <= Duration::days(100 * 365) => Ok(span),
        Ok(_) | Err(SpanError::TooLong) => Err(format!(
            "`{text}` must be more than 0 and at most 100 years"
        )),
        Err(SpanError::NoUnit) => Err(format!(
            "`{text}` has no unit: add s, m, h, d or w (e.g. 30d)"
        )),
        Err(SpanError::NotANumber) => Err(format!("`{text}` does not start with a number")),
        Err(SpanError::UnknownUnit(unit)) => Err(format!(
            "unknown unit `{unit}` in `{text}`: use s, m, h, d or w"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_a_number_and_a_unit() {
        assert_eq!(parse_duration("90s"), Ok(Duration::seconds(90)));
        assert_eq!(parse_duration("15m"), Ok(Duration::minutes(15)));
        assert_eq!(parse_duration("12h"), Ok(Duration::hours(12)));
        assert_eq!(parse_duration("30d"), Ok(Duration::days(30)));
        assert_eq!(parse_duration("2w"), Ok(Duration::weeks(2)));
        for bad in ["30", "d", "-1d", "0d", "1y", "1.5d", "99999999999w", ""] {
            assert!(parse_duration(bad).is_err(), "{bad} is refused");
        }
    }

    #[test]
    fn the_table_never_shows_secrets_and_marks_revoked_and_expired_tokens() {
        let now = Utc::now();
        let token = |name: &str, expires_at, revoked_at| ApiToken {
            token_id: uuid::Uuid::now_v7(),
            name: name.to_owned(),
            scopes: vec!["tasks:read".into(), "tasks:write".into()],
            created_at: now,
            expires_at,
            revoked_at,
            last_used_at: None,
        };
        let text = table(
            &[
                token("ci", None, None),
                token("old", None, Some(now)),
                token("short", Some(now - Duration::hours(1)), None),
            ],
            now,
        );
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("ID"));
        assert!(lines[1].contains("ci") && lines[1].contains("active"));
        assert!(lines[1].contains("tasks:read,tasks:write"));
        assert!(lines[2].contains("revoked"));
        assert!(lines[3].contains("expired"));
        assert!(!text.contains(api_tokens::PREFIX));
    }
}
