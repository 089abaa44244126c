#!/usr/bin/env bash
# Creates the Python environment the engine's cross-check tests use:
# llama.cpp's own gguf-py (package `gguf` on PyPI), pinned, in a venv under
# the workspace's target dir. Idempotent; .ci/run calls it, and the test calls
# it when the venv is missing.
#   bash node/engine/tests/py/setup.sh [VENV_DIR]
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
venv=${1:-$here/../../../../target/py-venv}
want="gguf==0.19.0"
if [ -x "$venv/bin/pip" ] && "$venv/bin/pip" show gguf 2>/dev/null | grep -qx 'Version: 0.19.0'; then
  exit 0
fi
command -v python3 >/dev/null || { echo "python3 not found: apt-get install python3 python3-venv" >&2; exit 1; }
python3 -m venv "$venv" || { echo "cannot create a venv at $venv: apt-get install python3-venv" >&2; exit 1; }
"$venv/bin/pip" install --quiet --disable-pip-version-check "$want" \
  || { echo "pip could not install $want from PyPI into $venv" >&2; exit 1; }
echo "gguf-py ready in $venv" >&2
