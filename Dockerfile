# syntax=docker/dockerfile:1
# offline-exhook: a two-stage build. The builder generates the gRPC modules and installs the
# package into a virtualenv; the final image gets only that virtualenv (no compiler, no
# grpcio-tools, no pip cache) and runs as an unprivileged user. Every pip install is held to
# constraints.txt: the exact versions `make test` passed with.
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY constraints.txt ./
# protoc lives in its own throwaway virtualenv: it never reaches the final image
RUN python -m venv /opt/protoc && /opt/protoc/bin/pip install -c constraints.txt grpcio-tools
COPY pyproject.toml README.md LICENSE ./
COPY protos ./protos
COPY exhook ./exhook
COPY storage ./storage
# the same generation as `make proto` (both packages under exhook/pb/v2 and exhook/pb/v3)
RUN mkdir -p exhook/pb \
    && /opt/protoc/bin/python -m grpc_tools.protoc -Iexhook/pb=protos \
       --python_out=. --grpc_python_out=. protos/v2/exhook.proto protos/v3/exhook.proto
# [fast] adds uvloop
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install -c constraints.txt ".[fast]" \
    && /opt/venv/bin/python -c "import exhook.pb.v2.exhook_pb2_grpc, exhook.pb.v3.exhook_pb2_grpc, exhook.main"

FROM ${PYTHON_IMAGE}
# The data the service writes (the SQLite store, the spool of answered messages the store does
# not have yet) lives in the volume below; the config files read these paths from here.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    OFFLINE_EXHOOK_HEALTH_URL=http://127.0.0.1:9001/healthz \
    OFFLINE_EXHOOK_SQLITE_PATH=/var/lib/offline-exhook/data/offline-messages.sqlite3 \
    OFFLINE_EXHOOK_SPOOL_PATH=/var/lib/offline-exhook/data/spool.sqlite3
RUN groupadd --system --gid 10001 offline-exhook \
    && useradd --system --uid 10001 --gid offline-exhook --no-create-home \
       --home-dir /var/lib/offline-exhook --shell /usr/sbin/nologin offline-exhook \
    && install -d -o offline-exhook -g offline-exhook /var/lib/offline-exhook /var/lib/offline-exhook/data \
    && install -d /etc/offline-exhook
COPY --from=builder /opt/venv /opt/venv
# the shipped config (SQLite in the data volume); compose mounts deploy/ over it
COPY config.hocon /etc/offline-exhook/config.hocon
WORKDIR /var/lib/offline-exhook
USER offline-exhook:offline-exhook
# a container without a volume of its own would lose its store with the container
VOLUME ["/var/lib/offline-exhook/data"]
# 9000: gRPC (ExHook, EMQX connects here); 9001: /healthz, /readyz, /metrics
EXPOSE 9000 9001
# liveness of the process (not of the backend: that is /readyz, which compose asks instead
# through OFFLINE_EXHOOK_HEALTH_URL); slim has no curl
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; url = os.environ.get('OFFLINE_EXHOOK_HEALTH_URL', 'http://127.0.0.1:9001/healthz'); sys.exit(0 if urllib.request.urlopen(url, timeout=2).status == 200 else 1)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["offline-exhook"]
CMD ["--config", "/etc/offline-exhook/config.hocon"]
