# A camera's SuperNode for federated fine-tuning (needs torch + Ultralytics + Flower). Build from the repo root:
#   docker build -f deploy/containers/supernode.Dockerfile -t fedcam-supernode .
FROM python:3.11-slim
WORKDIR /opt/fedcam
COPY . .
RUN pip install --no-cache-dir -e .  # pins torch==2.14.1; point pip at a CPU-only wheel index to keep the image small
ENV FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 YOLO_OFFLINE=1
ENTRYPOINT ["/opt/fedcam/deploy/supernode.sh"]
