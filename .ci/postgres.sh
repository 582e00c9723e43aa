#!/usr/bin/env bash
# A throwaway PostgreSQL cluster for the tests: in a temporary directory,
# on a free loopback port, run as the `postgres` user when this script runs
# as root (PostgreSQL refuses to run as root), trust authentication on
# loopback only.
#
#   eval "$(bash .ci/postgres.sh start)"   # sets QPQ_TEST_POSTGRES_URL and QPQ_TEST_POSTGRES_DIR
#   bash .ci/postgres.sh stop "$QPQ_TEST_POSTGRES_DIR"
#
# The outage test stops a cluster of its own as a crash would and starts
# it again on the same port:
#   bash .ci/postgres.sh crash DIR; bash .ci/postgres.sh restart DIR
# and makes one hang (every process of it stopped, SIGSTOP) and go on:
#   bash .ci/postgres.sh freeze DIR; bash .ci/postgres.sh thaw DIR
#
# PG_SERVER_OPTIONS adds server settings (e.g. "-c max_pred_locks_per_page=64").
# Needs PostgreSQL's server binaries (Debian: `postgresql`); the newest
# version under /usr/lib/postgresql is used.
set -euo pipefail

bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
if [ -z "$bin" ] || [ ! -x "$bin/initdb" ]; then
    echo "no PostgreSQL server binaries under /usr/lib/postgresql" >&2
    exit 1
fi

as_postgres() {
    if [ "$(id -u)" = 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

case "${1:-}" in
start)
    dir=$(mktemp -d -t qpq-postgres.XXXXXX)
    chmod 755 "$dir"
    [ "$(id -u)" = 0 ] && chown postgres: "$dir"
    # A port nothing listens on (a connection to it is refused).
    while :; do
        port=$((20000 + RANDOM % 40000))
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null || break
    done
    as_postgres "$bin/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 >"$dir/initdb.log" 2>&1 ||
        { cat "$dir/initdb.log" >&2; exit 1; }
    echo "$port" >"$dir/port"
    as_postgres "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
        -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c max_connections=200 ${PG_SERVER_OPTIONS:-}" start >/dev/null ||
        { cat "$dir/server.log" >&2; exit 1; }
    echo "${PG_SERVER_OPTIONS:-}" >"$dir/options"
    echo "export QPQ_TEST_POSTGRES_DIR=$dir"
    echo "export QPQ_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:$port/postgres"
    ;;
stop)
    dir=${2:?usage: postgres.sh stop DIR}
    as_postgres "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null 2>&1 || true
    rm -rf "$dir"
    ;;
crash)
    # Immediate shutdown: no checkpoint, recovery from the WAL at the next
    # start, as after a crash.
    dir=${2:?usage: postgres.sh crash DIR}
    as_postgres "$bin/pg_ctl" -D "$dir/data" -m immediate -w stop >/dev/null
    ;;
restart)
    dir=${2:?usage: postgres.sh restart DIR}
    port=$(cat "$dir/port")
    as_postgres "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
        -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c max_connections=200 $(cat "$dir/options")" start >/dev/null ||
        { cat "$dir/server.log" >&2; exit 1; }
    ;;
freeze | thaw)
    dir=${2:?usage: postgres.sh freeze|thaw DIR}
    signal=STOP
    [ "$1" = thaw ] && signal=CONT
    postmaster=$(head -1 "$dir/data/postmaster.pid")
    # The postmaster and every process it started (backends, writers).
    kill -"$signal" "$postmaster" $(pgrep -P "$postmaster" || true)
    ;;
*)
    echo "usage: postgres.sh start | stop DIR | crash DIR | restart DIR | freeze DIR | thaw DIR" >&2
    exit 2
    ;;
esac
