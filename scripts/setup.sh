#!/usr/bin/env bash
# Installs lucidlm and its test references into the current Python (3.11+) environment.
# torch is pinned first: on the CPU machines this project is built on, `torch==2.13.0` resolves to
# a local CPU wheel, while an unpinned `torch` would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
python -m pip install --quiet --disable-pip-version-check -e ".[test]"
# The web page's browser test drives Debian's Chromium (never `playwright install`, which downloads a browser)
if ! command -v chromium > /dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get > /dev/null; then
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) > /dev/null \
            || echo "setup: could not install chromium; the browser test will fail until it is installed" >&2
    else
        echo "setup: no chromium (sudo apt-get install chromium); the browser test will fail until it is installed" >&2
    fi
fi
