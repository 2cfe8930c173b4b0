//! A fault-test hook: `TASKER_FAILPOINT_PAUSE_AT=<stage>` holds the first step (or
//! heartbeat) that reaches `<stage>` until the broker connection it belongs to is lost, so
//! a test can cut the connection at exactly that moment and check that the worker comes
//! back. Unset, it costs one comparison per stage. Built only with the `failpoints`
//! feature (deploy/test.sh turns it on): a release worker has no such hook or setting.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Where a step (or the heartbeat loop) can be held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stage {
    /// Delivered, before the started notice.
    Received,
    /// Started notice sent, before the handler runs.
    Running,
    /// Handler returned, before its result is published.
    Publishing,
    /// Result confirmed by the broker, before the step message is acked.
    Acking,
    /// The heartbeat loop, before it publishes the first heartbeat that reports a step.
    Heartbeating,
}

impl Stage {
    const ALL: [(Stage, &'static str); 5] = [
        (Stage::Received, "received"),
        (Stage::Running, "running"),
        (Stage::Publishing, "publishing"),
        (Stage::Acking, "acking"),
        (Stage::Heartbeating, "heartbeating"),
    ];

    pub(crate) fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(stage, _)| *stage == self)
            .map_or("?", |(_, name)| name)
    }
}

/// The armed stage, if any; it fires once.
#[derive(Debug, Clone, Default)]
pub(crate) struct Failpoint {
    stage: Option<Stage>,
    fired: Arc<AtomicBool>,
}

impl Failpoint {
    pub(crate) fn parse(stage: Option<&str>) -> anyhow::Result<Self> {
        let stage = match stage.map(str::trim).filter(|s| !s.is_empty()) {
            None => None,
            Some(name) => Some(
                Stage::ALL
                    .iter()
                    .find(|(_, n)| *n == name)
                    .map(|(stage, _)| *stage)
                    .ok_or_else(|| {
                        anyhow::anyhow!(
                            "TASKER_FAILPOINT_PAUSE_AT={name:?} is not one of: received, running, publishing, acking, heartbeating"
                        )
                    })?,
            ),
        };
        Ok(Failpoint {
            stage,
            fired: Arc::default(),
        })
    }

    /// Whether `stage` is the armed one and this is the first time it is reached.
    pub(crate) fn hits(&self, stage: Stage) -> bool {
        self.stage == Some(stage) && !self.fired.swap(true, Ordering::AcqRel)
    }
}

/// `failpoint.crash`, a handler that takes its worker down as soon as it runs (an exit
/// without any clean-up, and without a core dump): what a handler crashing in native
/// code, or killed for its memory, does to its worker, for the tests of crash loops.
/// Registered only with the `failpoints` feature.
pub(crate) struct Crash;

#[async_trait::async_trait]
impl crate::handler::StepHandler for Crash {
    async fn call(
        &self,
        _step: &crate::handler::StepContext,
    ) -> Result<serde_json::Value, crate::handler::StepError> {
        tracing::error!("failpoint.crash: the worker exits");
        std::process::exit(134)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stage_fires_once_and_unknown_names_are_refused() {
        let point = Failpoint::parse(Some("acking")).unwrap();
        assert!(!point.hits(Stage::Running));
        assert!(point.hits(Stage::Acking));
        assert!(!point.hits(Stage::Acking), "fires once");
        assert!(!Failpoint::parse(None).unwrap().hits(Stage::Acking));
        let error = Failpoint::parse(Some("later")).unwrap_err().to_string();
        assert!(error.contains("heartbeating"), "{error}");
        assert_eq!(Stage::Heartbeating.name(), "heartbeating");
    }
}
