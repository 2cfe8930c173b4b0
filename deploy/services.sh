#!/usr/bin/env bash
# Bring up the two external services Tasker's tests need, on Debian 12:
#   PostgreSQL  on 127.0.0.1:5432, user `postgres` with trust auth (no password)
#   RabbitMQ    on 127.0.0.1:5672, user guest/guest
#
# Usage: deploy/services.sh up|status|down|restart-broker|restart-database
#   up      install what is missing, start what is stopped, wait until both are
#           ready (bounded), print one line per service. A no-op when both run.
#   status  print the state of each service; exit 0 only if both are ready.
#   down    stop both (for use by hand).
#   restart-broker / restart-database
#           stop one service completely and start it again (the chaos suite's
#           faults; everything connected to it is cut off meanwhile).
#
# Environment:
#   TASKER_SERVICE_TIMEOUT  seconds to wait for each service to come up (60)
#   RABBITMQ_NODENAME       RabbitMQ node name, if you know better than us
#
# Works with or without systemd as PID 1: containers and VMs started by other
# init programs have no systemd, and there `systemctl`/`service` either fail or
# (with policy-rc.d) silently do nothing, so we drive the daemons directly.
set -euo pipefail

# shellcheck source=deploy/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# rabbitmq-server, rabbitmqctl and runuser live in sbin, which non-login root
# shells (sudo, CI runners) do not always have on PATH.
PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"
export PATH

readonly PG_HOST=127.0.0.1
readonly PG_PORT=5432
readonly RMQ_HOST=127.0.0.1
readonly RMQ_PORT=5672
readonly TIMEOUT="${TASKER_SERVICE_TIMEOUT:-60}"
readonly RMQ_ENV_CONF=/etc/rabbitmq/rabbitmq-env.conf
readonly RMQ_LOG_DIR=/var/log/rabbitmq
# Output of our own `rabbitmq-server -detached` / `pg_ctlcluster start` calls.
# Keeping the daemons' stdio off our stdout also matters: a daemon that inherits
# a pipe keeps it open, and whoever reads our output (CI) would hang forever.
readonly RMQ_START_LOG="$RMQ_LOG_DIR/tasker-start.log"
readonly PG_START_LOG=/var/log/postgresql/tasker-start.log

# ---------------------------------------------------------------- generic ---

have() { command -v "$1" >/dev/null 2>&1; }

has_systemd() {
    # Both checks: the binary can be installed without running as PID 1.
    [[ -d /run/systemd/system ]] && pidof systemd >/dev/null 2>&1
}

# Run a privileged command: directly as root, else through passwordless sudo,
# else as ourselves (it will fail with the tool's own message).
as_root() {
    if [[ $EUID -eq 0 ]]; then
        "$@"
    elif have sudo && sudo -n true 2>/dev/null; then
        sudo -n "$@"
    else
        "$@"
    fi
}

# True if something accepts TCP connections on host:port. Uses bash's
# /dev/tcp so it needs neither nc nor ss; `timeout` bounds a SYN into a void.
tcp_open() {
    # shellcheck disable=SC2016 # $1/$2 are expanded by the inner bash
    timeout 3 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$1" "$2" 2>/dev/null
}

# Print the last lines of each existing file, framed, to stderr.
show_logs() {
    local f
    for f in "$@"; do
        [[ -s "$f" ]] || continue
        log "----- last 30 lines of $f -----"
        tail -n 30 "$f" >&2 || true
    done
    log "-----"
}

# ------------------------------------------------------------ installing ---

pg_installed() {
    have pg_ctlcluster && have pg_isready && have psql &&
        compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null
}

rmq_installed() { have rabbitmq-server && have rabbitmqctl; }

# Install the missing packages in a single apt run. On a machine with
# policy-rc.d returning 101 (Docker-style images) the postinst scripts do not
# start the daemons; elsewhere they may. Either way start_* below copes.
install_missing() {
    local pkgs=()
    pg_installed || pkgs+=(postgresql)
    rmq_installed || pkgs+=(rabbitmq-server)
    [[ ${#pkgs[@]} -eq 0 ]] && return 0

    have apt-get || die "missing ${pkgs[*]} and apt-get is not available; install them by hand"
    log "installing ${pkgs[*]} (apt-get) ..."
    # The lock timeout rides out a concurrent apt run (unattended upgrades).
    as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get -o DPkg::Lock::Timeout=300 update -q >&2 ||
        die "apt-get update failed"
    as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get -o DPkg::Lock::Timeout=300 install -y -q "${pkgs[@]}" >&2 ||
        die "apt-get install ${pkgs[*]} failed"
    hash -r
    pg_installed || die "postgresql still not usable after apt-get install"
    rmq_installed || die "rabbitmq-server still not usable after apt-get install"
}

# ------------------------------------------------------------- postgresql ---

# "<version> <cluster> <status> <logfile>" of the cluster configured for port
# 5432, or nothing. pg_lsclusters -h: ver cluster port status owner datadir log.
pg_cluster() {
    pg_lsclusters -h 2>/dev/null | awk -v p="$PG_PORT" '$3 == p { print $1, $2, $4, $7; exit }'
}

pg_ready() { pg_isready -q -h "$PG_HOST" -p "$PG_PORT" -t 3 >/dev/null 2>&1; }

# Can we log in over TCP as postgres without any password? PGPASSWORD and the
# passfile are neutralised so that a developer's ~/.pgpass cannot mask the
# fact that the server would ask for one.
pg_trust_ok() {
    env -u PGPASSWORD PGPASSFILE=/dev/null PGCONNECT_TIMEOUT=5 \
        psql -X -w -q -h "$PG_HOST" -p "$PG_PORT" -U postgres -d postgres \
        -tAc 'select 1' >/dev/null 2>&1
}

# Create the cluster if the package install did not (create_main_cluster can
# be disabled in /etc/postgresql-common/createcluster.conf).
pg_ensure_cluster() {
    [[ -n "$(pg_cluster)" ]] && return 0
    if [[ -n "$(pg_lsclusters -h 2>/dev/null)" ]]; then
        pg_lsclusters >&2 || true
        die "PostgreSQL clusters exist but none is configured for port $PG_PORT; fix by hand"
    fi
    local ver
    ver=$(find /usr/lib/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' | sort -V | tail -n 1)
    [[ -n "$ver" ]] || die "no PostgreSQL server version found under /usr/lib/postgresql"
    log "creating PostgreSQL cluster $ver/main on port $PG_PORT ..."
    as_root pg_createcluster --port "$PG_PORT" "$ver" main >&2 ||
        die "pg_createcluster $ver main failed"
}

# Start the cluster unless it already is (or is starting: pg_lsclusters says
# "online" as soon as the postmaster pid is alive).
pg_start() {
    local ver name status logfile
    read -r ver name status logfile <<<"$(pg_cluster)"
    [[ "$status" == online* ]] && return 0
    log "starting PostgreSQL $ver/$name ..."
    if has_systemd; then
        as_root systemctl start --no-block "postgresql@$ver-$name" ||
            die "systemctl start postgresql@$ver-$name failed"
        return 0
    fi
    # Without systemd pg_ctlcluster would still try to redirect to systemctl
    # if the unit files exist; --skip-systemctl-redirect makes it use pg_ctl.
    # pg_ctl itself waits (up to 60 s) for startup; our own wait follows.
    as_root mkdir -p "$(dirname "$PG_START_LOG")"
    if ! as_root pg_ctlcluster --skip-systemctl-redirect "$ver" "$name" start \
        </dev/null >>"$PG_START_LOG" 2>&1; then
        log "error: pg_ctlcluster $ver $name start failed"
        show_logs "$PG_START_LOG" "$logfile"
        exit 1
    fi
}

pg_wait() {
    local ver name status logfile deadline=$((SECONDS + TIMEOUT))
    read -r ver name status logfile <<<"$(pg_cluster)"
    until pg_ready; do
        if ((SECONDS >= deadline)); then
            log "error: PostgreSQL $ver/$name not accepting connections on $PG_HOST:$PG_PORT after ${TIMEOUT}s"
            show_logs "$PG_START_LOG" "$logfile"
            exit 1
        fi
        sleep 1
    done
}

# Debian's default pg_hba.conf uses scram-sha-256 for host connections; the
# tests connect over TCP without a password. Only touch the file when a
# passwordless TCP login actually fails, so a hand-tuned setup is left alone.
pg_ensure_trust() {
    pg_trust_ok && return 0
    local ver name status logfile hba
    read -r ver name status logfile <<<"$(pg_cluster)"
    # Ask the server where its hba file is (local socket, peer auth as the
    # postgres OS user); fall back to the Debian location.
    hba=$(as_root runuser -u postgres -- psql -X -w -p "$PG_PORT" -tAc 'show hba_file' 2>/dev/null) || true
    [[ -n "$hba" ]] || hba="/etc/postgresql/$ver/$name/pg_hba.conf"
    as_root test -f "$hba" || die "cannot find pg_hba.conf (tried $hba)"

    log "switching 127.0.0.1/32 and ::1/128 host lines to trust in $hba (backup: $hba.tasker-bak) ..."
    as_root cp -p "$hba" "$hba.tasker-bak"
    # Rewrite the METHOD field of every host/hostssl/hostnossl line whose
    # ADDRESS is the loopback; auth options after the method are dropped
    # (trust takes none), trailing comments are kept. PostgreSQL uses the first matching line, so every
    # loopback line must change, not only the "all all" ones.
    as_root sed -E -i \
        's%^([[:space:]]*host(ssl|nossl)?[[:space:]]+[^[:space:]]+[[:space:]]+[^[:space:]]+[[:space:]]+(127\.0\.0\.1/32|::1/128)[[:space:]]+)[^[:space:]#]+([[:space:]]+[^[:space:]#]+)*%\1trust%' \
        "$hba"
    # No loopback line at all (hand-trimmed file): add one.
    if ! as_root grep -Eq '^[[:space:]]*host[[:space:]]+all[[:space:]]+all[[:space:]]+127\.0\.0\.1/32[[:space:]]+trust' "$hba"; then
        printf 'host    all    all    127.0.0.1/32    trust\n' | as_root tee -a "$hba" >/dev/null
    fi
    if has_systemd; then
        as_root systemctl reload "postgresql@$ver-$name"
    else
        as_root pg_ctlcluster --skip-systemctl-redirect "$ver" "$name" reload
    fi
    # Reload is asynchronous: give the postmaster a moment to re-read the file.
    local _
    for _ in 1 2 3 4 5 6 7 8 9 10; do
        pg_trust_ok && return 0
        sleep 0.5
    done
    log "error: still cannot log in as postgres on $PG_HOST:$PG_PORT without a password; effective $hba:"
    as_root grep -Ev '^[[:space:]]*(#|$)' "$hba" >&2 || true
    exit 1
}

pg_up() {
    pg_ensure_cluster
    local was="already running"
    if ! pg_ready; then
        was=started
        pg_start
    fi
    pg_wait
    pg_ensure_trust
    local ver name rest
    read -r ver name rest <<<"$(pg_cluster)"
    echo "postgresql: ready on $PG_HOST:$PG_PORT (cluster $ver/$name, trust auth for postgres; $was)"
}

pg_status() {
    if ! pg_installed; then
        echo "postgresql: not installed"
        return 1
    fi
    local ver name status logfile
    read -r ver name status logfile <<<"$(pg_cluster)"
    if [[ -z "$ver" ]]; then
        echo "postgresql: installed, but no cluster on port $PG_PORT"
        return 1
    fi
    local rc=0
    pg_isready -q -h "$PG_HOST" -p "$PG_PORT" -t 3 >/dev/null 2>&1 || rc=$?
    case $rc in
    0)
        if pg_trust_ok; then
            echo "postgresql: running, accepting connections on $PG_HOST:$PG_PORT (cluster $ver/$name, trust auth ok)"
        else
            echo "postgresql: running on $PG_HOST:$PG_PORT (cluster $ver/$name) but postgres needs a password over TCP; run 'up' to fix"
            return 1
        fi
        ;;
    1) echo "postgresql: starting up or shutting down, rejecting connections (cluster $ver/$name)"; return 1 ;;
    *) echo "postgresql: stopped (cluster $ver/$name, $status)"; return 1 ;;
    esac
}

pg_down() {
    local ver name status logfile
    read -r ver name status logfile <<<"$(pg_cluster)"
    [[ -n "$ver" ]] || { echo "postgresql: no cluster on port $PG_PORT"; return 0; }
    if [[ "$status" != online* ]]; then
        echo "postgresql: already stopped (cluster $ver/$name)"
        return 0
    fi
    if has_systemd; then
        as_root systemctl stop "postgresql@$ver-$name"
    else
        as_root pg_ctlcluster --skip-systemctl-redirect "$ver" "$name" stop
    fi
    echo "postgresql: stopped (cluster $ver/$name)"
}

# --------------------------------------------------------------- rabbitmq ---

# Home of the rabbitmq OS user: the Erlang cookie the CLI must share with the
# server lives there. Debian's wrapper switches to that user with `su`, which
# sets HOME; we set it too for CLI builds without the wrapper, where a root
# HOME of /root would pick up a different cookie and fail to authenticate.
rmq_home() {
    local h
    h=$(getent passwd rabbitmq | cut -d: -f6) || true
    echo "${h:-/var/lib/rabbitmq}"
}

# The node name the server uses (and so the CLI must use). Precedence as in
# rabbitmq-env: the environment, then rabbitmq-env.conf, then rabbit@<short
# hostname>. If the short hostname does not resolve, a default-named node
# could not start at all, so we pick rabbit@localhost instead (and start the
# server with that name).
rmq_node_guess() {
    if [[ -n "${RABBITMQ_NODENAME:-}" ]]; then
        echo "$RABBITMQ_NODENAME"
        return
    fi
    local conf
    if [[ -r "$RMQ_ENV_CONF" ]]; then
        conf=$(sed -nE 's/^[[:space:]]*(export[[:space:]]+)?(RABBITMQ_)?NODENAME=["'\'']?([^"'\''[:space:]]+).*/\3/p' "$RMQ_ENV_CONF" | tail -n 1)
        if [[ -n "$conf" ]]; then
            # A bare name (NODENAME=rabbit) gets the short hostname appended.
            [[ "$conf" == *@* ]] || conf="$conf@$(hostname -s 2>/dev/null || hostname)"
            echo "$conf"
            return
        fi
    fi
    local host
    host=$(hostname -s 2>/dev/null || hostname)
    if getent hosts "$host" >/dev/null 2>&1; then
        echo "rabbit@$host"
    else
        echo "rabbit@localhost"
    fi
}

RMQ_NODE=""     # node name the CLI talks to, set by rmq_resolve_node
RMQ_NODE_OK=0   # 1 once that name answered a ping
RMQ_WAS="already running"

rmqctl() {
    # `timeout`: rabbitmqctl can hang for ~50 s on an unresolvable node name
    # whatever its own --timeout says.
    local limit=$1
    shift
    as_root env HOME="$(rmq_home)" timeout "$limit" rabbitmqctl -n "$RMQ_NODE" "$@"
}

rmq_ping() { rmqctl 20 -q ping >/dev/null 2>&1; }

# A beam process owned by rabbitmq means a node is running or booting: never
# start a second one next to it.
rmq_beam_running() { pgrep -u rabbitmq -x beam.smp >/dev/null 2>&1; }

# Settle RMQ_NODE. When a node is alive but does not answer to the guessed
# name (hostname changed since it started, config edited, ...), try the usual
# alternatives and keep the one that answers.
rmq_resolve_node() {
    RMQ_NODE=$(rmq_node_guess)
    RMQ_NODE_OK=0
    rmq_beam_running || return 0
    if rmq_ping; then
        RMQ_NODE_OK=1
        return 0
    fi
    local host cand
    host=$(hostname -s 2>/dev/null || hostname)
    for cand in "rabbit@localhost" "rabbit@$host" "rabbit@$(hostname)"; do
        [[ "$cand" == "$RMQ_NODE" ]] && continue
        if RMQ_NODE=$cand rmq_ping; then
            RMQ_NODE=$cand
            RMQ_NODE_OK=1
            return 0
        fi
    done
    # Nothing answered: probably still booting; keep the guess.
    RMQ_NODE=$(rmq_node_guess)
}

rmq_start() {
    if tcp_open "$RMQ_HOST" "$RMQ_PORT" || rmq_beam_running; then
        return 0
    fi
    RMQ_WAS=started
    log "starting RabbitMQ (node $RMQ_NODE) ..."
    if has_systemd; then
        as_root systemctl start --no-block rabbitmq-server ||
            die "systemctl start rabbitmq-server failed"
        return 0
    fi
    as_root mkdir -p "$RMQ_LOG_DIR"
    # -detached: the Erlang VM daemonises (own session, parent init), so the
    # node survives this script and the CI job's process group. Debian's
    # /usr/sbin/rabbitmq-server wrapper switches to the rabbitmq user itself.
    # RABBITMQ_NODENAME makes the server use the name we will talk to.
    if ! (cd / && as_root env HOME="$(rmq_home)" RABBITMQ_NODENAME="$RMQ_NODE" \
        rabbitmq-server -detached </dev/null >>"$RMQ_START_LOG" 2>&1); then
        log "error: rabbitmq-server -detached failed"
        show_logs "$RMQ_START_LOG" "$RMQ_LOG_DIR/$RMQ_NODE.log"
        exit 1
    fi
}

rmq_fail() {
    log "error: $*"
    log "hint: if the node is up with the app stopped, run: rabbitmqctl -n $RMQ_NODE start_app"
    show_logs "$RMQ_START_LOG" "$RMQ_LOG_DIR/startup_err" "$RMQ_LOG_DIR/$RMQ_NODE.log"
    exit 1
}

# Ready means: the AMQP listener accepts TCP connections AND the node reports
# that boot finished (the listener opens slightly before all boot steps end).
rmq_wait() {
    local deadline=$((SECONDS + TIMEOUT))
    until tcp_open "$RMQ_HOST" "$RMQ_PORT"; do
        ((SECONDS < deadline)) ||
            rmq_fail "RabbitMQ not accepting connections on $RMQ_HOST:$RMQ_PORT after ${TIMEOUT}s"
        # A node that was still shutting down (e.g. `up` right after
        # `rabbitmqctl stop`) made rmq_start skip; start once it is gone. A
        # node that we started and that died is not restarted: that is an error.
        if [[ $RMQ_WAS != started ]] && ! rmq_beam_running; then
            rmq_start
        elif [[ $RMQ_WAS == started ]] && ! rmq_beam_running && ! has_systemd &&
            ((SECONDS > deadline - TIMEOUT + 5)); then
            rmq_fail "RabbitMQ node exited during startup"
        fi
        sleep 1
    done
    # Now that the listener is up the node must answer; re-resolve its name in
    # case it was still booting (or not yet started) when we first looked.
    ((RMQ_NODE_OK)) || rmq_resolve_node
    local left=$((deadline - SECONDS))
    ((left >= 10)) || left=10
    rmqctl $((left + 15)) -q await_startup --timeout "$left" >/dev/null 2>&1 ||
        rmq_fail "rabbitmqctl -n $RMQ_NODE await_startup did not succeed within ${left}s"
}

# Call after rmq_resolve_node + rmq_start (main starts RabbitMQ early).
rmq_up() {
    rmq_wait
    echo "rabbitmq: ready on $RMQ_HOST:$RMQ_PORT (node $RMQ_NODE, guest/guest; $RMQ_WAS)"
}

rmq_status() {
    if ! rmq_installed; then
        echo "rabbitmq: not installed"
        return 1
    fi
    rmq_resolve_node
    local tcp=no beam=no
    tcp_open "$RMQ_HOST" "$RMQ_PORT" && tcp=yes
    rmq_beam_running && beam=yes
    if [[ $tcp == yes ]] && rmq_ping; then
        echo "rabbitmq: running, accepting connections on $RMQ_HOST:$RMQ_PORT (node $RMQ_NODE)"
    elif [[ $tcp == yes ]]; then
        echo "rabbitmq: port $RMQ_PORT open but node $RMQ_NODE does not answer rabbitmqctl"
        return 1
    elif [[ $beam == yes ]]; then
        echo "rabbitmq: node process alive but port $RMQ_PORT closed (booting, or app stopped) (node $RMQ_NODE)"
        return 1
    else
        echo "rabbitmq: stopped (node $RMQ_NODE)"
        return 1
    fi
}

rmq_down() {
    rmq_resolve_node
    if ! rmq_beam_running && ! tcp_open "$RMQ_HOST" "$RMQ_PORT"; then
        echo "rabbitmq: already stopped (node $RMQ_NODE)"
        return 0
    fi
    if has_systemd; then
        as_root systemctl stop rabbitmq-server
    elif rmq_ping; then
        # `shutdown`, unlike `stop`, returns only once the Erlang VM has
        # exited, so an `up` right after `down` does not find a dying node.
        rmqctl 120 shutdown >&2
    fi
    # A VM that no longer answers (halting, or wedged) gets time to exit.
    local deadline=$((SECONDS + TIMEOUT))
    while rmq_beam_running; do
        ((SECONDS < deadline)) ||
            die "RabbitMQ VM (user rabbitmq, beam.smp) still running after ${TIMEOUT}s; stop it by hand"
        sleep 1
    done
    echo "rabbitmq: stopped (node $RMQ_NODE)"
}

# ------------------------------------------------------------------- main ---

usage() {
    log "usage: $0 up|status|down|restart-broker|restart-database"
    exit 2
}

main() {
    [[ $# -eq 1 ]] || usage
    case $1 in
    up)
        install_missing
        # Kick off RabbitMQ first: `-detached` returns at once while the node
        # boots (~5-10 s), overlapping with PostgreSQL's start and wait.
        rmq_resolve_node
        rmq_start
        pg_up
        rmq_up
        ;;
    status)
        local rc=0
        pg_status || rc=1
        rmq_status || rc=1
        return "$rc"
        ;;
    down)
        if pg_installed; then pg_down; fi
        if rmq_installed; then rmq_down; fi
        ;;
    # For the chaos suite (tests/tests/chaos.rs): stop the service completely, start
    # it again, wait until it serves.
    restart-broker)
        rmq_down
        rmq_resolve_node
        rmq_start
        rmq_up
        ;;
    restart-database)
        pg_down
        pg_up
        ;;
    *) usage ;;
    esac
}

main "$@"
