//! `tasker-coordinator`: `serve` runs the HTTP API, dispatcher, result processor and
//! sweeper; `migrate` applies the schema; `prune` removes old finished tasks.

use clap::{Parser, Subcommand};
use tasker_coordinator::{Application, CoordinatorSettings, PruneArgs, TokenArgs};
use tasker_shared::config::{DatabaseSettings, LogSettings};

#[derive(Parser)]
#[command(name = "tasker-coordinator", version, about = "Tasker's coordinator")]
struct Cli {
    #[command(flatten)]
    log: LogSettings,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Apply migrations, then serve the API and run the dispatcher, result processor and sweeper.
    Serve(Box<CoordinatorSettings>),
    /// Apply migrations (creating the database if missing) and exit.
    Migrate(DatabaseSettings),
    /// Create, list or revoke API tokens (applies migrations first).
    Token(TokenArgs),
    /// Remove finished tasks older than `--older-than` with their steps, edges and
    /// history, once (applies migrations first). `serve` does it all the time under
    /// `TASKER_RETENTION`.
    Prune(PruneArgs),
    /// Print the API's OpenAPI 3.1 description (needs neither PostgreSQL nor RabbitMQ).
    Openapi,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli: Cli = tasker_shared::config::parse_or_exit();
    if let Command::Openapi = cli.command {
        print!("{}", tasker_coordinator::openapi_json());
        return Ok(());
    }
    let telemetry = tasker_shared::telemetry::init(&cli.log, "tasker-coordinator");
    let outcome = match cli.command {
        Command::Serve(settings) => {
            // Listened for from now: a signal while it starts stops it too.
            let mut shutdown = Box::pin(tasker_shared::shutdown_signal());
            tokio::select! {
                built = Application::build(*settings) => match built {
                    Ok(app) => app.run_until_stopped(shutdown).await,
                    Err(error) => Err(error),
                },
                () = &mut shutdown => {
                    tracing::info!("stopped while starting");
                    Ok(())
                }
            }
        }
        Command::Migrate(settings) => tasker_shared::db::migrate(&settings)
            .await
            .map(|()| tracing::info!("migrations applied")),
        Command::Token(args) => args.run().await,
        Command::Prune(args) => args.run().await,
        Command::Openapi => Ok(()),
    };
    telemetry.shutdown();
    outcome
}
