# syntax=docker/dockerfile:1.7
# sdserve on a CUDA runtime: the image of every pod of the RayService (head, GPU workers, the
# autoscaler sidecar and the helm test pod).
#
#   docker build -t sdserve:0.1.0 .
#   docker build -t sdserve:0.1.0-sd2 --build-arg BAKE_MODEL_ID=stable-diffusion-2 \
#       --build-context weights=/path/to/stable-diffusion-2 .      # weights inside the image
#   docker run --rm sdserve:0.1.0 sdserve tiny-model /home/ray/models/tiny-sd2
#
# Versions that must agree (tests/deploy/test_dockerfile.py checks them):
# - torch 2.13.0 from PyPI is built against CUDA 13.0 (its wheel requires
#   cuda-toolkit==13.0.3 and ships the CUDA libraries), so the base is a CUDA 13.0 runtime;
#   the node's driver must support CUDA 13.0 (R580 or newer).
# - Ray comes from constraints.txt (ray==2.60.0), the RayService's rayVersion.
# - Python 3.11, like the project (requires-python).

ARG CUDA_BASE=nvidia/cuda:13.0.1-runtime-ubuntu24.04
ARG UV_VERSION=0.13.8

# uv only fetches a standalone CPython 3.11 (Ubuntu 24.04 ships 3.12); pip installs the rest.
FROM ghcr.io/astral-sh/uv:${UV_VERSION} AS uv

# The weights to bake in, if any: replaced by `--build-context weights=DIR`. The default holds
# only a marker file, so a plain build bakes nothing.
FROM scratch AS weights
COPY .dockerignore /.no-weights

FROM ${CUDA_BASE} AS runtime
LABEL org.opencontainers.image.title="sdserve" \
      org.opencontainers.image.description="Stable Diffusion 2.0 text-to-image, ModelsLab API, on Ray Serve" \
      org.opencontainers.image.version="0.1.0"

ARG TORCH_SPEC=torch==2.13.0
ARG PYTHON_VERSION=3.11
ARG PIP_VERSION=26.3
# Set to a model id (a folder name under /home/ray/models) to bake the `weights` context in.
ARG BAKE_MODEL_ID=""
# Set to 1 to bake the tiny random-weight demo model (it draws noise; smoke runs only).
ARG BAKE_TINY_MODEL=0

# RAY_SERVE_*: Ray's high-throughput Serve mode, as `sdserve serve` runs it (RAY_ENV in
# service/serving/app.py; tests/deploy checks the two agree).
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    UV_PYTHON_INSTALL_DIR=/opt/python \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HF_HUB_OFFLINE=1 \
    RAY_USAGE_STATS_ENABLED=0 \
    RAY_SERVE_THROUGHPUT_OPTIMIZED=1 \
    RAY_SERVE_ENABLE_HA_PROXY=1 \
    RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE=1

# bash, wget and grep: KubeRay runs `ray start` under `/bin/bash -lc` and its Serve readiness
# probe on workers is `bash -c "wget ... /-/healthz | grep success"`. gcc and libc6-dev: Triton
# (the GroupNorm+SiLU kernel, Inductor's kernels) builds its small CUDA launcher modules with a
# C compiler on first use, and a CUDA runtime image has none. Ubuntu's archive moves patch
# versions, so they are not pinned (the base image tag is).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends bash ca-certificates gcc grep libc6-dev tini wget \
    && rm -rf /var/lib/apt/lists/* \
    && gcc --version

# The `ray` user (uid 1000, gid 100) of Ray's own images; Ubuntu's `ubuntu` user holds uid 1000.
RUN (userdel --remove ubuntu 2>/dev/null || true) \
    && useradd --create-home --uid 1000 --gid 100 --shell /bin/bash ray

# A login shell (KubeRay's `bash -lc`) must still find the venv first: the profile line is
# written literally, $PATH expands when the shell starts.
# hadolint ignore=SC2016
RUN --mount=type=bind,from=uv,source=/uv,target=/usr/local/bin/uv \
    uv python install "${PYTHON_VERSION}" \
    && uv venv --seed --python "${PYTHON_VERSION}" /opt/venv \
    && /opt/venv/bin/python -m pip install --quiet "pip==${PIP_VERSION}" \
    && echo 'export PATH=/opt/venv/bin:$PATH' > /etc/profile.d/sdserve.sh

WORKDIR /opt/sdserve
# torch first (the CUDA build of the Makefile's TORCH_SPEC), then the project with every
# transitive package pinned by constraints.txt, plus s3fs for an S3 image store.
COPY constraints.txt ./
RUN python -m pip install -c constraints.txt "${TORCH_SPEC}"
COPY pyproject.toml README.md serve_config.yaml ./
COPY service ./service
# (-I: the check imports the installed package, not ./service.)
RUN python -m pip install -c constraints.txt ".[s3]" \
    && python -I -c "import ray, torch, service.serving.app; assert ray.__version__ == '2.60.0'"

RUN --mount=type=bind,from=weights,target=/tmp/weights \
    mkdir -p /home/ray/models /home/ray/data \
    && if [ -n "${BAKE_MODEL_ID}" ]; then \
         test -f /tmp/weights/model_index.json \
           || { echo "BAKE_MODEL_ID needs --build-context weights=DIR (a diffusers folder)"; exit 1; }; \
         mkdir -p "/home/ray/models/${BAKE_MODEL_ID}" \
           && cp -a /tmp/weights/. "/home/ray/models/${BAKE_MODEL_ID}/"; \
       fi \
    && if [ "${BAKE_TINY_MODEL}" = "1" ]; then sdserve tiny-model /home/ray/models/tiny-sd2; fi \
    && chown -R ray:users /home/ray

USER 1000:100
WORKDIR /home/ray
# Serve (KubeRay's serve-svc), Ray's metrics export (PodMonitor), dashboard, GCS, client.
EXPOSE 8000 8080 8265 6379 10001
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["sdserve", "serve", "--config", "/opt/sdserve/serve_config.yaml", "--host", "0.0.0.0"]
