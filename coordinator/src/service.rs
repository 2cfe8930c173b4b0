//! One lifecycle for every background service.
//!
//! A [`Service`] (dispatcher, result processor, sweeper, retention, control, gauges,
//! events relay, scheduler, lease lifter) runs until its [`CancellationToken`] is
//! cancelled; returning before that means it failed. [`Services`] starts a group of them
//! with one token and stops them together.
//!
//! Nothing outlives shutdown: every task the coordinator spawns (these services, the
//! HTTP server and its connections, the publisher's batches, the task creator's writes)
//! is spawned on the application's one [`TaskTracker`], as mini-redis tracks its
//! connections, and `Application::run_until_stopped` closes and awaits it before it
//! returns. How shutdown propagates:
//!
//! ```text
//! shutdown ─▶ session services stopped (5 s, then abandoned and named in the log)
//!          ─▶ root token ─┬▶ database services (child token): awaited
//!                         └▶ HTTP server: stops accepting, answers the requests in progress
//!          ─▶ publisher flushed, confirmed leases lifted (10 s) ▶ server awaited
//!          ─▶ task creator closed
//!          ─▶ tracker closed and awaited (5 s, then the tasks left are counted in the log)
//! ```

use std::future::Future;
use std::time::Duration;

use tokio::task::{Id, JoinSet};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A background loop with the coordinator's one start/stop shape.
pub(crate) trait Service: Send + 'static {
    /// The name logs give the service (its tracing span carries the same name).
    const NAME: &'static str;

    /// Run until `stop` is cancelled. Returning earlier means the service failed: the
    /// group that started it notices (see [`Services::stopped_early`]).
    fn run(self, stop: CancellationToken) -> impl Future<Output = ()> + Send;
}

/// Services started together and stopped together, each a task on the application's
/// tracker.
pub(crate) struct Services {
    tasks: TaskTracker,
    stop: CancellationToken,
    running: JoinSet<()>,
    /// The name of each running service, by task.
    names: Vec<(Id, &'static str)>,
}

impl Services {
    /// A group whose services spawn on `tasks` and stop when `stop` is cancelled (by
    /// [`stop`](Self::stop), or by whoever owns a parent of the token).
    pub(crate) fn new(tasks: TaskTracker, stop: CancellationToken) -> Self {
        Services {
            tasks,
            stop,
            running: JoinSet::new(),
            names: Vec::new(),
        }
    }

    /// A new group on the same tracker, stopped with this one or on its own.
    pub(crate) fn child(&self) -> Services {
        Services::new(self.tasks.clone(), self.stop.child_token())
    }

    /// Start `service`.
    pub(crate) fn start<S: Service>(&mut self, service: S) {
        let run = self.tasks.track_future(service.run(self.stop.clone()));
        let task = self.running.spawn(run);
        self.names.push((task.id(), S::NAME));
    }

    /// Wait until a service returns (or panics) without being told to stop, and name it.
    /// Pending while they all run. Cancel-safe.
    pub(crate) async fn stopped_early(&mut self) -> &'static str {
        match self.running.join_next_with_id().await {
            Some(Ok((id, ()))) => self.forget(id),
            Some(Err(error)) => {
                let name = self.forget(error.id());
                tracing::error!(service = name, %error, "a service panicked");
                name
            }
            None => std::future::pending().await,
        }
    }

    /// Tell every service to stop and wait until they have. With `patience`, a service
    /// still running after it is abandoned (aborted at its next await), and named in
    /// the log.
    pub(crate) async fn stop(mut self, patience: Option<Duration>) {
        self.stop.cancel();
        let drain = async {
            while let Some(joined) = self.running.join_next_with_id().await {
                let id = match &joined {
                    Ok((id, ())) => *id,
                    Err(error) => error.id(),
                };
                let name = self.forget(id);
                if let Err(error) = joined {
                    tracing::error!(service = name, %error, "a service panicked");
                }
            }
        };
        let Some(patience) = patience else {
            return drain.await;
        };
        if tokio::time::timeout(patience, drain).await.is_err() {
            let abandoned: Vec<&str> = self.names.iter().map(|(_, name)| *name).collect();
            tracing::warn!(
                services = ?abandoned,
                "services still running {patience:?} after being told to stop; abandoning them"
            );
            self.running.shutdown().await;
        }
    }

    fn forget(&mut self, id: Id) -> &'static str {
        match self.names.iter().position(|(task, _)| *task == id) {
            Some(at) => self.names.swap_remove(at).1,
            None => "?",
        }
    }
}

/// Close `tasks` and wait, for at most `patience`, until every task spawned on it has
/// ended; log how many were abandoned if some had not.
pub(crate) async fn wait_for_all(tasks: &TaskTracker, patience: Duration) {
    tasks.close();
    if tokio::time::timeout(patience, tasks.wait()).await.is_err() {
        tracing::warn!(
            tasks = tasks.len(),
            "tasks still running {patience:?} after shutdown; abandoning them"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Waits;
    impl Service for Waits {
        const NAME: &'static str = "waits";
        async fn run(self, stop: CancellationToken) {
            stop.cancelled().await;
        }
    }

    struct Quits;
    impl Service for Quits {
        const NAME: &'static str = "quits";
        async fn run(self, _stop: CancellationToken) {}
    }

    struct Ignores;
    impl Service for Ignores {
        const NAME: &'static str = "ignores";
        async fn run(self, _stop: CancellationToken) {
            std::future::pending::<()>().await;
        }
    }

    #[tokio::test]
    async fn a_service_that_returns_on_its_own_is_named() {
        let tasks = TaskTracker::new();
        let mut services = Services::new(tasks.clone(), CancellationToken::new());
        services.start(Waits);
        services.start(Quits);
        assert_eq!(services.stopped_early().await, "quits");
        services.stop(None).await;
        wait_for_all(&tasks, Duration::from_secs(1)).await;
        assert!(tasks.is_empty());
    }

    #[tokio::test]
    async fn stopping_waits_for_the_services_and_abandons_the_deaf() {
        let tasks = TaskTracker::new();
        let root = CancellationToken::new();
        let mut services = Services::new(tasks.clone(), root.child_token());
        services.start(Waits);
        services.start(Ignores);
        services.stop(Some(Duration::from_millis(50))).await;
        assert!(
            !root.is_cancelled(),
            "a child group leaves its parent running"
        );
        // The abandoned service was aborted: the tracker has nothing left.
        wait_for_all(&tasks, Duration::from_secs(1)).await;
        assert!(tasks.is_empty());
    }
}
