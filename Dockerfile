# qtulu for cloud GPUs.
#   docker build -t qtulu .
#   docker run --gpus all -v hf-cache:/data/hf -v "$PWD/runs:/workspace/runs" qtulu train --size 7b --mix human+gpt
# The PyTorch devel image brings CUDA, cuDNN, nvcc and a CUDA build of torch, so flash-attn (the
# `flash` extra) compiles against the torch that is already there.
FROM pytorch/pytorch:2.9.1-cuda12.8-cudnn9-devel

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MAX_JOBS=8 \
    HF_HOME=/data/hf \
    QTULU_HOME=/data/qtulu

WORKDIR /opt/qtulu
COPY pyproject.toml README.md ./
COPY qtulu ./qtulu
COPY kernels ./kernels
COPY configs ./configs
COPY benchmarks ./benchmarks

# flash-attn builds against the image's torch, hence no build isolation for the package install.
# DL3013 (pin pip versions) cannot apply to ".": the project itself, from the build context.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir packaging==25.0 ninja==1.13.0 psutil==7.1.3 \
    && pip install --no-cache-dir --no-build-isolation ".[flash]" \
    && qtulu --version

RUN useradd --create-home --uid 1000 qtulu \
    && mkdir -p /data/hf /data/qtulu /workspace/runs \
    && chown -R qtulu:qtulu /data /workspace

USER 1000:1000
WORKDIR /workspace
VOLUME ["/data", "/workspace/runs"]
ENTRYPOINT ["qtulu"]
CMD ["--help"]
