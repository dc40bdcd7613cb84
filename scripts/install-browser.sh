#!/usr/bin/env bash
# Debian's chromium + chromedriver for the web UI tests (a test tool's own browser download fails offline).
set -euo pipefail
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then exit 0; fi
if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
echo "== setup: installing chromium and chromium-driver from Debian"
$SUDO apt-get update -qq >/dev/null || true
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null || {
  echo "warning: could not install chromium; `make test` will fail its web UI tests (a bare pytest skips them)" >&2; }
