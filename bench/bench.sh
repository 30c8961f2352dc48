#!/usr/bin/env bash
# One command for the peer benchmark: a fresh virtualenv (bench/.venv) with ppq
# from this checkout and its peers, then bench/run.py with the arguments given.
#   bash bench/bench.sh              # full run: 3 rounds, medians and ratios
#   bash bench/bench.sh --quick      # about two minutes, 1 round
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x bench/.venv/bin/python ]; then
  python3 -m venv bench/.venv
fi
. bench/.venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet -e . -r bench/requirements.txt
# pip byte-compiles the peers as it installs them, but not an editable install: without
# this, and with PYTHONDONTWRITEBYTECODE set, every ppq process would compile ppq first.
python -m compileall -q ppq
exec python bench/run.py "$@"
