#!/usr/bin/env bash
# Property-based fuzzing of the coordinator's HTTP API with Schemathesis, from the API's
# own OpenAPI description (GET /openapi.json).
#
# Usage: deploy/schemathesis.sh [BASE_URL]
#   BASE_URL defaults to $TASKER_URL, else http://127.0.0.1:8080. A coordinator must be
#   running there (deploy/services.sh up, then tasker-coordinator serve); the end-to-end
#   test tests/tests/schemathesis.rs starts one on its own database and runs this script.
#
# Environment:
#   TASKER_TOKEN                  bearer token sent with every request (when the
#                                 coordinator runs with TASKER_AUTH=on; then the checks
#                                 that a missing or bad token is refused run too)
#   TASKER_SCHEMATHESIS_EXAMPLES  test cases per operation and phase (default 50)
#   TASKER_SCHEMATHESIS_SECONDS   time budget of the whole run (default 120)
#   TASKER_SCHEMATHESIS_SEED      fixed seed, to reproduce a run (default: random; the
#                                 seed is printed)
#   TASKER_SCHEMATHESIS_REPORT    folder for the JUnit report (default: none)
#
# Checks: every Schemathesis check (no 5xx, documented status codes, content types and
# headers, responses conform to their schemas, schema-invalid requests are refused,
# schema-valid ones accepted, 405 with Allow for undocumented methods...). Without a
# token, the authentication checks are left out, and so is negative_data_rejection,
# whose cases include "no Authorization header": a coordinator with TASKER_AUTH=off
# admits everyone by design. Give a token for the full run (the test does).
#
# Schemathesis is installed once, pinned with its dependencies, into a virtualenv under
# ${XDG_CACHE_HOME:-~/.cache}/tasker (TASKER_SCHEMATHESIS_VENV overrides). Exits 0 when
# nothing was found.
set -euo pipefail

base=${1:-${TASKER_URL:-http://127.0.0.1:8080}}
base=${base%/}
cache=${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/tasker
venv=${TASKER_SCHEMATHESIS_VENV:-$cache/schemathesis-venv}

# Schemathesis 4 (its CLI differs from 3.x: `st run`, --checks/--exclude-checks,
# --max-examples, --phases, schemathesis.toml), with every dependency pinned.
pins=(
    schemathesis==4.32.5
    anyio==4.16.0
    certifi==2026.10.19.post1
    charset-normalizer==3.5.3
    click==8.5.1
    graphql-core==3.3.2
    harfile==0.6.0
    hypothesis==6.170.17
    hypothesis-graphql==0.13.5
    idna==3.20
    iniconfig==2.3.1
    jsonschema_rs==0.60.3
    markdown-it-py==4.3.0
    MarkupSafe==3.0.4
    mdurl==0.1.2
    packaging==26.4
    pluggy==1.7.0
    Pygments==2.21.0
    pyrate-limiter==4.5.1
    pytest==9.2.0
    PyYAML==6.0.4
    requests==2.34.2
    rich==15.0.0
    sortedcontainers==2.4.0
    typing_extensions==4.16.0
    urllib3==2.8.0
    Werkzeug==3.1.9
)

log() { printf 'schemathesis.sh: %s\n' "$*" >&2; }

ensure_schemathesis() {
    local stamp=$venv/.tasker-pins want
    want=$(printf '%s\n' "${pins[@]}")
    if [[ -x $venv/bin/st && -f $stamp && $(cat "$stamp") == "$want" ]]; then
        return
    fi
    command -v python3 >/dev/null || { log "error: python3 is needed"; exit 2; }
    log "installing Schemathesis into $venv (once)"
    rm -rf "$venv"
    mkdir -p "$(dirname "$venv")"
    python3 -m venv "$venv" || {
        log "error: python3 -m venv failed (on Debian: apt-get install python3-venv)"
        exit 2
    }
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${pins[@]}"
    printf '%s\n' "$want" >"$stamp"
}

ensure_schemathesis

# The coordinator must answer before the run: a clear message beats 100 connection errors.
if ! "$venv/bin/python" - "$base" <<'PY'
import sys, time, urllib.request
for _ in range(60):
    try:
        with urllib.request.urlopen(sys.argv[1] + "/openapi.json", timeout=2) as r:
            if r.status == 200:
                sys.exit(0)
    except Exception:
        pass
    time.sleep(0.5)
sys.exit(1)
PY
then
    log "error: no coordinator answers at $base/openapi.json"
    exit 2
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Per-operation settings Schemathesis reads from a config file only.
#
# create_template: its body is a whole template (two formats, identifiers, unique step
# names, dependencies that name other steps, no cycles), described in the OpenAPI
# document only as "an object". Most schema-valid objects are therefore invalid templates
# (422, correctly), so `positive_data_acceptance` cannot hold there; every other check
# runs on it, including that nothing gets a 5xx.
#
# create_task: whether a schema-valid body is accepted depends on the clock (a `deadline`
# must be in the future and after `run_at`) and on the template (`bypass_steps` must name
# its skippable steps, a first step's `when` must hold for the context), which the
# OpenAPI document cannot say; the same checks otherwise.
#
# create_schedule, update_schedule: a schedule is accepted when its cron parses, its time
# zone is an IANA name and its template is registered (422 naming each otherwise), which
# a schema cannot say of a string; the same checks otherwise.
#
# analytics_*: `since` must be before `until` and at most 31 days before it (400
# otherwise), a relation between two parameters a schema cannot say; the same checks
# otherwise.
cat >"$work/schemathesis.toml" <<'TOML'
[[operations]]
include-operation-id = "create_template"
checks.positive_data_acceptance.enabled = false

[[operations]]
include-operation-id = "create_task"
checks.positive_data_acceptance.enabled = false

[[operations]]
include-operation-id = "create_schedule"
checks.positive_data_acceptance.enabled = false

[[operations]]
include-operation-id = "update_schedule"
checks.positive_data_acceptance.enabled = false

[[operations]]
include-operation-id = "analytics_templates"
checks.positive_data_acceptance.enabled = false

[[operations]]
include-operation-id = "analytics_steps"
checks.positive_data_acceptance.enabled = false

[[operations]]
include-operation-id = "analytics_bottlenecks"
checks.positive_data_acceptance.enabled = false
TOML

args=(
    run "$base/openapi.json"
    --url "$base"
    # Every check is on by default (Schemathesis 4); naming them with `--checks all` would
    # also override the per-operation settings above.
    --max-examples "${TASKER_SCHEMATHESIS_EXAMPLES:-50}"
    --max-time "${TASKER_SCHEMATHESIS_SECONDS:-120}"
    --request-timeout 10
    # One worker: with several, Hypothesis trips over a CPython 3.11 `ast` race ("AST
    # constructor recursion depth mismatch") and reports runtime errors of its own.
    --workers 1
    --no-color
    # A hang is a failure too.
    --max-response-time 10
    # An event stream answers 200 and stays open: every call would hang until the request
    # timeout. Its parameters are checked by tests/tests/e2e/console.rs instead.
    --exclude-operation-id stream_events
)
if [[ -n ${TASKER_TOKEN:-} ]]; then
    args+=(--header "Authorization: Bearer $TASKER_TOKEN")
    # Not applicable: there is one token, so no second principal to test object access.
    args+=(--exclude-checks object_level_authorization)
else
    log "no TASKER_TOKEN: authentication checks and negative_data_rejection are left out"
    args+=(--exclude-checks ignored_auth,missing_required_header,object_level_authorization,negative_data_rejection)
fi
if [[ -n ${TASKER_SCHEMATHESIS_SEED:-} ]]; then
    args+=(--seed "$TASKER_SCHEMATHESIS_SEED")
fi
if [[ -n ${TASKER_SCHEMATHESIS_REPORT:-} ]]; then
    args+=(--report junit --report-dir "$TASKER_SCHEMATHESIS_REPORT")
fi

log "fuzzing $base (schemathesis $("$venv/bin/st" --version 2>/dev/null | awk '{print $NF}'))"
cd "$work"
"$venv/bin/st" --config-file "$work/schemathesis.toml" "${args[@]}"
