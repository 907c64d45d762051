#!/usr/bin/env bash
# Install Debian's PostgreSQL server for tests/test_gradebook_postgres.py (it starts its own throwaway
# server with initdb/pg_ctl; the packaged service is not used). Safe to run again: does nothing when the
# server binaries are there. Never fails the build: without them the test skips and says why.
set -uo pipefail
if command -v initdb >/dev/null 2>&1 || compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
    echo "install_postgresql: the PostgreSQL server binaries are already installed"
    exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
        echo "install_postgresql: not root and no password-less sudo: skipping (the PostgreSQL test will skip)"; exit 0
    fi
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_postgresql: no apt-get on this machine: skipping (the PostgreSQL test will skip)"; exit 0
fi
export DEBIAN_FRONTEND=noninteractive
LOG="$(mktemp)"
if { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq --no-install-recommends postgresql; } >"$LOG" 2>&1 \
        && compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
    echo "install_postgresql: installed $(ls -d /usr/lib/postgresql/*/bin | tail -n 1)"
else
    echo "install_postgresql: apt-get could not install postgresql: skipping (the PostgreSQL test will skip). Last lines:"
    tail -n 5 "$LOG"
fi
rm -f "$LOG"
exit 0
