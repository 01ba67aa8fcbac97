# syntax=docker/dockerfile:1
# One image for every imgpipe service; the command picks the service:
#   docker run IMAGE gateway | ingest | status | worker      (ENTRYPOINT is `imgpipe serve`)
# Build:  docker build -t imgpipe:dev .
# Kubernetes manifests (deploy/k8s) set `args: [<service>]` on each Deployment.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- builder: resolves and installs every dependency into a virtualenv -----------------------
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src

# Dependencies first, from pyproject.toml alone, so a code change reuses this layer. Every
# dependency ships manylinux wheels for x86_64 and arm64, so this stage needs no compiler; if
# one ever needs building, install build-essential here, never in the final stage.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
 && pip install --prefer-binary -r /tmp/requirements.txt

# Then imgpipe itself, as a regular (not editable) install: the final stage needs no source tree.
COPY README.md ./
COPY services ./services
COPY gateway ./gateway
COPY imgpipe ./imgpipe
RUN pip install --no-deps . \
 && python -m compileall -q /opt/venv/lib

# --- final: the interpreter, the virtualenv, and nothing else --------------------------------
FROM ${PYTHON_IMAGE} AS runtime
# The root filesystem is read-only in Kubernetes: bytecode is compiled at build time above and
# never written at run time; logs are unbuffered JSON lines on stdout.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONFAULTHANDLER=1
RUN groupadd --system --gid 10001 imgpipe \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin imgpipe
COPY --from=builder /opt/venv /opt/venv
WORKDIR /tmp
# Numeric, so Kubernetes can verify runAsNonRoot without reading /etc/passwd.
USER 10001:10001
# gateway HTTP, ingest gRPC, status gRPC, worker gRPC health, Prometheus metrics.
EXPOSE 8080 50051 50052 50061 9464
# `imgpipe serve NAME` execs `python -m <service>`, so the service is PID 1 and gets SIGTERM
# itself: it drains (health NOT_SERVING, in-flight work finishes) within IMGPIPE_GRACE_SECONDS.
ENTRYPOINT ["imgpipe", "serve"]
CMD ["gateway"]
