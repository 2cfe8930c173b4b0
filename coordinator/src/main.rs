//! `tasker-coordinator`: `serve` runs the HTTP API, dispatcher, result processor and
//! sweeper; `migrate` applies the schema.

use clap::{Parser, Subcommand};
use tasker_coordinator::{Application, CoordinatorSettings};
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
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tasker_shared::telemetry::init(&cli.log);
    match cli.command {
        Command::Serve(settings) => {
            let app = Application::build(*settings).await?;
            app.run_until_stopped(tasker_shared::shutdown_signal())
                .await
        }
        Command::Migrate(settings) => {
            tasker_shared::db::migrate(&settings).await?;
            tracing::info!("migrations applied");
            Ok(())
        }
    }
}
