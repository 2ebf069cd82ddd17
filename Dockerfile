# The CUDA image the Kubernetes jobs run (README, "Launching with TorchX"): `make image IMAGE=REGISTRY/NAME:TAG`.
# The same stack as `MULTIHASH_TORCH_VARIANT=cuda scripts/bootstrap.sh` (tests/test_launch.py checks the
# pins agree): torch and the CUDA fbgemm-gpu, requirements/base.txt with torch named again so nothing
# moves it, torchrec with --no-deps (its requirements would pull the newest fbgemm-gpu), then this
# package with --no-deps. The PyPI torch wheel brings its own CUDA libraries; the base image gives
# CUDA/cuDNN system libraries and the driver compatibility layer.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04
FROM ${CUDA_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG FBGEMM_VERSION=1.8.0
ARG TORCHREC_VERSION=1.8.0

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

# Python 3.11 (deadsnakes: Ubuntu 22.04's own python3 is 3.10)
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates software-properties-common gpg-agent \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3.11-dev \
 && rm -rf /var/lib/apt/lists/*

# A virtualenv first on PATH: the `torchrun` of the component's command (launch/components.py) is its own.
ENV VIRTUAL_ENV=/opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN python3.11 -m venv /opt/venv && python -m pip install -q --upgrade pip

# The jobs' working directory: configs/ are read from here; --data_volume is mounted at data/ and
# --output_volume at runs/ (launch/components.py: IMAGE_WORKDIR).
WORKDIR /workspace

# Dependencies first, so editing the sources does not reinstall them.
COPY requirements/ requirements/
RUN pip install "torch==${TORCH_VERSION}" "fbgemm-gpu==${FBGEMM_VERSION}" \
 && pip install -r requirements/base.txt "torch==${TORCH_VERSION}" \
 && pip install --no-deps "torchrec==${TORCHREC_VERSION}"

COPY . .
RUN pip install --no-deps . \
 && python -c "import torch; assert torch.__version__.startswith('${TORCH_VERSION}'), torch.__version__"

CMD ["torchrec-multihash", "--help"]
