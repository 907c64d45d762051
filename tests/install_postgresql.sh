#!/usr/bin/env bash
# Install Debian's PostgreSQL server for tests/test_gradebook_postgres.py (it starts its own throwaway
# server with initdb/pg_ctl; the packaged service is not used). Safe to run again: does nothing when the
# server binaries are there. Never fails the build: without them the test skips and says why.
set -uo pipefail
source "$(dirname "$0")/apt_install.sh"
if command -v initdb >/dev/null 2>&1 || compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
    echo "install_postgresql: the PostgreSQL server binaries are already installed"
    exit 0
fi
if apt_install install_postgresql "PostgreSQL test" postgresql; then
    if compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
        echo "install_postgresql: installed $(ls -d /usr/lib/postgresql/*/bin | tail -n 1)"
    else
        echo "install_postgresql: apt-get installed postgresql but no initdb is under /usr/lib/postgresql: skipping (the PostgreSQL test will skip)"
    fi
fi
exit 0
