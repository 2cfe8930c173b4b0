//! Fuzzing of the template parser and the message decoders (proptest).
//!
//! What must hold for any input: no panic, no hang, and an error (never a crash) for
//! anything that is not a valid template or message. Valid generated templates parse to
//! the definition they describe and round-trip through the stored JSON form; valid
//! generated messages round-trip through their decoders.
//!
//! - `templates`: arbitrary text and bytes, YAML/JSON syntax soup, arbitrary JSON trees,
//!   template-shaped objects with wrong values, mutations of the corpus templates, and
//!   generated DAGs in the project and the tasker-engine format.
//! - `messages`: the same for `StepMessage::decode`, `WorkerMessage::decode` and
//!   `ControlMessage::decode`.
//! - `corpus`: every file of `tests/fuzz_corpus/` (real templates and messages from the
//!   deploy folder, the tests and the docs, plus hostile ones), fed to the parsers.
//!
//! Each property runs a few dozen cases by default, so CI stays fast. For a long run:
//! `PROPTEST_CASES=100000 cargo test -p tasker-shared --release --test fuzz`
//! (see `docs/testing.md`). A failing case is shrunk and its seed saved under
//! `shared/proptest-regressions/`, which is committed: the seeds are replayed first on
//! every later run.

mod corpus;
mod messages;
mod strategies;
mod templates;

use proptest::test_runner::{Config, FileFailurePersistence};

/// The proptest configuration: `default_cases` unless `PROPTEST_CASES` says otherwise,
/// failures saved to `regressions` (relative to the crate, where cargo runs tests).
pub(crate) fn config(default_cases: u32, regressions: &'static str) -> Config {
    // `Config::default()` reads the `PROPTEST_*` environment variables.
    let mut config = Config::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = default_cases;
    }
    config.failure_persistence = Some(Box::new(FileFailurePersistence::Direct(regressions)));
    config
}
