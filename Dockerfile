# syntax=docker/dockerfile:1
# vvireid query server on an NVIDIA GPU.
#
#   docker build -t vvireid-serve .
#   docker run --gpus all -p 8000:8000 \
#       -v /srv/vvireid/models:/models:ro -v /srv/vvireid/index:/index \
#       -v /srv/vvireid/api.key:/run/secrets/api.key:ro -e VVIREID_API_KEY_FILE=/run/secrets/api.key \
#       vvireid-serve
#
# /models/model.safetensors is the checkpoint, /index the folder written by `vvireid-index build`.
# The server runs as uid 10001. Everything vvireid writes honours the umask (0644 files under the
# usual 022), so that user can read a model written by anyone; the gallery is a SQLite database
# whose -wal/-shm files live beside it, so /index must be writable by the container's user: run
# with `--user "$(id -u):$(id -g)"` as the index's owner (README), or `chown -R 10001` the folder.
# Every setting is a VVIREID_* variable or a vvireid-serve flag (see `vvireid-serve --help`).
#
# CUDA: one major version, 12, in the whole image. The FAISS GPU wheel the project depends on
# (faiss-gpu 1.15.1) is a CUDA 12 build that loads the nvidia-*-cu12 runtime wheels, whereas PyPI's
# default torch wheel is a CUDA 13 build; installed together they would put two CUDA runtimes and
# two cuBLAS copies in one process (workable in principle, unverified, and ~1 GB heavier). So torch
# and torchvision come from PyTorch's cu129 index first, and `pip install .` then finds them
# satisfied and adds faiss-gpu, whose cu12 runtime requirements the torch wheels already meet.
# (The CUDA 13 alternative is torch from PyPI + faiss-gpu-cuvs; it needs the faiss requirement in
# pyproject.toml changed.) Host requirement: an NVIDIA driver that runs CUDA 12 programs (R525 or
# newer, through CUDA minor-version compatibility) and the NVIDIA Container Toolkit.
#
# Base: NVIDIA's CUDA 12.9 runtime image (Ubuntu 24.04, Python 3.12 from apt). The torch and FAISS
# wheels also carry their own CUDA user-space libraries, so a plain Python image would work too and
# be ~2 GB smaller: build with --build-arg BASE_IMAGE=python:3.12-slim-bookworm for that.
# NVIDIA_REQUIRE_CUDA is relaxed to what the wheels need (any CUDA 12 driver, through minor-version
# compatibility) instead of the image's own "cuda>=12.9" driver check.

ARG BASE_IMAGE=nvidia/cuda:12.9.1-runtime-ubuntu24.04

FROM ${BASE_IMAGE} AS build
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu129
ARG TORCH_SPEC="torch>=2.8,<2.14"
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive
# The CUDA image has no Python: install Ubuntu's (a python:* base already has one). Its version is
# the base image's, hence no apt pin.
# hadolint ignore=DL3008
RUN (python3 -m venv --help >/dev/null 2>&1 || (apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*)) \
    && python3 -m venv /opt/vvireid
ENV PATH=/opt/vvireid/bin:$PATH
# torchvision is resolved to the build that matches the torch picked by TORCH_SPEC.
# hadolint ignore=DL3013
RUN pip install --index-url "${TORCH_INDEX}" "${TORCH_SPEC}" torchvision
WORKDIR /src
COPY pyproject.toml README.md ./
COPY model ./model
COPY indexer ./indexer
COPY server ./server
# training/ is copied only because pyproject.toml lists its packages (setuptools refuses a listed
# package whose folder is missing); the server never imports it (lint-imports checks that).
COPY training ./training
# Only what serving needs: the `serve` extra (FastAPI, uvicorn, FAISS), not the `train` extra
# (tensorboard, PyYAML) nor `export`/`milvus`. The commands those extras back are removed from
# the image so that none of its entry points is dead: vvireid-serve and vvireid-index remain.
RUN pip install '.[serve]' \
    && pip check \
    && rm -f /opt/vvireid/bin/vvireid-train /opt/vvireid/bin/vvireid-export

FROM ${BASE_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN (command -v python3 >/dev/null || (apt-get update \
        && apt-get install -y --no-install-recommends python3 \
        && rm -rf /var/lib/apt/lists/*)) \
    && useradd --create-home --uid 10001 --shell /usr/sbin/nologin vvireid \
    && mkdir -p /models /index \
    && chown vvireid:vvireid /index
ENV PATH=/opt/vvireid/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    NVIDIA_REQUIRE_CUDA="cuda>=12.0" \
    VVIREID_CHECKPOINT=/models/model.safetensors \
    VVIREID_INDEX=/index \
    VVIREID_PORT=8000
COPY --from=build /opt/vvireid /opt/vvireid
USER 10001
WORKDIR /home/vvireid
VOLUME ["/models", "/index"]
EXPOSE 8000
# /healthz answers as soon as the process runs; loading the model shows on /readyz instead.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('VVIREID_PORT', '8000'), timeout=4)"]
CMD ["vvireid-serve", "--host", "0.0.0.0"]
