//! A test's coordinator: built in the test process by default
//! ([`Application::build`] on port 0, as `tasker-coordinator serve` builds it), or the
//! `tasker-coordinator` binary for the tests that need a process (one they kill, signal or
//! measure).
//!
//! Either way it is configured by the environment variables the binary reads, and is ready
//! once `GET /health/ready` answers 200.
//!
//! An in-process coordinator runs on a thread with a runtime of its own, as it would in a
//! process of its own: its loops never wait for the test's runtime (nor the test for
//! them), and it can be stopped from `Drop` when a test panics, which a task on the
//! test's runtime could not be. It keeps no log: `tracing` has one subscriber per process,
//! shared by every test of the binary, so a test that reads the coordinator's log starts
//! the binary.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{CommandFactory, FromArgMatches, Parser};
use tasker_coordinator::{Application, CoordinatorSettings};
use tokio::sync::{oneshot, watch};

use crate::process::Process;

/// How long a coordinator may take to stop once asked.
const STOP_WITHIN: Duration = Duration::from_secs(30);

/// `tasker-coordinator serve`'s settings, as the binary parses them.
#[derive(Parser)]
#[command(name = "tasker-coordinator")]
struct Serve {
    #[command(flatten)]
    settings: CoordinatorSettings,
}

/// The settings a `tasker-coordinator serve` started with the environment `vars` (the
/// last value of a name wins, as with `Command::env`) would have.
///
/// Each variable becomes the flag it stands for, and the parser is told to read no
/// environment at all: tests run side by side in one process, so the process's own
/// environment is nobody's test's.
pub(crate) fn settings_from_env(vars: &[(String, String)]) -> anyhow::Result<CoordinatorSettings> {
    let command = Serve::command();
    let flags: HashMap<String, String> = command
        .get_arguments()
        .filter_map(|arg| {
            let env = arg.get_env()?.to_str()?.to_owned();
            Some((env, arg.get_long()?.to_owned()))
        })
        .collect();
    let mut values: Vec<(&str, &str)> = Vec::new();
    for (key, value) in vars {
        let flag = flags
            .get(key)
            .with_context(|| format!("{key} is not a setting of `tasker-coordinator serve`"))?;
        values.retain(|(f, _)| f != flag);
        values.push((flag, value));
    }
    let argv = std::iter::once("tasker-coordinator".to_owned()).chain(
        values
            .iter()
            .map(|(flag, value)| format!("--{flag}={value}")),
    );
    let matches = command
        .mut_args(|arg| arg.env(None::<&'static str>))
        .try_get_matches_from(argv)?;
    Ok(Serve::from_arg_matches(&matches)?.settings)
}

/// Wait until `GET {base_url}/health/ready` answers 200.
pub(crate) async fn wait_until_ready(base_url: &str, timeout: Duration) -> anyhow::Result<()> {
    let http = crate::http_client();
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let answer = http.get(format!("{base_url}/health/ready")).send().await;
        let last = match answer {
            Ok(response) if response.status().is_success() => return Ok(()),
            Ok(response) => format!("{}: {}", response.status(), response.text().await?),
            Err(error) => error.to_string(),
        };
        if tokio::time::Instant::now() > deadline {
            bail!("{base_url} not ready in {timeout:?}: {last}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A test's coordinator.
pub enum Coordinator {
    /// Built in this process (the default).
    InProcess(InProcess),
    /// The `tasker-coordinator` binary (`EnvOptions::binary_coordinator`).
    Binary(Process),
}

impl Coordinator {
    /// Everything a binary coordinator logged so far (JSON lines).
    ///
    /// # Panics
    ///
    /// When it runs in this process, which keeps no log.
    pub fn log(&self) -> String {
        match self {
            Coordinator::Binary(process) => process.log(),
            Coordinator::InProcess(_) => panic!("{NO_PROCESS}: it keeps no log"),
        }
    }

    /// Wait until a binary coordinator logs a line containing `needle`; returns the line.
    ///
    /// # Panics
    ///
    /// When it runs in this process, which keeps no log.
    pub async fn wait_for_log(
        &mut self,
        needle: &str,
        timeout: Duration,
    ) -> anyhow::Result<String> {
        self.process().wait_for_log(needle, timeout).await
    }

    /// Whether it still runs.
    pub fn running(&mut self) -> bool {
        match self {
            Coordinator::InProcess(coordinator) => coordinator.running(),
            Coordinator::Binary(process) => process.running(),
        }
    }

    /// The process id of a binary coordinator while it runs; `None` in this process.
    pub fn pid(&self) -> Option<u32> {
        match self {
            Coordinator::InProcess(_) => None,
            Coordinator::Binary(process) => process.pid(),
        }
    }

    /// The coordinator's process, to signal or kill it, or read its log.
    ///
    /// # Panics
    ///
    /// When it runs in this process.
    pub fn process(&mut self) -> &mut Process {
        match self {
            Coordinator::Binary(process) => process,
            Coordinator::InProcess(_) => panic!("{NO_PROCESS}"),
        }
    }

    /// A binary coordinator's log lines as they arrive (to show when a wait times out).
    pub(crate) fn lines(&self) -> Option<watch::Receiver<Vec<String>>> {
        match self {
            Coordinator::InProcess(_) => None,
            Coordinator::Binary(process) => Some(process.lines()),
        }
    }

    /// Stop it: asked to shut down in this process, killed as a binary.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        match self {
            Coordinator::InProcess(coordinator) => coordinator.stop().await,
            Coordinator::Binary(process) => {
                process.kill().await;
                Ok(())
            }
        }
    }

    /// Stop it without an async context (from `Drop`), waiting for an in-process one.
    pub(crate) fn stop_now(&mut self) {
        match self {
            Coordinator::InProcess(coordinator) => coordinator.stop_now(),
            Coordinator::Binary(process) => process.start_kill(),
        }
    }
}

/// Why a test cannot have the process of an in-process coordinator.
const NO_PROCESS: &str =
    "the coordinator runs in the test process: start the test with EnvOptions::binary_coordinator";

/// A coordinator running in the test process, on a thread of its own.
pub struct InProcess {
    address: SocketAddr,
    /// Dropped to complete the shutdown future `run_until_stopped` was given.
    stop: Option<oneshot::Sender<()>>,
    /// What `run_until_stopped` returned, sent once the thread's runtime is gone.
    done: mpsc::Receiver<anyhow::Result<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl InProcess {
    /// Build a coordinator with `settings`, run it, and wait until it is ready. `name`
    /// names its thread.
    pub async fn start(name: &str, settings: CoordinatorSettings) -> anyhow::Result<Self> {
        let (built_tx, built_rx) = oneshot::channel();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let (done_tx, done) = mpsc::channel();
        let name = name.to_owned();
        let thread = std::thread::Builder::new()
            .name(format!("coordinator {name}"))
            .spawn(move || {
                // As `#[tokio::main]` builds the binary's: a worker per core. With one, the
                // coordinator would get a smaller share of a busy machine than the
                // binary's does, and its loops would wait on each other.
                let runtime = match tokio::runtime::Builder::new_multi_thread()
                    .enable_all()
                    .thread_name(format!("coordinator {name}"))
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(error) => {
                        let _ = built_tx.send(Err(error.into()));
                        return;
                    }
                };
                let outcome = runtime.block_on(async move {
                    let app = match Application::build(settings).await {
                        Ok(app) => app,
                        Err(error) => {
                            let _ = built_tx.send(Err(error));
                            return Ok(());
                        }
                    };
                    let _ = built_tx.send(Ok(app.port()));
                    app.run_until_stopped(async move {
                        let _ = stop_rx.await;
                    })
                    .await
                });
                // Whatever a loop still holds goes with the runtime, before the test is
                // told the coordinator stopped.
                drop(runtime);
                let _ = done_tx.send(outcome);
            })?;
        let mut coordinator = InProcess {
            address: SocketAddr::from(([127, 0, 0, 1], 0)),
            stop: Some(stop_tx),
            done,
            thread: Some(thread),
        };
        let port = built_rx
            .await
            .context("the coordinator's thread ended while building")?
            .context("the coordinator did not start")?;
        coordinator.address.set_port(port);
        wait_until_ready(&coordinator.base_url(), Duration::from_secs(60)).await?;
        Ok(coordinator)
    }

    /// `http://127.0.0.1:<port>`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// Whether it still runs (`run_until_stopped` has not returned).
    pub fn running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Ask it to stop and wait until it has: its loops stopped, its connections closed.
    /// Returns what `run_until_stopped` returned (`Ok` if already stopped).
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        if self.stop.take().is_none() {
            return Ok(());
        }
        let done = std::mem::replace(&mut self.done, mpsc::channel().1);
        let outcome = tokio::task::spawn_blocking(move || done.recv_timeout(STOP_WITHIN)).await?;
        self.join(outcome.is_ok());
        outcome
            .context("the coordinator did not stop in time")?
            .context("the coordinator stopped with an error")
    }

    /// [`InProcess::stop`] where nothing can be awaited.
    fn stop_now(&mut self) {
        if self.stop.take().is_none() {
            return;
        }
        let stopped = self.done.recv_timeout(STOP_WITHIN).is_ok();
        self.join(stopped);
    }

    /// Join the thread once `stopped` (else leave it, detached).
    fn join(&mut self, stopped: bool) {
        if let Some(thread) = self.thread.take()
            && stopped
        {
            let _ = thread.join();
        }
    }
}

impl Drop for InProcess {
    /// A test that panicked did not stop its coordinator: stop it here, so that it does
    /// not run on against a dropped database for the rest of the test binary.
    fn drop(&mut self) {
        self.stop_now();
    }
}
