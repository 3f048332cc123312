# syntax=docker/dockerfile:1
# vvireid query server on an NVIDIA GPU.
#
#   docker build -t vvireid-serve .
#   docker run --gpus all -p 8000:8000 \
#       -v /srv/vvireid/models:/models:ro -v /srv/vvireid/index:/index \
#       -v /srv/vvireid/api.key:/run/secrets/api.key:ro -e VVIREID_API_KEY_FILE=/run/secrets/api.key \
#       vvireid-serve
#
# /models/model.safetensors is the checkpoint, /index the folder written by `vvireid-index build`
# (mount it writable, owned by uid 10001, if gallery writes through the API are enabled). Every
# setting is a VVIREID_* variable or a vvireid-serve flag (see `vvireid-serve --help`).
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
# Base: the pip wheels carry every CUDA user-space library (cudart, cuBLAS, cuDNN), so a plain
# Python image is enough; an nvidia/cuda *-runtime base would duplicate 2-5 GB of the same
# libraries. The NVIDIA_* variables below tell the Container Toolkit to mount the driver.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu129
ARG TORCH_SPEC="torch>=2.8,<2.14"
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/vvireid
ENV PATH=/opt/vvireid/bin:$PATH
RUN pip install --index-url "${TORCH_INDEX}" "${TORCH_SPEC}" torchvision
WORKDIR /src
COPY pyproject.toml README.md ./
# The server never imports training/ (architecture.md), so it stays out of the image.
COPY model ./model
COPY indexer ./indexer
COPY server ./server
RUN pip install . && pip check

FROM ${PYTHON_IMAGE}
ENV PATH=/opt/vvireid/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    VVIREID_CHECKPOINT=/models/model.safetensors \
    VVIREID_INDEX=/index \
    VVIREID_PORT=8000
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin vvireid \
    && mkdir -p /models /index \
    && chown vvireid:vvireid /index
COPY --from=build /opt/vvireid /opt/vvireid
USER vvireid
WORKDIR /home/vvireid
VOLUME ["/models", "/index"]
EXPOSE 8000
# /healthz answers as soon as the process runs; loading the model shows on /readyz instead.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('VVIREID_PORT', '8000'), timeout=4)" || exit 1
CMD ["vvireid-serve", "--host", "0.0.0.0"]
