//! The whole `main` of a worker binary: flags and environment, logging and tracing, run
//! until SIGTERM, flush traces. `tasker-worker` and any worker with your own handlers
//! call [`run`].

use clap::Parser;
use tasker_protocol::config::LogSettings;

use crate::{HandlerRegistry, Worker, WorkerSettings};

#[derive(Parser)]
#[command(version, about = "A Tasker worker")]
struct Cli {
    #[command(flatten)]
    log: LogSettings,
    #[command(flatten)]
    worker: WorkerSettings,
}

/// Parse the worker's settings from the command line and the environment, set up logs
/// and traces under `service`, and run a worker with `registry` until SIGTERM or Ctrl-C.
///
/// ```no_run
/// # async fn example() -> anyhow::Result<()> {
/// let registry = tasker_worker::HandlerRegistry::with_builtins(); // .register("my.handler", MyHandler)
/// tasker_worker::run("my-worker", registry).await
/// # }
/// ```
pub async fn run(service: &'static str, registry: HandlerRegistry) -> anyhow::Result<()> {
    let cli: Cli = tasker_protocol::config::parse_or_exit();
    let telemetry = tasker_protocol::telemetry::init(&cli.log, service);
    // Listened for from now: a signal while it starts stops it too.
    let mut shutdown = Box::pin(tasker_protocol::shutdown_signal());
    let outcome = tokio::select! {
        built = Worker::build(cli.worker, registry) => match built {
            Ok(worker) => worker.run_until_stopped(shutdown).await,
            Err(error) => Err(error),
        },
        () = &mut shutdown => {
            tracing::info!("stopped while starting");
            Ok(())
        }
    };
    telemetry.shutdown();
    outcome
}
