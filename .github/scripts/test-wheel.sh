#!/usr/bin/env bash
# test-wheel.sh WHEEL_DIR PYTHON [PYTEST_ARGS...]
#
# The release workflow's test of a built wheel: a fresh virtual environment made by PYTHON gets
# the memgauge wheel from WHEEL_DIR that fits it (pip chooses by tag; none fitting is an error)
# and the test extra (or, when MEMGAUGE_REQUIREMENTS is set, those packages instead, for
# platforms where an extra has no wheel); memgauge must then import from that environment, not
# from the source tree; then pytest runs from the repository root with PYTEST_ARGS.
# tests/test_wheel.py runs it on `make wheel`'s wheel.
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 WHEEL_DIR PYTHON [PYTEST_ARGS...]" >&2; exit 2; }
wheels=$(cd "$1" && pwd)
python=$2
shift 2
root=$(cd "$(dirname "$0")/../.." && pwd)

venv="$(mktemp -d)/venv"
"$python" -m venv "$venv"
if [ -d "$venv/Scripts" ]; then bin="$venv/Scripts"; else bin="$venv/bin"; fi
py="$bin/python"

# The wheel first, from WHEEL_DIR alone, so that no index's memgauge can stand in for it.
"$py" -m pip install --quiet --disable-pip-version-check --no-index --find-links "$wheels" memgauge
if [ -n "${MEMGAUGE_REQUIREMENTS:-}" ]; then
  # shellcheck disable=SC2086 # a list of requirements
  "$py" -m pip install --quiet --disable-pip-version-check $MEMGAUGE_REQUIREMENTS
else
  "$py" -m pip install --quiet --disable-pip-version-check --find-links "$wheels" "memgauge[test]"
fi

cd "$root"
"$py" - <<'PY'
import os
import sys

import memgauge

where = os.path.realpath(memgauge.__file__)
assert where.startswith(os.path.realpath(sys.prefix)), f"memgauge imported from {where}"
print(f"memgauge {memgauge.__version__} from {where}")
PY
# The environment's commands (memgauge) first on PATH, as an activated environment has them.
PATH="$bin:$PATH" "$py" -m pytest "$@"
