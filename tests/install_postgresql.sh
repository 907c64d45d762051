#!/usr/bin/env bash
# Install Debian's PostgreSQL server for tests/test_gradebook_postgres.py (it starts its own throwaway
# server with initdb/pg_ctl; the packaged service is not used). Safe to run again: does nothing when the
# server binaries are there. Does not stop CI when they cannot be installed: the test then fails there
# (CI=true), quoting build/install/install_postgresql.log, and skips on a contributor's machine, saying why.
set -uo pipefail
source "$(dirname "$0")/apt_install.sh"
install_log install_postgresql
if command -v initdb >/dev/null 2>&1 || compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
    say "the PostgreSQL server binaries are already installed ($(command -v initdb || ls /usr/lib/postgresql/*/bin/initdb | tail -n 1))"
    exit 0
fi
if apt_install "PostgreSQL test" postgresql; then
    if compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
        say "installed $(ls -d /usr/lib/postgresql/*/bin | tail -n 1)"
    else
        say "apt-get installed postgresql but no initdb is under /usr/lib/postgresql (the PostgreSQL test cannot run)"
    fi
fi
exit 0
