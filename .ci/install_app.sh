#!/usr/bin/env bash
# CI: the optional app's dependencies (requirements-app.txt) in the venv given as $1 (default
# ~/.venvs/iidm), and a system Chromium for its browser test. Playwright drives that Chromium
# (found on PATH as chromium or chromium-browser); no browser is downloaded. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${1:-$HOME/.venvs/iidm}"
[ -x "$VENV/bin/pip" ] || { echo "install_app: no venv at $VENV (run .ci/run or create it first)"; exit 1; }
"$VENV/bin/pip" install --disable-pip-version-check -q -r requirements.txt -r requirements-test.txt -r requirements-app.txt
"$VENV/bin/pip" list --disable-pip-version-check 2>/dev/null | grep -iE '^(gradio|playwright|numpy|pillow) '

find_chromium() { command -v chromium || command -v chromium-browser || true; }
if [ -z "$(find_chromium)" ]; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get -y -qq install chromium
fi
CHROMIUM="$(find_chromium)"
[ -n "$CHROMIUM" ] || { echo "install_app: chromium is still missing after apt-get"; exit 1; }
echo "install_app: $("$CHROMIUM" --version 2>/dev/null | head -1) at $CHROMIUM"
"$VENV/bin/python" -c "import gradio, playwright; print('install_app: gradio', gradio.__version__)"
