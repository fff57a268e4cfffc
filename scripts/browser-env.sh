#!/usr/bin/env bash
# Sets up what the console's browser test (tests/console.rs) needs, when missing:
#   - Debian's chromium (/usr/bin/chromium), installed with apt,
#   - playwright-core from the npm registry, at the version tests/browser's lock file
#     pins, installed with `npm ci` into tests/browser/node_modules (no browser
#     download: the test drives the system Chromium).
# Needs Node.js 18 or newer with npm. Safe to run again: it does nothing when all is there.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"

if [ ! -x /usr/bin/chromium ] && [ -z "${CHROMIUM:-}" ]; then
    echo "installing: chromium (Debian)" >&2
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
fi

if ! command -v npm >/dev/null 2>&1; then
    echo "error: npm not found; install Node.js 18 or newer (Debian: apt-get install nodejs npm)" >&2
    exit 1
fi
DIR="$REPO/tests/browser"
STAMP="$DIR/node_modules/.lock-stamp"
# npm ci again only when the lock file changed since the last install.
if [ ! -f "$STAMP" ] || ! cmp -s "$DIR/package-lock.json" "$STAMP"; then
    echo "installing: tests/browser (npm ci)" >&2
    (cd "$DIR" && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --loglevel=error >&2)
    cp "$DIR/package-lock.json" "$STAMP"
fi
