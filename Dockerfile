# syntax=docker/dockerfile:1.7
#
# modelloop model server image: TF Serving API + Open Inference Protocol on
# REST :8501 and gRPC :8500.
#
#   docker build -t modelloop:cpu .
#   docker build --build-arg VARIANT=gpu -t modelloop:gpu .
#
# Both variants run the same relocatable CPython 3.11 (python-build-standalone, installed
# by uv) from /opt/python and the project's virtualenv from /opt/modelloop, so the
# builder's interpreter and the runtime's are the same binary whatever the base image.
# docs/deploy.md says how to build, run and configure it.

ARG VARIANT=cpu
# The CUDA runtime + cuDNN base of the GPU variant; override to match your driver.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04
ARG DEBIAN_IMAGE=debian:bookworm-slim

FROM ghcr.io/astral-sh/uv:0.9.5 AS uv

# ---------------------------------------------------------------------------------------
# builder: Python, then the pinned dependencies and the project into /opt/modelloop.
FROM ${DEBIAN_IMAGE} AS builder
ARG VARIANT
ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_PYTHON_PREFERENCE=only-managed \
    PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=uv /uv /usr/local/bin/uv
RUN uv python install 3.11 \
    && uv venv --seed --python 3.11 /opt/modelloop \
    && /opt/modelloop/bin/python -m pip install --no-cache-dir pip==25.3
WORKDIR /src
COPY pyproject.toml requirements.lock README.md ./
COPY modelloop/ modelloop/
COPY training/ training/
COPY serving/ serving/
COPY export/ export/
COPY monitoring/ monitoring/
COPY control/ control/
# A non-editable install: the runtime image holds no source tree. The lock constrains
# every transitive dependency; the gpu variant adds the [gpu] extra (CUDA and cuDNN
# wheels for onnxruntime-gpu). Bytecode is compiled here, because the runtime's root
# filesystem may be read-only.
RUN --mount=type=cache,target=/root/.cache/pip \
    if [ "$VARIANT" = "gpu" ]; then target=".[gpu,postgres]"; else target=".[postgres]"; fi \
    && /opt/modelloop/bin/python -m pip install -c requirements.lock "$target" \
    && /opt/modelloop/bin/python -m compileall -q /opt/modelloop/lib \
    && /opt/modelloop/bin/modelloop --version

# ---------------------------------------------------------------------------------------
# runtime bases, chosen by VARIANT.
FROM ${DEBIAN_IMAGE} AS runtime-cpu

FROM ${CUDA_IMAGE} AS runtime-gpu
# ONNX Runtime picks CUDA (and TensorRT when present) before the CPU provider.
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# ---------------------------------------------------------------------------------------
# runtime: no compilers, no package manager runs, non-root uid 1000.
# runtime-${VARIANT} names a stage of this file, not a registry image, so there is no tag
# to pin (DL3006).
# hadolint ignore=DL3006
FROM runtime-${VARIANT} AS runtime
ARG VARIANT
LABEL org.opencontainers.image.title="modelloop" \
      org.opencontainers.image.description="Keras model server: TF Serving API + Open Inference Protocol, Prometheus monitoring, retraining loop" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.modelloop.variant="${VARIANT}"

# Everything the process may write lives under /var/lib/modelloop (state: the SQLite
# prediction store, Keras and matplotlib caches) or /tmp; with a read-only root file
# system both are volumes. /models is the model repository: a volume as well, writable
# because a retrain publishes the next version into it.
RUN groupadd --gid 1000 modelloop \
    && useradd --uid 1000 --gid 1000 --home-dir /var/lib/modelloop --no-create-home \
       --shell /usr/sbin/nologin modelloop \
    && mkdir -p /var/lib/modelloop /models \
    && chown 1000:1000 /var/lib/modelloop /models

COPY --from=builder /opt/python /opt/python
COPY --from=builder /opt/modelloop /opt/modelloop

ENV PATH=/opt/modelloop/bin:$PATH \
    HOME=/var/lib/modelloop \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    KERAS_HOME=/var/lib/modelloop/.keras \
    TF_CPP_MIN_LOG_LEVEL=2 \
    MODELLOOP_MONITORING_STATE_DIR=/var/lib/modelloop \
    MODELLOOP_CONTROL_PLANE_URL=in-process
# A container alone watches itself (the control plane in its process); several replicas
# set MODELLOOP_CONTROL_PLANE_URL to a `modelloop monitor` of their own (k8s/overlays/postgres).

USER 1000:1000
WORKDIR /var/lib/modelloop
EXPOSE 8500 8501

# Liveness only (the process answers HTTP); readiness is a separate route that turns off
# while draining. No curl in the image: the standard library does the request.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8501/v2/health/live', timeout=4)"]

# The server drains on SIGTERM (MODELLOOP_GRACE_PERIOD_S, default 20 s); give `docker
# stop` a longer --time than that.
STOPSIGNAL SIGTERM
ENTRYPOINT ["modelloop", "serve", "--repo", "/models", "--host", "0.0.0.0"]
