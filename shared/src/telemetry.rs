//! Logging set-up shared by the binaries.

use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, LogSettings};

/// Install the global tracing subscriber. Call once, at the top of `main`.
pub fn init(settings: &LogSettings) {
    let filter = EnvFilter::try_new(&settings.log_filter).unwrap_or_else(|error| {
        eprintln!(
            "invalid log filter {:?} ({error}); using `info`",
            settings.log_filter
        );
        EnvFilter::new("info")
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match settings.log_format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}
