//! A binary of the workspace run as a child process, its log lines kept for the test.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;

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

    /// Wait until a log line contains `needle` and return the `address` it names: the
    /// way a process says where it listens.
    pub async fn wait_for_address(
        &mut self,
        needle: &str,
        timeout: Duration,
    ) -> anyhow::Result<String> {
        let line = self.wait_for_log(needle, timeout).await?;
        let address = serde_json::from_str::<Value>(&line)?["address"]
            .as_str()
            .with_context(|| format!("address in {line}"))?
            .to_owned();
        Ok(address)
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

    /// The log lines as they arrive.
    pub(crate) fn lines(&self) -> watch::Receiver<Vec<String>> {
        self.lines.clone()
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

    /// SIGKILL, without waiting for the exit.
    pub(crate) fn start_kill(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// Spawn a coordinator and wait until it listens; returns it and its address.
///
/// For the benchmark and the tests that need the coordinator as a process: the log line
/// is how a process says where it listens.
pub async fn spawn_coordinator(
    command: Command,
    name: &str,
    log_dir: &Path,
) -> anyhow::Result<(Process, String)> {
    let mut coordinator = Process::spawn(command, name.into(), log_dir)?;
    let address = coordinator
        .wait_for_address("coordinator listening", Duration::from_secs(60))
        .await?;
    Ok((coordinator, address))
}
