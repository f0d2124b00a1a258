#!/usr/bin/env bash
# Installs lucidlm and its test references into the current Python (3.11+) environment.
# torch is pinned first: on the CPU machines this project is built on, `torch==2.13.0` resolves to
# a local CPU wheel, while an unpinned `torch` would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
python -m pip install --quiet --disable-pip-version-check -e ".[test]"
