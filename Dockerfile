# syntax=docker/dockerfile:1
# The bot's image: one for the replicas, the retry worker, the upstream stub and the alert sink
# (`bot serve|worker`, `python -m infra.stub`, `python -m infra.alertsink serve`), plus two targets built from the same
# layers: `exporters` (Debian's NGINX/Redis exporters and mtail, the binaries `make up` runs)
# and `loadtest` (locust). compose.yaml builds all three; docs/containers.md explains them.

# Pinned to a patch release of the slim (Debian bookworm) official image, as Debian 12 hosts
# `make up`; bump it deliberately (and its digest, if you pin one: `python:...@sha256:...`).
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# ---------------------------------------------------------------- build: the virtualenv
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /app
RUN python -m venv /opt/venv
# Dependencies first, from the project's pins, in a layer of their own: a code change does not
# reinstall them. Every one has a wheel for this platform, so no compiler is needed.
COPY pyproject.toml constraints.txt README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
    && /opt/venv/bin/pip install --no-cache-dir -c constraints.txt -r /tmp/requirements.txt
COPY bot ./bot
COPY infra ./infra
# served at GET /v1/openapi.json (bot/api/docs.py reads it beside the package)
COPY docs/openapi.yaml ./docs/openapi.yaml
# Editable: the code stays in /app, where infra.runner finds the repo's config folders
# (compose mounts nginx/, prometheus/ and alertmanager/ beside it).
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps -e .

FROM build AS build-load
RUN /opt/venv/bin/pip install --no-cache-dir -c constraints.txt -e '.[load]'

# ---------------------------------------------------------------- base: the runtime user
FROM ${PYTHON_IMAGE} AS base
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# A fixed uid, so volume ownership is the same on every build; /srv/bot-config is where the
# compose `config` service writes the rendered config (a named volume takes its owner).
RUN groupadd --system --gid 10001 bot \
    && useradd --system --uid 10001 --gid bot --home-dir /app --no-create-home \
        --shell /usr/sbin/nologin bot \
    && install -d -o bot -g bot /srv/bot-config
WORKDIR /app

# ---------------------------------------------------------------- exporters
FROM base AS exporters
# Debian's packages, as `make up` installs them: the same binaries and flags in both stacks.
# Not version-pinned: bookworm only takes security fixes, and a point release drops the old
# versions from the mirror, which would break every pinned build.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        prometheus-nginx-exporter prometheus-redis-exporter mtail \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/venv /opt/venv
COPY --from=build /app /app
USER 10001:10001
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-m", "infra.containers", "probe", "http://127.0.0.1:9196/metrics"]

# ---------------------------------------------------------------- loadtest (locust)
FROM base AS loadtest
COPY --from=build-load /opt/venv /opt/venv
COPY --from=build-load /app /app
COPY loadtests ./loadtests
RUN install -d -o bot -g bot /app/reports
USER 10001:10001
# Healthy while the target it loads (NGINX, on the loopback it shares) answers.
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-m", "infra.containers", "probe", "http://127.0.0.1:8080/healthz"]
ENTRYPOINT ["python", "-m", "loadtests.run"]
CMD ["steady"]

# ---------------------------------------------------------------- runtime (the default target)
FROM base AS runtime
COPY --from=build /opt/venv /opt/venv
COPY --from=build /app /app
USER 10001:10001
EXPOSE 8001 9101
# Liveness of replica 1 (the default command); compose gives each service its own URL.
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["python", "-m", "infra.containers", "probe", "http://127.0.0.1:8001/healthz"]
ENTRYPOINT ["bot"]
CMD ["serve", "--replica", "1", "--host", "0.0.0.0"]
