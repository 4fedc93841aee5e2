# syntax=docker/dockerfile:1
# dashscope-proxy container image.
#
#   docker build -t dashscope-proxy .
#   docker run --rm -p 8080:8080 -v "$PWD/config:/etc/dashscope-proxy:ro" \
#       -e DASHSCOPE_API_KEY -e TEAM_A_KEY dashscope-proxy
#   docker run --rm -p 8080:8080 dashscope-proxy demo --host 0.0.0.0   # no account needed
#
# Two stages: everything is installed into a virtualenv in the build stage and
# only that virtualenv is copied into a fresh slim image, so the final image
# has no compiler, no pip cache and no source tree. aiohttp, uvloop, orjson,
# PyYAML and redis all ship manylinux wheels for amd64 and arm64, so the build
# stage needs no compiler either; add `build-essential` there (never in the
# final stage) if you build for a platform without wheels.

ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
# [fast]: uvloop + orjson (roughly halve the per-request CPU); [redis]: the shared state backend.
# pip compiles the bytecode at install time; pip itself is not needed at run time.
RUN /opt/venv/bin/pip install ".[fast,redis]" \
 && /opt/venv/bin/pip uninstall --yes pip

FROM python:${PYTHON_VERSION}-slim
LABEL org.opencontainers.image.title="dashscope-proxy" \
      org.opencontainers.image.description="Drop-in gateway for Alibaba Cloud DashScope image generation" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/dashscope-proxy/dashscope-proxy"
# A fixed numeric uid/gid so Kubernetes `runAsNonRoot` can verify it and
# volume ownership (fsGroup) is predictable.
RUN groupadd --system --gid 10001 dashscope \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin dashscope \
 && mkdir -p /etc/dashscope-proxy /var/lib/dashscope-proxy \
 && chown 10001:10001 /var/lib/dashscope-proxy
COPY --from=build /opt/venv /opt/venv
# PYTHONUNBUFFERED: access lines reach `docker logs` / kubectl logs as they happen.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DASHSCOPE_PROXY_CONFIG=/etc/dashscope-proxy/config.yaml
# The default state.path (./dashscope-proxy-state.db) lands here; mount a
# volume to keep task ownership across container restarts.
WORKDIR /var/lib/dashscope-proxy
USER 10001:10001
EXPOSE 8080
# /healthz answers while the process is alive; it assumes server.port 8080.
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status == 200 else 1)"]
# Exec form: the gateway is PID 1 and receives SIGTERM (drain) and SIGHUP
# (reload) itself; a shell in between would swallow them.
STOPSIGNAL SIGTERM
ENTRYPOINT ["dashscope-proxy"]
# The config path comes from DASHSCOPE_PROXY_CONFIG; pass other arguments
# (`demo --host 0.0.0.0`, `check-config PATH`) to run another command.
CMD []
