#!/usr/bin/env bash
# The README's first command: bring PostgreSQL and RabbitMQ up (installing them where
# missing), build Tasker, then run the example: a coordinator and two workers process a
# batch of example workflows (deploy/templates/) with a live progress line and a summary.
#
# Usage: deploy/run-example.sh [--tasks N] [--workers N]
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
# shellcheck source=deploy/lib.sh
. "$here/lib.sh"
cd "$(dirname "$here")"

deploy/services.sh up
ensure_cargo
cargo build --workspace --bins
exec target/debug/tasker-example --templates deploy/templates "$@"
