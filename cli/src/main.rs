//! `tasker`: the command-line client of the coordinator's HTTP API (see `docs/cli.md`).
//!
//! A crate of its own: it speaks HTTP only, so neither the coordinator nor the worker
//! carries client code. The commands, the HTTP client and the rendering live in `cli/`.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
