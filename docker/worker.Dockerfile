# A GPU worker: one Celery process, one task at a time (-c 1), on the `gpu` queue.
# torch's wheels bring their own CUDA libraries; the CUDA base image supplies the runtime
# environment the NVIDIA container toolkit expects (driver >= the image's CUDA version).
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-base-ubuntu24.04
FROM ${CUDA_IMAGE}

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
       dataset-fashion-mnist \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    DARE_HOME=/var/lib/dare TORCH_FORCE_WEIGHTS_ONLY_LOAD=1
WORKDIR /app

COPY pyproject.toml README.md alembic.ini ./
COPY alembic ./alembic
COPY service ./service
COPY worker ./worker
COPY clients/python ./clients/python
# The mlflow extra lets DARE_MLFLOW_TRACKING_URI log each finished job as a run; build with
# --build-arg EXTRAS= for a smaller image without it.
ARG EXTRAS=mlflow
RUN pip install -e ".${EXTRAS:+[$EXTRAS]}" ./clients/python

RUN useradd --uid 10001 --create-home dare && mkdir -p /var/lib/dare && chown dare /var/lib/dare
USER dare
# The same command the tests run (service.cli.main.worker_argv).
CMD ["celery", "-A", "worker.celery_app", "worker", "-Q", "gpu", "-c", "1", "--loglevel", "INFO", \
     "--without-mingle", "--without-gossip"]
