# A camera's SuperNode for federated fine-tuning (needs torch + Ultralytics + Flower). Build from the repo root:
#   docker build -f deploy/containers/supernode.Dockerfile -t fedcam-supernode .
FROM python:3.11-slim
WORKDIR /opt/fedcam
COPY . .
# x86: --build-arg TORCH_INDEX=<PyTorch's CPU-only wheel index> takes torch's CPU-only builds (they satisfy the
# same pins), without ~3 GB of CUDA libraries (deploy/README.md, "What a device installs").
ARG TORCH_INDEX=""
RUN pip install --no-cache-dir -e '.[full]' ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"}
ENV FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 YOLO_OFFLINE=1
ENTRYPOINT ["/opt/fedcam/deploy/supernode.sh"]
