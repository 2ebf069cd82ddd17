# The image the Kubernetes jobs run (README, "Launching with TorchX"): `make image IMAGE=REGISTRY/NAME:TAG`.
# The training stack of `MULTIHASH_TORCH_VARIANT=cuda scripts/bootstrap.sh` (tests/launch/test_launch.py checks the
# pins agree): torch and the CUDA fbgemm-gpu, requirements/base.txt with torch named again so nothing
# moves it, torchrec with --no-deps (its requirements would pull the newest fbgemm-gpu), then this
# package with --no-deps. Not the submitting side (torchx, kubernetes, matplotlib: requirements/tools.txt).
#
# CUDA: torch 2.13's PyPI wheels are built for CUDA 13 and bring their CUDA libraries (cuDNN, cuBLAS,
# the CUDA runtime fbgemm-gpu 1.8 loads, libcudart.so.13) as pip packages, so the base is a plain
# Python image; the node's driver must support CUDA 13 (NVIDIA driver 580 or newer), and the NVIDIA
# device plugin mounts it into the pod. The jobs run as an unprivileged user (uid 1000): give volumes
# the pod writes to (--output_volume) an fsGroup or ownership that lets uid 1000 write.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG FBGEMM_VERSION=1.8.0
ARG TORCHREC_VERSION=1.8.0

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

# A virtualenv first on PATH: the `torchrun` of the component's command (launch/components.py) is its own.
ENV VIRTUAL_ENV=/opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN python3.11 -m venv /opt/venv && python -m pip install -q --upgrade pip

# The jobs' working directory: configs/ are read from here; --data_volume is mounted at data/ and
# --output_volume at runs/ (launch/components.py: IMAGE_WORKDIR).
WORKDIR /workspace

# Dependencies first, so editing the sources does not reinstall them.
COPY requirements/base.txt requirements/base.txt
RUN pip install "torch==${TORCH_VERSION}" "fbgemm-gpu==${FBGEMM_VERSION}" \
 && pip install -r requirements/base.txt "torch==${TORCH_VERSION}" \
 && pip install --no-deps "torchrec==${TORCHREC_VERSION}"

COPY . .
RUN pip install --no-deps . \
 && python -c "import torch; assert torch.__version__.startswith('${TORCH_VERSION}'), torch.__version__" \
 && useradd --uid 1000 --create-home --shell /usr/sbin/nologin trainer \
 && mkdir -p runs data && chown -R trainer /workspace/runs

USER trainer
CMD ["torchrec-multihash", "--help"]
