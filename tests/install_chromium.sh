#!/usr/bin/env bash
# Install Debian's Chromium for tests/test_browser.py (Playwright drives it through executable_path;
# Playwright's own browser download is not used). Safe to run again: does nothing when it is installed.
# Does not stop CI when Chromium cannot be installed: the browser test then fails there (CI=true), quoting
# build/install/install_chromium.log, and skips on a contributor's machine, saying why.
set -uo pipefail
source "$(dirname "$0")/apt_install.sh"
install_log install_chromium
CHROMIUM="${LORAKIT_CHROMIUM:-/usr/bin/chromium}"
if [ -x "$CHROMIUM" ]; then
    say "$CHROMIUM is already installed ($("$CHROMIUM" --version 2>/dev/null || echo 'version unknown'))"
    exit 0
fi
# fonts: DejaVu for text, Noto Color Emoji for the checks' marks in the screenshots
if apt_install "browser test" chromium fonts-dejavu-core fonts-noto-color-emoji; then
    if [ -x "$CHROMIUM" ]; then
        say "installed $("$CHROMIUM" --version 2>/dev/null || echo chromium)"
    else
        say "apt-get installed chromium but $CHROMIUM is not there (the browser test cannot run)"
    fi
fi
exit 0
