# SuperLink / ServerApp / dashboard image (CPU torch). Build from the repository root:
#   docker build -f deploy/containers/server.Dockerfile -t fedcam-server .
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends openssl openssh-client && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/fedcam
COPY . .
RUN pip install --no-cache-dir -e .  # pins torch==2.14.1; point pip at a CPU-only wheel index to keep the image small
ENV FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 YOLO_OFFLINE=1
EXPOSE 9091 8080
ENTRYPOINT ["/opt/fedcam/deploy/superlink.sh", "/etc/fedcam/pki", "9091", "/var/lib/fedcam", "0.0.0.0"]
