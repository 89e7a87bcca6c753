#!/usr/bin/env bash
# The test command (README.md, .ci/run): installs everything the tests need on a
# Debian machine (apt packages, a venv with the project and its locked test extra), runs
# the linters and the whole suite. `bash tests/run.sh fast` runs the unit tier only.
set -euo pipefail
cd "$(dirname "$0")/.."
tier="${1:-all}"

# Debian packages the rig drives: the CNCF distribution registry, a Docker engine,
# podman and skopeo as further loaders, htpasswd, a static busybox for runnable
# test images, umoci for the benchmark image, chromium for the route-builder test,
# redis-server for the store's shared state, prometheus for `promtool check rules` of
# the chart's alert rules.
apt_packages=(docker-registry docker.io podman skopeo apache2-utils busybox-static umoci
              zstd uidmap iproute2 python3 python3-venv chromium chromium-driver redis-server
              prometheus)
if [ "$tier" = all ]; then
  missing=()
  for p in "${apt_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
fi

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
# requirements/test.txt (requirements/refresh.sh makes it from setup.cfg) pins every
# package, setuptools and wheel included, with hashes: pip resolves nothing (--no-deps),
# builds in this venv (--no-build-isolation), so any pip does, Debian 12's 23.0 too.
.venv/bin/pip install -q --require-hashes --no-deps -r requirements/test.txt
.venv/bin/pip install -q --no-deps --no-build-isolation -e .
.venv/bin/pip check >/dev/null

.venv/bin/ruff check .
.venv/bin/mypy
# The wings import downward only (the layers contract in pyproject.toml).
.venv/bin/lint-imports --no-cache
set +e
if [ "$tier" = fast ]; then
  .venv/bin/pytest -m "not rig" "${@:2}"
else
  # The e2e modules mostly wait (on dockerd, registries, timeouts), so whole modules run
  # side by side (pytest-xdist, --dist loadfile keeps a module's servers in one worker,
  # and each worker starts its own session rig on its own ports and temp dirs).
  # PYTEST_WORKERS=0 runs everything in this one process.
  workers=${PYTEST_WORKERS:-3}
  if [ "$workers" = 0 ]; then
    .venv/bin/pytest "${@:2}"
  else
    .venv/bin/pytest -n "$workers" --dist loadfile "${@:2}"
  fi
fi
rc=$?
set -e
# pytest exits 5 when it ran no test: that must fail, never pass.
[ $rc -eq 5 ] && echo "pytest ran no test" >&2
exit $rc
