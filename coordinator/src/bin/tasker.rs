//! `tasker`: the command-line client of the coordinator's HTTP API (see `docs/cli.md`).
//!
//! Thin on purpose: the commands, the HTTP client and the rendering live in
//! `src/cli/`, so the coordinator's library stays free of client code.

#[path = "../cli/mod.rs"]
mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
