# shellcheck shell=bash
# Shared helpers for the deploy/ and .ci/ scripts. Source it, don't run it:
#   . "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# Everything here is safe under `set -euo pipefail`.

# Messages go to stderr so that stdout of services.sh stays one line per service.
log() { printf '%s\n' "$*" >&2; }

die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}

# Absolute path of the repository root (deploy/ lives directly under it).
tasker_repo_root() {
    local here
    here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
    dirname "$here"
}

# Make `cargo` callable. CI shells and `sudo` often start without rustup's PATH
# tweak, so try ~/.cargo/env first (what rustup writes), then $CARGO_HOME/bin.
ensure_cargo() {
    if command -v cargo >/dev/null 2>&1; then
        return 0
    fi
    local cargo_home="${CARGO_HOME:-${HOME:-/root}/.cargo}"
    if [[ -f "$cargo_home/env" ]]; then
        # shellcheck source=/dev/null
        . "$cargo_home/env"
    elif [[ -x "$cargo_home/bin/cargo" ]]; then
        PATH="$cargo_home/bin:$PATH"
        export PATH
    fi
    command -v cargo >/dev/null 2>&1 ||
        die "cargo not found on PATH (looked in $cargo_home too); install Rust with rustup"
}
