#!/bin/sh
# The official postgres image's start-up, reduced to what a test server needs: initialise an
# empty PGDATA with POSTGRES_USER (default postgres) and POSTGRES_PASSWORD, create POSTGRES_DB
# if it is another name, then exec the command (arguments starting with "-" go to postgres).
set -eu
case "${1:-}" in -*) set -- postgres "$@" ;; esac
initialise=no
if [ "${1:-}" = postgres ] && [ ! -s "$PGDATA/PG_VERSION" ]; then
    initialise=yes
    # A question to the binary (postgres --version) starts no server: nothing to initialise.
    for argument in "$@"; do
        case "$argument" in -V | --version | --help | "-?" | -C | --describe-config) initialise=no ;; esac
    done
fi
if [ "$initialise" = yes ]; then
    : "${POSTGRES_PASSWORD:?POSTGRES_PASSWORD must be set (the superuser password)}"
    user="${POSTGRES_USER:-postgres}"
    pwfile="$(mktemp)"
    printf '%s\n' "$POSTGRES_PASSWORD" > "$pwfile"
    initdb --pgdata="$PGDATA" --username="$user" --pwfile="$pwfile" --encoding=UTF8 \
        --locale=C.UTF-8 --auth-local=trust --auth-host=scram-sha-256 >/dev/null
    rm -f "$pwfile"
    database="${POSTGRES_DB:-$user}"
    if [ "$database" != postgres ]; then
        printf 'CREATE DATABASE "%s";\n' "$database" \
            | postgres --single -j -D "$PGDATA" postgres >/dev/null
    fi
fi
exec "$@"
