#!/usr/bin/env bash
# Install Debian's Chromium for tests/test_browser.py (Playwright drives it through executable_path;
# Playwright's own browser download is not used). Safe to run again: does nothing when it is installed.
# Never fails the build: when Chromium cannot be installed, the browser test skips and says why.
set -uo pipefail
source "$(dirname "$0")/apt_install.sh"
CHROMIUM="${LORAKIT_CHROMIUM:-/usr/bin/chromium}"
if [ -x "$CHROMIUM" ]; then
    echo "install_chromium: $CHROMIUM is already installed ($("$CHROMIUM" --version 2>/dev/null || echo 'version unknown'))"
    exit 0
fi
# fonts: DejaVu for text, Noto Color Emoji for the checks' marks in the screenshots
if apt_install install_chromium "browser test" chromium fonts-dejavu-core fonts-noto-color-emoji; then
    if [ -x "$CHROMIUM" ]; then
        echo "install_chromium: installed $("$CHROMIUM" --version 2>/dev/null || echo chromium)"
    else
        echo "install_chromium: apt-get installed chromium but $CHROMIUM is not there: skipping (the browser test will skip)"
    fi
fi
exit 0
