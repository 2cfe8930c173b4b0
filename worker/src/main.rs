//! `tasker-worker`: a worker with the built-in handlers.

use clap::Parser;
use tasker_shared::config::LogSettings;
use tasker_worker::{HandlerRegistry, Worker, WorkerSettings};

#[derive(Parser)]
#[command(
    name = "tasker-worker",
    version,
    about = "A Tasker worker with the built-in handlers"
)]
struct Cli {
    #[command(flatten)]
    log: LogSettings,
    #[command(flatten)]
    worker: WorkerSettings,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let telemetry = tasker_shared::telemetry::init(&cli.log, "tasker-worker");
    let outcome = match Worker::build(cli.worker, HandlerRegistry::with_builtins()).await {
        Ok(worker) => {
            worker
                .run_until_stopped(tasker_shared::shutdown_signal())
                .await
        }
        Err(error) => Err(error),
    };
    telemetry.shutdown();
    outcome
}
