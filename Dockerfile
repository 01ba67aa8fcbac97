# syntax=docker/dockerfile:1
# One image for every imgpipe service; the command picks the service:
#   docker run IMAGE gateway | ingest | status | worker      (ENTRYPOINT is `imgpipe serve`)
# Build:  make image      (docs/containers.md). It first builds build/wheelhouse on the host
# from requirements/runtime.txt, so nothing in this build asks a package index.
# Kubernetes manifests (deploy/k8s) set `args: [<service>]` on each Deployment.

# Any image with Python 3.11 and `python -m venv`. The public one by default; where no
# container registry is reachable, `make image` passes Debian's Python on a base made with
# mmdebstrap (scripts/podman.py python-base).
ARG BASE=python:3.11-slim-bookworm
# The final stage's base: BASE unless given. It needs the same Python 3.11 (the virtualenv
# links to it) and nothing to build with: `make image` passes Debian's Python on Debian's
# Essential packages alone, without apt, ensurepip or binutils (scripts/podman.py
# python-runtime; docs/containers.md has the sizes).
ARG RUNTIME_BASE=${BASE}

# --- builder: installs the locked dependencies and imgpipe into a virtualenv -----------------
FROM ${BASE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# Dependencies first, in a layer of their own that a code change reuses: the wheels of the
# lock, checked against its hashes, and no index. Every one is a wheel, so no compiler.
COPY build/wheelhouse/deps /wheels/deps
RUN pip install --no-index --find-links /wheels/deps --require-hashes \
      -r /wheels/deps/runtime.txt

# Then imgpipe itself, the wheel built on the host: the final stage needs no source tree.
COPY build/wheelhouse/app /wheels/app
RUN pip install --no-index --no-deps /wheels/app/*.whl \
 && pip uninstall --yes pip setuptools

# What only building or testing a package uses never runs in a service: the packages' tests,
# C headers and sources, Cython sources, type stubs, and numpy's build tools (f2py, distutils).
# Then the debug symbols of the extension modules (about 20 MB), when the builder has binutils
# (`make image`'s does): only of those auditwheel left alone (no RPATH, not in a *.libs
# folder), since stripping a library patchelf rewrote can break it ("ELF load command
# address/offset not page-aligned" from numpy's OpenBLAS). `make image` then loads every
# extension module and bundled library in the final image (scripts/containers/check_image.py).
# Bytecode of what is left: pip compiled it, compileall makes sure.
RUN site=/opt/venv/lib/python3.11/site-packages \
 && find "$site" -depth -type d -name tests -exec rm -rf {} + \
 && rm -rf "$site/numpy/f2py" "$site/numpy/distutils" "$site/numpy/_core/include" \
      /opt/venv/bin/f2py \
 && find "$site" -type f \( -name '*.h' -o -name '*.c' -o -name '*.cpp' -o -name '*.pyx' \
      -o -name '*.pxd' -o -name '*.pxi' -o -name '*.pyi' \) -delete \
 && if command -v strip >/dev/null && command -v readelf >/dev/null; then \
      find "$site" -name '*.so' -not -path '*.libs/*' -exec sh -c \
        'readelf --dynamic "$1" | grep -q -E "RPATH|RUNPATH" || strip --strip-unneeded "$1"' \
        strip-unpatched {} \; ; \
    fi \
 && python -m compileall -q /opt/venv/lib

# --- final: the interpreter, the virtualenv, and nothing else --------------------------------
FROM ${RUNTIME_BASE} AS runtime
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
