#!/usr/bin/env bash
# Install Debian's Chromium and its matching ChromeDriver for the dashboard's browser test.
#
# Idempotent: does nothing when /usr/bin/chromium and /usr/bin/chromedriver are already there.
# Uses only Debian's packages (never a browser download of its own), so the driver always
# matches the browser's version. Needs root (CI and the dev machines run as root).
set -euo pipefail

if [[ -x /usr/bin/chromium && -x /usr/bin/chromedriver ]]; then
    echo "install-browser: chromium and chromedriver already installed"
    exit 0
fi

if [[ "$(id -u)" != "0" ]]; then
    echo "install-browser: must run as root to apt-get install chromium chromium-driver" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
# One update, then the install; apt's lock is waited for rather than failed on, since another
# installer (a parallel test session) may hold it for a moment.
apt-get -o DPkg::Lock::Timeout=300 update
apt-get -o DPkg::Lock::Timeout=300 install -y --no-install-recommends chromium chromium-driver

if [[ ! -x /usr/bin/chromium || ! -x /usr/bin/chromedriver ]]; then
    echo "install-browser: chromium or chromedriver still missing after apt-get install" >&2
    exit 1
fi
/usr/bin/chromium --version || true
/usr/bin/chromedriver --version || true
