# Sourced by tests/install_*.sh, which install Debian packages for a test of a real component (Chromium,
# PostgreSQL). `install_log TAG` starts build/install/TAG.log; `say MESSAGE` prints a line and keeps it there.
# `apt_install TEST PACKAGE...` returns 0 when apt-get installed them; otherwise it says why (not root and no
# password-less sudo, no apt-get, or apt-get's last lines) and returns 1. Never exits the caller: the scripts
# do not stop CI. The test then cannot run: it skips on a contributor's machine and fails in CI (CI=true),
# quoting the end of this log (tests/conftest.py).
install_log() {
    TAG="$1"
    LOG="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/build/install/$TAG.log"
    mkdir -p "$(dirname "$LOG")"
    : >"$LOG"
}

say() {
    echo "$TAG: $*" | tee -a "$LOG"
}

apt_install() {
    local test="$1" sudo=""
    shift
    if [ "$(id -u)" != 0 ]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo -n"; else
            say "not root and no password-less sudo: not installed (the $test cannot run)"; return 1
        fi
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        say "no apt-get on this machine: not installed (the $test cannot run)"; return 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    if { $sudo apt-get update -qq && $sudo apt-get install -y -qq --no-install-recommends "$@"; } >>"$LOG" 2>&1; then
        return 0
    fi
    say "apt-get could not install $* (the $test cannot run). Last lines:"
    tail -n 5 "$LOG"
    return 1
}
