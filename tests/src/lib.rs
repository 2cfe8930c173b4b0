//! The end-to-end test harness: starts the real `tasker-coordinator` and `tasker-worker`
//! binaries against the real PostgreSQL and RabbitMQ, each test in its own database and
//! under its own queue-name prefix, so tests run in parallel without seeing each other.
//!
//! The binaries are taken from the cargo target folder this test binary lives in
//! (`cargo build --workspace --bins --examples` puts them there; `deploy/test.sh` does it),
//! or from `TASKER_BIN_DIR`.

#![allow(missing_docs)]

pub mod http_stub;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::Value;
use sqlx::PgPool;
use sqlx::migrate::MigrateDatabase;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;
use uuid::Uuid;

pub use reqwest::StatusCode;

/// Where PostgreSQL is (the server, without a database name).
pub fn postgres_server() -> String {
    std::env::var("TASKER_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

/// Where RabbitMQ is.
pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| tasker_shared::config::DEFAULT_AMQP_URL.into())
}

/// The folder holding the built binaries.
pub fn bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("TASKER_BIN_DIR") {
        return PathBuf::from(dir);
    }
    // Tests run from target/<profile>/deps/; binaries such as tasker-example from
    // target/<profile>/.
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().expect("the executable's folder");
    if dir.ends_with("deps") {
        dir.parent().expect("target folder").to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

/// A binary of the workspace (or an example, with `examples/` in front).
pub fn binary(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins --examples` first (deploy/test.sh does)",
        path.display()
    );
    path
}

/// A running process whose log lines are kept (and written to `target/e2e-logs/`).
pub struct Process {
    child: Child,
    lines: watch::Receiver<Vec<String>>,
    pub name: String,
}

impl Process {
    pub fn spawn(mut command: Command, name: String, log_dir: &Path) -> anyhow::Result<Self> {
        command
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .env("TASKER_LOG_FORMAT", "json")
            .env("RUST_LOG", "info");
        let mut child = command
            .spawn()
            .with_context(|| format!("spawning {name}"))?;
        let stderr = child.stderr.take().context("stderr")?;
        let (tx, rx) = watch::channel(Vec::new());
        let log_path = log_dir.join(format!("{name}.log"));
        tokio::spawn(async move {
            let mut reader = BufReader::new(stderr).lines();
            let mut file = std::fs::File::create(&log_path).ok();
            while let Ok(Some(line)) = reader.next_line().await {
                if let Some(file) = file.as_mut() {
                    use std::io::Write;
                    let _ = writeln!(file, "{line}");
                }
                tx.send_modify(|lines| lines.push(line));
            }
        });
        Ok(Process {
            child,
            lines: rx,
            name,
        })
    }

    /// Wait until a log line contains `needle`; returns the line.
    pub async fn wait_for_log(
        &mut self,
        needle: &str,
        timeout: Duration,
    ) -> anyhow::Result<String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(line) = self.lines.borrow().iter().find(|l| l.contains(needle)) {
                return Ok(line.clone());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                bail!(
                    "{} exited ({status}) before logging {needle:?}; log:\n{}",
                    self.name,
                    self.log()
                );
            }
            if tokio::time::timeout_at(deadline, self.lines.changed())
                .await
                .is_err()
            {
                bail!(
                    "{} did not log {needle:?} in {timeout:?}; log:\n{}",
                    self.name,
                    self.log()
                );
            }
        }
    }

    /// Whether the process is still running (it has not exited).
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Everything logged so far.
    pub fn log(&self) -> String {
        self.lines.borrow().join("\n")
    }

    /// Send SIGTERM and wait for the exit.
    pub async fn terminate(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        Ok(tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await??)
    }

    /// SIGKILL.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }
}

/// The value of one sample (`name{labels}`) of the Prometheus text page at `url`; 0 when
/// the page does not have it yet.
pub async fn metric(url: &str, sample: &str) -> f64 {
    let text = reqwest::get(url)
        .await
        .expect("metrics answer")
        .text()
        .await
        .expect("metrics text");
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.rsplit_once(' '))
        .find(|(key, _)| *key == sample)
        .map_or(0.0, |(_, value)| value.parse().expect("a number"))
}

/// The command that starts a coordinator for a test.
fn coordinator_command(database_url: &str, prefix: &str, options: &EnvOptions) -> Command {
    let mut command = Command::new(binary("tasker-coordinator"));
    command
        .arg("serve")
        .env("DATABASE_URL", database_url)
        .env("AMQP_URL", amqp_url())
        .env("TASKER_AMQP_PREFIX", prefix)
        .env("TASKER_HTTP_ADDR", "127.0.0.1:0")
        .env("TASKER_DB_POOL_SIZE", "4")
        .env("TASKER_SWEEP_INTERVAL_MS", "500");
    if let Some(dir) = &options.templates_dir {
        command.env("TASKER_TEMPLATES_DIR", dir);
    }
    if let Some(queue_type) = &options.queue_type {
        command.env("TASKER_QUEUE_TYPE", queue_type);
    }
    for (key, value) in &options.coordinator_env {
        command.env(key, value);
    }
    command
}

/// Spawn a coordinator and wait until it listens; returns it and its address.
pub async fn spawn_coordinator(
    command: Command,
    name: &str,
    log_dir: &Path,
) -> anyhow::Result<(Process, String)> {
    let mut coordinator = Process::spawn(command, name.into(), log_dir)?;
    let line = coordinator
        .wait_for_log("coordinator listening", Duration::from_secs(60))
        .await?;
    let address = serde_json::from_str::<Value>(&line)?["address"]
        .as_str()
        .context("address in the listening line")?
        .to_owned();
    Ok((coordinator, address))
}

/// One test's world: a database, a queue prefix, a coordinator and any workers.
pub struct TestEnv {
    pub database_url: String,
    pub prefix: String,
    pub base_url: String,
    pub http: reqwest::Client,
    pub pool: PgPool,
    pub coordinator: Process,
    pub workers: Vec<Process>,
    options: EnvOptions,
    log_dir: PathBuf,
    namespaces: Arc<Mutex<Vec<String>>>,
    finished: bool,
}

impl Drop for TestEnv {
    /// A test that panicked never reached [`TestEnv::finish`]: still drop its database and
    /// queues (its processes die with their handles), so failures leave nothing behind.
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let database = self
            .database_url
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_owned();
        let prefix = self.prefix.clone();
        let namespaces = self
            .namespaces
            .lock()
            .map(|n| n.clone())
            .unwrap_or_default();
        let cleanup = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async move {
                if let Ok(pool) = PgPool::connect(&format!("{}/postgres", postgres_server())).await
                {
                    let sql = format!("DROP DATABASE IF EXISTS \"{database}\" WITH (FORCE)");
                    let _ = sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&pool).await;
                    pool.close().await;
                }
                let _ = delete_broker_objects(&prefix, &namespaces).await;
            });
        });
        let _ = cleanup.join();
    }
}

/// Options for [`TestEnv::start_with`].
#[derive(Default, Clone)]
pub struct EnvOptions {
    /// `TASKER_TEMPLATES_DIR`.
    pub templates_dir: Option<PathBuf>,
    /// Extra environment for the coordinator.
    pub coordinator_env: Vec<(String, String)>,
    /// `TASKER_QUEUE_TYPE` for the coordinators and workers (unset: the default).
    pub queue_type: Option<String>,
}

impl TestEnv {
    /// A coordinator on a fresh database, no workers yet.
    pub async fn start(test: &str) -> anyhow::Result<Self> {
        Self::start_with(test, EnvOptions::default()).await
    }

    pub async fn start_with(test: &str, options: EnvOptions) -> anyhow::Result<Self> {
        let id = Uuid::new_v4().simple().to_string()[..10].to_owned();
        let database_url = format!("{}/tasker_test_{id}", postgres_server());
        let prefix = format!("tt{id}");
        let log_dir = bin_dir()
            .parent()
            .unwrap_or(Path::new("."))
            .join("e2e-logs")
            .join(format!("{test}-{id}"));
        std::fs::create_dir_all(&log_dir)?;

        let command = coordinator_command(&database_url, &prefix, &options);
        let (coordinator, address) = spawn_coordinator(command, "coordinator", &log_dir).await?;
        let pool = PgPool::connect(&database_url).await?;
        Ok(TestEnv {
            database_url,
            prefix,
            base_url: format!("http://{address}"),
            http: reqwest::Client::new(),
            pool,
            coordinator,
            workers: Vec::new(),
            options,
            log_dir,
            namespaces: Arc::default(),
            finished: false,
        })
    }

    /// Start one more coordinator on this test's database and prefix (`name` names its
    /// log), with extra environment; returns it and its base URL once it listens.
    pub async fn start_coordinator(
        &self,
        name: &str,
        env: &[(&str, &str)],
    ) -> anyhow::Result<(Process, String)> {
        let mut command = coordinator_command(&self.database_url, &self.prefix, &self.options);
        for (key, value) in env {
            command.env(key, value);
        }
        let (process, address) = spawn_coordinator(command, name, &self.log_dir).await?;
        Ok((process, format!("http://{address}")))
    }

    /// Start a `tasker-worker` (or another worker binary) serving `namespaces` (empty:
    /// all), and wait until it consumes them. Returns its index in `workers`.
    pub async fn start_worker_binary(
        &mut self,
        binary_path: PathBuf,
        worker_id: &str,
        namespaces: &[&str],
        concurrency: u16,
    ) -> anyhow::Result<usize> {
        self.start_worker_with(binary_path, worker_id, namespaces, concurrency, &[])
            .await
    }

    /// Start a worker binary with extra environment variables.
    pub async fn start_worker_with(
        &mut self,
        binary_path: PathBuf,
        worker_id: &str,
        namespaces: &[&str],
        concurrency: u16,
        env: &[(&str, &str)],
    ) -> anyhow::Result<usize> {
        let mut command = Command::new(binary_path);
        command
            .env("AMQP_URL", amqp_url())
            .env("TASKER_AMQP_PREFIX", &self.prefix)
            .env("TASKER_NAMESPACES", namespaces.join(","))
            .env("TASKER_CONCURRENCY", concurrency.to_string())
            .env("TASKER_WORKER_ID", worker_id);
        if let Some(queue_type) = &self.options.queue_type {
            command.env("TASKER_QUEUE_TYPE", queue_type);
        }
        for (key, value) in env {
            command.env(key, value);
        }
        let mut worker = Process::spawn(command, worker_id.to_owned(), &self.log_dir)?;
        worker
            .wait_for_log("worker started", Duration::from_secs(30))
            .await?;
        for namespace in namespaces {
            worker
                .wait_for_log(
                    &format!("\"queue\":\"{}\"", self.queue(namespace)),
                    Duration::from_secs(30),
                )
                .await?;
        }
        self.workers.push(worker);
        Ok(self.workers.len() - 1)
    }

    /// Start a `tasker-worker` that serves its metrics on a free port; returns its index
    /// in `workers` and the URL of its `/metrics`.
    pub async fn start_metered_worker(
        &mut self,
        worker_id: &str,
        namespaces: &[&str],
        concurrency: u16,
    ) -> anyhow::Result<(usize, String)> {
        let index = self
            .start_worker_with(
                binary("tasker-worker"),
                worker_id,
                namespaces,
                concurrency,
                &[("TASKER_METRICS_ADDR", "127.0.0.1:0")],
            )
            .await?;
        let line = self.workers[index]
            .wait_for_log("metrics listening", Duration::from_secs(10))
            .await?;
        let address = serde_json::from_str::<Value>(&line)?["address"]
            .as_str()
            .context("address in the metrics line")?
            .to_owned();
        Ok((index, format!("http://{address}/metrics")))
    }

    /// Start a `tasker-worker` with the built-in handlers.
    pub async fn start_worker(
        &mut self,
        worker_id: &str,
        namespaces: &[&str],
    ) -> anyhow::Result<usize> {
        self.start_worker_binary(binary("tasker-worker"), worker_id, namespaces, 8)
            .await
    }

    /// Start a `tasker-worker` whose `tasker.http` may call the test's own HTTP stubs on
    /// 127.0.0.1 (the outbound policy refuses loopback by default).
    pub async fn start_worker_calling_stubs(
        &mut self,
        worker_id: &str,
        namespaces: &[&str],
    ) -> anyhow::Result<usize> {
        self.start_worker_with(
            binary("tasker-worker"),
            worker_id,
            namespaces,
            8,
            &[("TASKER_HTTP_ALLOW", "127.0.0.1")],
        )
        .await
    }

    /// The step queue of a namespace under this test's prefix.
    pub fn queue(&self, namespace: &str) -> String {
        format!("{}.steps.{namespace}", self.prefix)
    }

    /// `POST /v1/templates`.
    pub async fn register_template(&self, body: &str) -> anyhow::Result<(StatusCode, Value)> {
        let response = self
            .http
            .post(format!("{}/v1/templates", self.base_url))
            .header("content-type", "application/yaml")
            .body(body.to_owned())
            .send()
            .await?;
        let status = response.status();
        let value: Value = response.json().await?;
        if let Some(namespace) = value["namespace"].as_str() {
            self.namespaces.lock().unwrap().push(namespace.to_owned());
        }
        Ok((status, value))
    }

    /// `POST /v1/tasks`.
    pub async fn create_task(&self, body: Value) -> anyhow::Result<(StatusCode, Value)> {
        let response = self
            .http
            .post(format!("{}/v1/tasks", self.base_url))
            .json(&body)
            .send()
            .await?;
        Ok((response.status(), response.json().await?))
    }

    /// `GET` a path of the API.
    pub async fn get(&self, path: &str) -> anyhow::Result<(StatusCode, Value)> {
        let response = self
            .http
            .get(format!("{}{path}", self.base_url))
            .send()
            .await?;
        Ok((response.status(), response.json().await?))
    }

    /// `POST` a JSON body to a path of the API.
    pub async fn post(&self, path: &str, body: Value) -> anyhow::Result<(StatusCode, Value)> {
        let response = self
            .http
            .post(format!("{}{path}", self.base_url))
            .json(&body)
            .send()
            .await?;
        Ok((response.status(), response.json().await?))
    }

    /// Poll the task until `done` holds for it.
    pub async fn wait_until(
        &self,
        task_id: &str,
        what: &str,
        timeout: Duration,
        done: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let (_, task) = self.get(&format!("/v1/tasks/{task_id}")).await?;
            if done(&task) {
                return Ok(task);
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "task {task_id}: {what} did not happen in {timeout:?}:\n{}",
                    serde_json::to_string_pretty(&task)?
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// The step of a task JSON with this name.
    pub fn step<'a>(task: &'a Value, name: &str) -> &'a Value {
        task["steps"]
            .as_array()
            .and_then(|steps| steps.iter().find(|s| s["name"] == name))
            .unwrap_or_else(|| panic!("no step {name} in {task}"))
    }

    /// Poll the task until its status is one of `statuses`.
    pub async fn wait_for_task(
        &self,
        task_id: &str,
        statuses: &[&str],
        timeout: Duration,
    ) -> anyhow::Result<Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let (_, task) = self.get(&format!("/v1/tasks/{task_id}")).await?;
            if statuses.iter().any(|s| task["status"] == *s) {
                return Ok(task);
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "task {task_id} still {} after {timeout:?}:\n{}\ncoordinator log:\n{}",
                    task["status"],
                    serde_json::to_string_pretty(&task)?,
                    self.coordinator.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Create a task and wait for it to finish.
    pub async fn run_task(&self, body: Value, timeout: Duration) -> anyhow::Result<Value> {
        let (status, task) = self.create_task(body).await?;
        anyhow::ensure!(
            status == StatusCode::CREATED,
            "create answered {status}: {task}"
        );
        let id = task["task_id"].as_str().context("task_id")?.to_owned();
        self.wait_for_task(&id, &["complete", "error", "cancelled"], timeout)
            .await
    }

    /// Stop every process, drop the database and delete the queues.
    pub async fn finish(mut self) -> anyhow::Result<()> {
        for worker in &mut self.workers {
            worker.kill().await;
        }
        self.coordinator.kill().await;
        self.pool.close().await;
        let _ = sqlx::Postgres::drop_database(&self.database_url).await;
        self.finished = true;
        let namespaces = self.namespaces.lock().unwrap().clone();
        delete_broker_objects(&self.prefix, &namespaces).await
    }
}

/// Delete the queues and exchanges a test created under `prefix`.
pub async fn delete_broker_objects(prefix: &str, namespaces: &[String]) -> anyhow::Result<()> {
    delete_broker_objects_at(&amqp_url(), prefix, namespaces).await
}

/// [`delete_broker_objects`] on the broker at `url`.
pub async fn delete_broker_objects_at(
    url: &str,
    prefix: &str,
    namespaces: &[String],
) -> anyhow::Result<()> {
    let connection =
        lapin::Connection::connect(url, lapin::ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    let mut queues: Vec<String> = namespaces
        .iter()
        .map(|n| format!("{prefix}.steps.{n}"))
        .collect();
    queues.extend(
        ["results", "dead_letter"]
            .iter()
            .map(|q| format!("{prefix}.{q}")),
    );
    for queue in queues {
        let _ = channel.queue_delete(queue.into(), Default::default()).await;
    }
    for exchange in ["steps", "control", "dlx", "events"] {
        let _ = channel
            .exchange_delete(format!("{prefix}.{exchange}").into(), Default::default())
            .await;
    }
    let _ = connection.close(200, "OK".into()).await;
    Ok(())
}

/// Close every RabbitMQ connection named `name` (the name a process gives its connection,
/// such as `tasker-worker w2`), as a network fault or an operator would, with
/// `rabbitmqctl close_connection`. Returns how many were closed.
pub async fn close_broker_connections(name: &str) -> anyhow::Result<usize> {
    let listed = rabbitmqctl(&[
        "list_connections",
        "pid",
        "client_properties",
        "-q",
        "--no-table-headers",
    ])
    .await?;
    let wanted = format!("\"{name}\"");
    let pids: Vec<String> = listed
        .lines()
        .filter(|line| line.contains("connection_name") && line.contains(&wanted))
        .filter_map(|line| line.split('\t').next().map(str::to_owned))
        .collect();
    for pid in &pids {
        rabbitmqctl(&["close_connection", pid, "fault injected by a test"]).await?;
    }
    Ok(pids.len())
}

/// Run `rabbitmqctl` with `args`; its standard output, or an error naming its stderr.
async fn rabbitmqctl(args: &[&str]) -> anyhow::Result<String> {
    let output = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .await
        .with_context(|| format!("running rabbitmqctl {}", args[0]))?;
    anyhow::ensure!(
        output.status.success(),
        "rabbitmqctl {} failed: {}",
        args[0],
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Start `tasker-worker` with `env` and expect it to refuse to start (a setting it
/// cannot use): returns what it wrote to stderr.
pub async fn worker_refusing_to_start(env: &[(&str, &str)]) -> String {
    let mut command = tokio::process::Command::new(binary("tasker-worker"));
    command
        .env("AMQP_URL", amqp_url())
        .env("TASKER_AMQP_PREFIX", "unused")
        .kill_on_drop(true);
    for (key, value) in env {
        command.env(key, value);
    }
    let output = tokio::time::timeout(Duration::from_secs(30), command.output())
        .await
        .expect("the worker stops at once")
        .expect("the worker runs");
    assert!(!output.status.success(), "the worker started");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Consumers of `queue` now (0 when it does not exist).
pub async fn queue_consumers(queue: &str) -> anyhow::Result<u32> {
    let connection =
        lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    let declared = channel
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await;
    let _ = connection.close(200, "OK".into()).await;
    Ok(declared.map(|q| q.consumer_count()).unwrap_or(0))
}

/// Wait until `queue` has at least `consumers` consumers; returns how long that took.
pub async fn wait_for_consumers(
    queue: &str,
    consumers: u32,
    timeout: Duration,
) -> anyhow::Result<Duration> {
    let started = std::time::Instant::now();
    loop {
        let now = queue_consumers(queue).await.unwrap_or(0);
        if now >= consumers {
            return Ok(started.elapsed());
        }
        if started.elapsed() > timeout {
            bail!("{queue} has {now} consumers after {timeout:?}, expected {consumers}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
