# Device runtime image: no torch, no Flower. Build from the repository root:
#   docker build -f deploy/containers/device.Dockerfile -t fedcam-device .
FROM python:3.11-slim
WORKDIR /opt/fedcam
COPY client/runtime/requirements.txt /tmp/requirements.txt
RUN pip install --no-cache-dir -r /tmp/requirements.txt
# Only the runtime and the snapshot format travel; PYTHONPATH instead of installing the whole project.
COPY client/__init__.py client/__init__.py
COPY client/runtime client/runtime
COPY shared/__init__.py shared/env.py shared/snapshot_format.py shared/
ENV PYTHONPATH=/opt/fedcam
ENTRYPOINT ["python", "-m", "client.runtime.cli"]
CMD ["run", "--help"]
