# The serverless image: runpod-worker, its document parser, libtorch and the CUDA libraries of
# the PyPI torch wheel. No CUDA base image: the wheel brings the CUDA runtime; the host brings
# the NVIDIA driver (580 or newer, for CUDA 13).
#
#   podman build --format docker -t runpod-worker .        (docker build works the same)
#   --build-arg MODELS=baked    bake the models into the image instead of reading them from
#                               the network volume (/runpod-volume/models)
#   --build-arg CUDA_EXTRAS="cudnn linalg nvrtc profiler nvshmem"   the groups of on-demand
#                               CUDA libraries kept (image/cuda-extras.txt). The default keeps
#                               them all until a card's `gpu-check` has shown which the shipped
#                               handlers never load; CUDA_EXTRAS="" is the slim image (about
#                               0.8 GB smaller). A model with convolutions needs cudnn, linear
#                               algebra (torch.linalg) linalg, runtime-compiled kernels nvrtc.
#   --build-arg BUILDER_IMAGE=... / RUNTIME_IMAGE=...   other bases (make image-test uses
#                               local ones built without a registry)
ARG BUILDER_IMAGE=docker.io/library/rust:1.89-slim-bookworm
ARG RUNTIME_IMAGE=docker.io/library/debian:bookworm-slim

FROM ${BUILDER_IMAGE} AS builder
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends binutils ca-certificates g++ make python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /build
COPY . .
ARG MODELS=volume
# `make build` installs the pinned Python side (torch==2.11.0), exports the models and builds
# the release binaries. Only libtorch and the wheel's CUDA libraries go on, side by side as in
# the wheel (libtorch finds them by relative path), and the models when baked; the build
# outputs are removed in the same step so the builder layer stays small. The disk a build
# needs at its peak is kept down too: pip keeps no cache of the 3 GB of wheels, and the
# libraries are moved out of the venv, not copied.
RUN PIP_NO_CACHE_DIR=1 make build \
    && mkdir -p /stage/bin /stage/site-packages/torch /stage/models \
    && cp target/release/runpod-worker target/release/runpod-worker-torch target/release/runpod-parse /stage/bin/ \
    && strip /stage/bin/* \
    && mv .venv/lib/python3*/site-packages/torch/lib /stage/site-packages/torch/ \
    && mv .venv/lib/python3*/site-packages/nvidia /stage/site-packages/ \
    && if [ "${MODELS}" = baked ]; then cp -a handler/models/. /stage/models/; fi \
    && rm -rf target .venv /root/.cargo/registry /root/.cache

# The libraries the image ships: what nothing can load is left out, and the on-demand groups
# not named in CUDA_EXTRAS (a layer of its own, so changing the groups rebuilds nothing else).
FROM builder AS libraries
ARG CUDA_EXTRAS="cudnn linalg nvrtc profiler nvshmem"
COPY image/prune-libs.sh image/cuda-extras.txt /prune/
RUN /prune/prune-libs.sh /stage/site-packages /prune/cuda-extras.txt "${CUDA_EXTRAS}"

FROM ${RUNTIME_IMAGE}
ARG MODELS=volume
# `utility` makes NVML visible (GPU memory, processes); `compute` is CUDA.
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    LD_LIBRARY_PATH=/opt/runpod-worker/site-packages/torch/lib \
    RUNPOD_WORKER_CONFIG=/etc/runpod-worker/runpod-${MODELS}.toml
# A non-root user; on a network volume it needs to write the spool (uid 10001).
RUN groupadd --system --gid 10001 runpod \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/runpod runpod \
    && mkdir -p /runpod-volume/spool \
    && chown -R 10001:10001 /runpod-volume
COPY --from=libraries /stage/site-packages /opt/runpod-worker/site-packages
COPY --from=builder /stage/bin/ /usr/local/bin/
COPY --from=builder /stage/models /opt/runpod-worker/models
COPY image/runpod-volume.toml image/runpod-baked.toml /etc/runpod-worker/
# The seed's profiles (the Hub listing's presets choose one with RUNPOD_WORKER_CONFIG).
COPY config/ /etc/runpod-worker/profiles/
USER 10001:10001
WORKDIR /home/runpod
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s CMD ["runpod-worker", "health"]
ENTRYPOINT ["runpod-worker", "serve"]
