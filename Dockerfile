# quantd: the GPU quantization service.
#   docker build -t quantd:0.1.0 .
#   docker run --gpus all -p 50051:50051 -p 9090:9090 quantd:0.1.0 [--flags of `quantd serve`]
# Settings come from QUANTD_* variables (see README, "Deployment") or flags after the image name.
# torch, triton and CUDA come with the base image; quantd's wheel adds grpcio & co. on top.
ARG BASE_IMAGE=pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime

# --- build: the quantd wheel; the source tree and the build tools stay in this stage ---------------------------
FROM ${BASE_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY kernels/ kernels/
COPY server/ server/
COPY protocol/ protocol/
COPY client/ client/
COPY cli/ cli/
RUN python -m pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# --- runtime ----------------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE}
# Triton compiles a small C launcher on first use of each kernel: it needs a C compiler and libc headers at run
# time. Their exact revisions follow the base image's Ubuntu release (security updates replace them), so they are
# not pinned.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 quantd \
    && useradd --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin quantd \
    && mkdir -p /checkpoints \
    && chown 10001:10001 /checkpoints

COPY --from=build /wheels /wheels
# pip keeps the base image's torch and triton (they satisfy quantd's requirements) and adds the rest.
RUN python -m pip install --no-cache-dir /wheels/*.whl \
    && rm -rf /wheels

ENV PYTHONUNBUFFERED=1 \
    QUANTD_HOST=0.0.0.0 \
    QUANTD_PORT=50051 \
    QUANTD_LOG_FORMAT=json \
    TRITON_CACHE_DIR=/home/quantd/.triton/cache
# numeric, so Kubernetes' runAsNonRoot can verify it
USER 10001:10001
WORKDIR /home/quantd
VOLUME ["/checkpoints"]
# gRPC; Prometheus metrics when QUANTD_METRICS_PORT=9090 is set
EXPOSE 50051 9090
# The gRPC health service (no token needed); with TLS set QUANTD_HEALTHCHECK_CA_FILE (and _CERT_FILE/_KEY_FILE).
HEALTHCHECK --interval=15s --timeout=10s --start-period=60s --retries=3 \
    CMD ["python", "-m", "quantd.server.healthcheck"]
ENTRYPOINT ["quantd", "serve"]
