# syntax=docker/dockerfile:1
#
# passthrough: any registry image as one `docker save` tar over a plain HTTP GET.
#
#   docker build -t passthrough .
#   docker buildx build --platform linux/amd64,linux/arm64 -t REGISTRY/passthrough:TAG --push .
#
# Two stages: the first builds a virtualenv with the package and its dependencies,
# the second copies that venv into a clean slim Python of the same version. Nothing
# here is specific to one CPU architecture: every dependency ships manylinux wheels
# for x86_64 and aarch64, so no compiler is needed in either stage, and the lock
# (requirements/runtime.txt) holds the hashes of both architectures' wheels.

ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
# The lock pins every package (setuptools and wheel too) with hashes: pip resolves
# nothing (--no-deps) and refuses any file whose hash is not in it. The dependencies
# get their own layer, so a code change reuses it; the cache mount keeps the wheels
# for a lock change without leaving a pip cache in any layer.
COPY requirements/runtime.txt ./requirements/
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --require-hashes --no-deps -r requirements/runtime.txt
COPY pyproject.toml setup.cfg ./
COPY passthrough ./passthrough
# --no-build-isolation: built with the locked setuptools and wheel, nothing fetched.
RUN pip install --no-cache-dir --no-deps --no-build-isolation . \
    && pip check \
    && passthrough --help >/dev/null


FROM python:${PYTHON_VERSION}-slim AS runtime

LABEL org.opencontainers.image.title="passthrough" \
      org.opencontainers.image.description="Container registry images as docker-save tar archives over one HTTP GET" \
      org.opencontainers.image.licenses="Apache-2.0"

# The account (uid/gid 10001) exists so tools that look the user up work. The cache
# and TLS directories exist, owned by it, so a fresh named volume mounted there
# inherits that owner (the TLS one 0700: TLS_SELF_SIGNED's keys are private). Temp
# files go to /var/tmp (TEMP_DIR): world-writable in the base image, and compose and
# the Helm chart mount a volume there.
RUN groupadd --gid 10001 passthrough \
    && useradd --uid 10001 --gid 10001 \
       --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin passthrough \
    && mkdir -p /var/cache/passthrough /var/lib/passthrough/tls \
    && chown 10001:10001 /var/cache/passthrough /var/lib/passthrough/tls \
    && chmod 0700 /var/lib/passthrough/tls

COPY --from=builder /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TEMP_DIR=/var/tmp \
    CACHE_DIR=/var/cache/passthrough \
    PORT=8080

# The content store (CACHE_DIR; CACHE_MAX_BYTES caps it, 20G by default): a volume, so
# `docker run` without -v keeps it out of the container's writable layer, and a named
# volume or a bind mount keeps it across containers. STORE=s3 leaves it unused.
VOLUME ["/var/cache/passthrough"]

WORKDIR /app
COPY gunicorn.conf.py ./

# Numeric, not a name: Kubernetes runAsNonRoot can only verify a numeric USER.
USER 10001:10001

# 8080: downloads and /v2; 8081: the probe port (HEALTH_BIND), /health, /ready and
# /metrics only, served by a process of its own.
EXPOSE 8080 8081

# `passthrough healthcheck` probes /health on HEALTH_BIND's port (127.0.0.1), with the
# stdlib: the image has no curl. With HEALTH_BIND=off it probes $PORT; keep PORT in step
# with BIND when you move that port.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["passthrough", "healthcheck"]

# Exec form: gunicorn is PID 1 and gets SIGTERM itself, so in-flight downloads get
# GRACEFUL_TIMEOUT (120 s) to finish. Stop timeouts must be longer than that.
CMD ["gunicorn", "-c", "gunicorn.conf.py"]
