# SuperLink / ServerApp / dashboard image (CPU torch). Build from the repository root:
#   docker build -f deploy/containers/server.Dockerfile -t fedcam-server .
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends openssl openssh-client && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/fedcam
COPY . .
# x86: --build-arg TORCH_INDEX=<PyTorch's CPU-only wheel index> takes torch's CPU-only builds (they satisfy the
# same pins), without ~3 GB of CUDA libraries (deploy/README.md, "What a device installs").
ARG TORCH_INDEX=""
RUN pip install --no-cache-dir -e '.[full]' ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"}
ENV FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 YOLO_OFFLINE=1
EXPOSE 9091 8080
ENTRYPOINT ["/opt/fedcam/deploy/superlink.sh", "/etc/fedcam/pki", "9091", "/var/lib/fedcam", "0.0.0.0"]
