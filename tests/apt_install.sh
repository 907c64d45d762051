# Sourced by tests/install_*.sh: apt_install TAG TEST PACKAGE... installs Debian packages for a test that
# skips without them. Returns 0 when apt-get installed them; otherwise prints why (not root and no
# password-less sudo, no apt-get, or apt-get's last lines) and returns 1. Never exits the caller.
apt_install() {
    local tag="$1" test="$2" sudo="" log
    shift 2
    if [ "$(id -u)" != 0 ]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo -n"; else
            echo "$tag: not root and no password-less sudo: skipping (the $test will skip)"; return 1
        fi
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "$tag: no apt-get on this machine: skipping (the $test will skip)"; return 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    log="$(mktemp)"
    if { $sudo apt-get update -qq && $sudo apt-get install -y -qq --no-install-recommends "$@"; } >"$log" 2>&1; then
        rm -f "$log"; return 0
    fi
    echo "$tag: apt-get could not install $*: skipping (the $test will skip). Last lines:"
    tail -n 5 "$log"
    rm -f "$log"
    return 1
}
