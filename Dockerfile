# syntax=docker/dockerfile:1
# wildrydes-stream: Kinesis `wildrydes-aggregated` -> DynamoDB `UnicornSensorData`.
#
#   buildah bud -t wildrydes-stream:0.1.0 .     (or: make image; docker build works the same)
#
# Two stages: the builder installs the package and its dependencies (all from wheels, uvloop
# included) into a virtual environment; the final stage copies only that environment onto a
# clean slim image: no compilers, no pip cache, no sources, and a non-root user.

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /build
COPY pyproject.toml README.md ./
COPY src ./src
# The versions are pinned in pyproject.toml (aiobotocore exactly); uvloop comes with it on Linux.
RUN pip install --no-cache-dir . \
    && python -c "import uvloop, wildrydes_stream"

FROM ${PYTHON_IMAGE}
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="wildrydes-stream" \
      org.opencontainers.image.description="Copies Wild Rydes unicorn aggregates from the Kinesis stream wildrydes-aggregated into the DynamoDB table UnicornSensorData" \
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
ENTRYPOINT ["python", "-m", "wildrydes_stream", "run"]
