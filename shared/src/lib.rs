//! # tasker-shared
//!
//! The coordinator's domain: states, templates, persistence and lifecycle events, over
//! the protocol crate (`tasker-protocol`), whose modules it re-exports so the coordinator
//! reaches everything through one path. Workers depend on `tasker-protocol` alone, without
//! PostgreSQL, templates or JSON Schema.
//!
//! ## Layout
//! - [`states`]: task and step states, transition reasons and the allowed transitions
//!   (with a diagram).
//! - [`decision`]: what an arriving result does to its step (complete, retry, defer,
//!   fail, or drop as stale), as a pure function.
//! - [`template`]: parsing and validating templates (the project's format and
//!   tasker-engine 1.x files), and validating a task's context against its schema.
//! - [`db`]: the PostgreSQL pool and the embedded migrations.
//! - [`store`]: every query; [`store::transitions`] is the only place states change.
//! - [`events`]: lifecycle event names and payloads.
//! - [`span`]: spans of time as written (`90s`, `12h`, `30d`).
//! - re-exported from `tasker-protocol`: [`messages`], [`broker`], [`signing`],
//!   [`config`], [`metrics`], [`telemetry`], [`shutdown_signal`].

#![warn(missing_docs)]

pub mod db;
pub mod decision;
pub mod events;
pub mod schedule;
pub mod span;
pub mod states;
pub mod store;
pub mod template;

pub use tasker_protocol::{broker, config, messages, metrics, shutdown_signal, signing, telemetry};
