# wildrydes-stream: the Wild Rydes services (`run`, `aggregate`) and their admin commands.
#
#   make image        (buildah, then scripts/check-image.py on the result)
#   buildah bud -t wildrydes-stream:0.1.0 --build-arg REVISION=$(git rev-parse HEAD) .
#                     (docker build works the same)
#
# Two stages: the builder installs the locked dependencies (requirements.lock: every version
# pinned, every file's hash checked, all from wheels, uvloop included) and then the package
# into a virtual environment that has neither pip nor setuptools; the final stage copies only
# that environment onto a clean slim image: no compilers, no pip cache, no sources, and a
# non-root user. The entrypoint is the CLI: `run` by default, any other command as arguments
# (`docker run IMAGE aggregate`, `... status`, Kubernetes `args: [aggregate]`).

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1
# No pip, no setuptools in the environment that ships: the builder's own pip installs into it.
RUN python -m venv --without-pip /opt/venv
WORKDIR /build
# The dependencies in a layer of their own: a change to the source alone reuses it.
COPY requirements.lock requirements-build.lock ./
RUN pip --python /opt/venv/bin/python install --require-hashes --no-deps --only-binary=:all: \
        -r requirements.lock \
    && pip install --require-hashes --no-deps -r requirements-build.lock
COPY pyproject.toml README.md ./
COPY src ./src
# The package alone (its dependencies are in already), built with the locked setuptools.
RUN pip wheel --no-deps --no-build-isolation --wheel-dir /wheels . \
    && pip --python /opt/venv/bin/python install --no-deps /wheels/*.whl \
    && /opt/venv/bin/python -c "import uvloop, wildrydes_stream" \
    && /opt/venv/bin/python -c "import importlib.util as u, sys; \
sys.exit(any(u.find_spec(m) for m in ('pip', 'setuptools')))"

FROM ${PYTHON_IMAGE}
# An ARG before the first FROM is out of scope after it: declared again to be read here.
ARG PYTHON_IMAGE
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="wildrydes-stream" \
      org.opencontainers.image.description="Wild Rydes unicorn pipeline: aggregates raw readings (aggregate) and copies the aggregates from Kinesis into the DynamoDB table UnicornSensorData (run)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"

# A fixed numeric uid/gid, so the pod's runAsUser/runAsNonRoot can be checked against it.
RUN groupadd --system --gid 10001 wildrydes \
    && useradd --system --uid 10001 --gid wildrydes --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin wildrydes \
    && install -d -o wildrydes -g wildrydes -m 0750 /var/lib/wildrydes-stream

COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    WILDRYDES_DEADLETTER_FILE=/var/lib/wildrydes-stream/deadletter.jsonl \
    WILDRYDES_HTTP_PORT=8080 \
    WILDRYDES_REVISION=${REVISION}

# The dead-letter file lives here; on Kubernetes an emptyDir is mounted over it, so the root
# filesystem can stay read-only.
WORKDIR /var/lib/wildrydes-stream
USER 10001:10001
# /metrics, /healthz, /readyz
EXPOSE 8080
# Exec form: python is PID 1 and receives SIGTERM itself; the service handles it (drain,
# checkpoint, release leases, exit 0), so no init shim is needed.
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "-m", "wildrydes_stream"]
CMD ["run"]
