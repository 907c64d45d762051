#!/usr/bin/env bash
# Install Debian's Chromium for tests/test_browser.py (Playwright drives it through executable_path;
# Playwright's own browser download is not used). Safe to run again: does nothing when it is installed.
# Never fails the build: when Chromium cannot be installed, the browser test skips and says why.
set -uo pipefail
CHROMIUM="${LORAKIT_CHROMIUM:-/usr/bin/chromium}"
if [ -x "$CHROMIUM" ]; then
    echo "install_chromium: $CHROMIUM is already installed ($("$CHROMIUM" --version 2>/dev/null || echo 'version unknown'))"
    exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
        echo "install_chromium: not root and no password-less sudo: skipping (the browser test will skip)"; exit 0
    fi
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_chromium: no apt-get on this machine: skipping (the browser test will skip)"; exit 0
fi
export DEBIAN_FRONTEND=noninteractive
LOG="$(mktemp)"
# fonts: DejaVu for text, Noto Color Emoji for the checks' marks in the screenshots
if { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq --no-install-recommends \
        chromium fonts-dejavu-core fonts-noto-color-emoji; } >"$LOG" 2>&1 && [ -x "$CHROMIUM" ]; then
    echo "install_chromium: installed $("$CHROMIUM" --version 2>/dev/null || echo chromium)"
else
    echo "install_chromium: apt-get could not install chromium: skipping (the browser test will skip). Last lines:"
    tail -n 5 "$LOG"
fi
rm -f "$LOG"
exit 0
