//! `tasker-worker`: a worker with the built-in handlers.

use tasker_worker::HandlerRegistry;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tasker_worker::run("tasker-worker", HandlerRegistry::with_builtins()).await
}
