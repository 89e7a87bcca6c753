#!/usr/bin/env bash
# The test command (README.md, .ci/run): installs everything the tests need on a
# Debian machine (apt packages, a venv with the project and its test extra), runs
# the linters and the whole suite. `bash tests/run.sh fast` runs the unit tier only.
set -euo pipefail
cd "$(dirname "$0")/.."
tier="${1:-all}"

# Debian packages the rig drives: the CNCF distribution registry, a Docker engine,
# podman and skopeo as further loaders, htpasswd, a static busybox for runnable
# test images, umoci for the benchmark image, chromium for the route-builder test,
# redis-server for the store's shared state.
apt_packages=(docker-registry docker.io podman skopeo apache2-utils busybox-static umoci
              zstd uidmap iproute2 python3 python3-venv chromium chromium-driver redis-server)
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
.venv/bin/pip install -q --upgrade pip >/dev/null
.venv/bin/pip install -q -e '.[test]'

.venv/bin/ruff check .
.venv/bin/mypy
set +e
if [ "$tier" = fast ]; then
  .venv/bin/pytest -m "not rig" "${@:2}"
else
  .venv/bin/pytest "${@:2}"
fi
rc=$?
set -e
# pytest exits 5 when it ran no test: that must fail, never pass.
[ $rc -eq 5 ] && echo "pytest ran no test" >&2
exit $rc
