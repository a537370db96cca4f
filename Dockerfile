# syntax=docker/dockerfile:1
# chat-gateway image: `docker build -t chat-gateway .`, then see docker-compose.yml.
# Base images are pinned by tag; let Renovate or Dependabot bump them (and add digests if you pin those).

FROM ghcr.io/astral-sh/uv:0.13.9 AS uv

FROM python:3.12.12-slim-bookworm AS builder
COPY --from=uv /uv /usr/local/bin/uv
# Use the image's Python, compile bytecode once here, copy (not hard-link) out of the cache mount.
ENV UV_PYTHON_DOWNLOADS=0 \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PROJECT_ENVIRONMENT=/app/.venv
WORKDIR /src

# Dependencies first: this layer is rebuilt only when the lock file changes.
RUN --mount=type=cache,target=/root/.cache/uv \
    --mount=type=bind,source=uv.lock,target=uv.lock \
    --mount=type=bind,source=pyproject.toml,target=pyproject.toml \
    uv sync --frozen --no-dev --no-install-project

COPY pyproject.toml uv.lock README.md LICENSE ./
COPY gateway ./gateway
COPY middleware ./middleware
# Non-editable: the runtime stage needs only the virtualenv, not the source tree.
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-editable


FROM python:3.12.12-slim-bookworm AS runtime
# The embedded PostgreSQL (used only when DATABASE_URL is unset) refuses to run as root,
# and the gateway has no reason to.
RUN groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid gateway --home-dir /var/lib/gateway --create-home gateway
WORKDIR /app
COPY --from=builder /app/.venv /app/.venv

ENV PATH=/app/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    GATEWAY_HOST=0.0.0.0 \
    GATEWAY_PORT=8000 \
    GATEWAY_DATA_DIR=/var/lib/gateway/pgdata

USER 10001:10001
EXPOSE 8000
# No curl in slim images: the standard library does the probe.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('GATEWAY_PORT', '8000'), timeout=2)"]
# Exec form: the gateway is PID 1 and receives SIGTERM itself, then drains for GATEWAY_SHUTDOWN_GRACE.
CMD ["python", "-m", "gateway"]
