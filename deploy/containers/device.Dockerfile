# Device runtime image: the base install (`pip install .`), no torch, no Flower. Build from the repository root:
#   docker build -f deploy/containers/device.Dockerfile -t fedcam-device .
FROM python:3.11-slim
WORKDIR /tmp/fedcam
COPY pyproject.toml README.md ./
COPY server server
COPY client client
COPY shared shared
RUN pip install --no-cache-dir . && rm -rf /tmp/fedcam
WORKDIR /
ENTRYPOINT ["fedcam-device"]
CMD ["run", "--help"]
