#!/usr/bin/env bash
# The project's test command (see README): make sure PostgreSQL and RabbitMQ
# are up, validate the deployment files, check formatting and lints, build
# everything, run the whole workspace's tests.
#
# Usage: deploy/test.sh [cargo-test args] [-- test-harness args]
#   deploy/test.sh                      # everything
#   deploy/test.sh e2e_linear           # only tests whose name contains e2e_linear
#   deploy/test.sh -p tasker-tests -- --nocapture
#
# Environment: TASKER_TEST_THREADS (default 4), TASKER_SERVICE_TIMEOUT (see
# deploy/services.sh).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
# shellcheck source=deploy/lib.sh
. "$here/lib.sh"
cd "$(dirname "$here")"

deploy/services.sh up
ensure_cargo

# --locked keeps CI honest about Cargo.lock, but would fail outright if the
# lock file does not exist yet (it is generated on first build).
locked=()
if [[ -f Cargo.lock ]]; then
    locked=(--locked)
else
    log "note: no Cargo.lock, building without --locked"
fi

# Split our arguments at the first `--`: before it they are cargo-test
# arguments (test name filters, -p, --features...), after it they go to the
# test harness together with our --test-threads. Appending the caller's `--`
# verbatim would give libtest two `--` and break.
cargo_args=()
harness_args=()
while (($#)); do
    if [[ $1 == -- ]]; then
        shift
        harness_args=("$@")
        break
    fi
    cargo_args+=("$1")
    shift
done
# The whole workspace, unless the caller names packages (cargo ignores -p beside
# --workspace).
scope=(--workspace)
for a in "${cargo_args[@]}"; do
    [[ $a == -p || $a == -p* || $a == --package || $a == --package=* ]] && scope=()
done
# End-to-end tests each start their own coordinator and workers; 4 at a time
# fits 2 cores. An explicit --test-threads from the caller wins.
threads_given=no
for a in "${harness_args[@]}"; do
    [[ $a == --test-threads || $a == --test-threads=* ]] && threads_given=yes
done
if [[ $threads_given == no ]]; then
    harness_args+=("--test-threads=${TASKER_TEST_THREADS:-4}")
fi

set -x
# The Python example worker: tests/tests/python_worker.rs runs it and its unit tests, and
# fails when python3, pika or jsonschema is missing (TASKER_SKIP_PYTHON_WORKER=1 skips
# them instead). Debian's own Python refuses pip installs outside a virtualenv; the
# toolchain's Python does not.
if ! python3 -m pip --version >/dev/null 2>&1 && [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-pip
fi
python3 -m pip install -r deploy/examples/python_worker/requirements-test.txt --quiet \
    || python3 -m pip install -r deploy/examples/python_worker/requirements-test.txt --quiet --break-system-packages
# The console's browser tests (tests/tests/e2e/console.rs) drive Debian's Chromium through
# chromedriver, and fail when either is missing (TASKER_SKIP_BROWSER=1 skips them instead).
if ! { command -v chromium && command -v chromedriver; } >/dev/null 2>&1 \
    && [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver
fi
deploy/validate.sh
# What a reviewer checks first: formatting, and every lint with warnings as errors.
cargo fmt --all --check
cargo clippy --workspace --all-targets "${locked[@]}" --features tasker-coordinator/failpoints,tasker-worker/failpoints -- -D warnings
# The shipped configuration (no test hooks) must be clean too.
cargo clippy -p tasker-coordinator -p tasker-worker "${locked[@]}" -- -D warnings
# Every statement under shared/sql/ prepared against a freshly migrated database, and
# none planned to read more than the rows it is given (docs/testing.md).
cargo test -p tasker-shared --test sql "${locked[@]}"
cargo build --workspace --bins --examples "${locked[@]}" --features tasker-coordinator/failpoints,tasker-worker/failpoints
cargo test "${scope[@]}" "${locked[@]}" --features tasker-coordinator/failpoints,tasker-worker/failpoints "${cargo_args[@]}" -- "${harness_args[@]}"
