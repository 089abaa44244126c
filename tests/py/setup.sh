#!/usr/bin/env bash
# Creates the Python environment the end-to-end tests use to talk to a node
# with independent clients: OpenAI's own `openai` package (PyPI), pinned, in
# a venv under the workspace's target dir. Idempotent; .ci/run calls it, and
# the test calls it when the venv is missing.
#   bash tests/py/setup.sh [VENV_DIR]
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
venv=${1:-$here/../../target/py-clients}
version=3.57.0
if [ -x "$venv/bin/pip" ] && "$venv/bin/pip" show openai 2>/dev/null | grep -qx "Version: $version"; then
  exit 0
fi
command -v python3 >/dev/null || { echo "python3 not found: apt-get install python3 python3-venv" >&2; exit 1; }
python3 -m venv "$venv" || { echo "cannot create a venv at $venv: apt-get install python3-venv" >&2; exit 1; }
"$venv/bin/pip" install --quiet --disable-pip-version-check "openai==$version" \
  || { echo "pip could not install openai==$version from PyPI into $venv" >&2; exit 1; }
echo "openai $version ready in $venv" >&2
