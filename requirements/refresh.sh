#!/usr/bin/env bash
# Regenerates the lock files from the project's own metadata, nothing else:
#   requirements/test.txt     setup.cfg install_requires + the [test] extra
#   requirements/runtime.txt  setup.cfg install_requires
# each plus pyproject.toml's [build-system] requires (setuptools, wheel), so that
# `pip install --no-build-isolation` of the project needs nothing more. Every pin
# carries the hash of every file PyPI has for that version (all platforms' wheels
# and the sdist), resolved for Python 3.11 on any platform (--universal): one lock
# serves the amd64 and arm64 images and a Debian 12 host alike.
#
# runtime.txt is resolved under test.txt as constraints, so a package in both has
# the same version in both (tests/unit/test_lock.py checks this).
#
# Pins already in the files are kept while setup.cfg still allows them; pass
# --upgrade (or --upgrade-package NAME) to move to the newest allowed versions.
# uv runs from a throwaway venv and is pinned, so a refresh is repeatable.
set -euo pipefail
cd "$(dirname "$0")/.."

uv_version=0.13.9
python=${PYTHON:-python3}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$python" -m venv "$tmp/venv"
"$tmp/venv/bin/pip" install -q --disable-pip-version-check "uv==$uv_version"

"$python" - >"$tmp/build-system.in" <<'PY'
import tomllib
with open("pyproject.toml", "rb") as f:
    print("\n".join(tomllib.load(f)["build-system"]["requires"]))
PY

compile() {
  local out=$1
  shift
  "$tmp/venv/bin/uv" pip compile --quiet --universal --python-version 3.11 \
    --generate-hashes --custom-compile-command "requirements/refresh.sh" \
    --no-config \
    setup.cfg "$tmp/build-system.in" "$@" -o "$out"
  # The build-system list lives in a temp file; name its real source instead.
  sed -i "s|-r $tmp/build-system.in|pyproject.toml [build-system] requires|" "$out"
}

compile requirements/test.txt --extra test "$@"
compile requirements/runtime.txt --constraint requirements/test.txt "$@"
