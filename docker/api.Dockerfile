# The API, and the one-shot migration (`dare db upgrade`). No GPU here.
FROM python:3.11-slim

# Optional: a PyTorch wheel index for a CPU-only torch (the API process never imports torch, but
# the submit-time inspector it starts as a child process loads the uploads with it; a CPU wheel
# keeps this image small). Empty: the default index.
ARG TORCH_INDEX_URL=""

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    DARE_HOME=/var/lib/dare OMP_NUM_THREADS=1 \
    TORCH_FORCE_WEIGHTS_ONLY_LOAD=1
WORKDIR /app

RUN if [ -n "$TORCH_INDEX_URL" ]; then \
        pip install torch==2.14.1 torchvision==0.29.1 --index-url "$TORCH_INDEX_URL"; fi
COPY pyproject.toml README.md alembic.ini ./
COPY alembic ./alembic
COPY service ./service
COPY worker ./worker
COPY clients/python ./clients/python
RUN pip install -e . ./clients/python

RUN useradd --uid 10001 --create-home dare && mkdir -p /var/lib/dare && chown dare /var/lib/dare
USER dare
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"
CMD ["dare", "api", "--host", "0.0.0.0", "--port", "8000"]
