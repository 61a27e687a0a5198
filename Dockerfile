# One image, two commands: `llmq-gateway` (default) and `llmq-worker`.
# Build from the repository root: docker build -t llmq .   (compose does this for you)
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --system --uid 10001 --user-group --no-create-home llmq
WORKDIR /app

# Dependencies come from the project's own pyproject.toml; the package index is the only
# network access the build needs. The wheel holds the `llmq` package only.
COPY pyproject.toml README.md ./
COPY llmq ./llmq
RUN pip install --no-cache-dir . && rm -rf /app/llmq && python -c "import llmq.gateway, llmq.worker"

USER llmq
WORKDIR /home/llmq
EXPOSE 8080 9100

# The gateway's readiness (Redis answers and a worker reports a ready engine). The worker
# service in compose overrides this with a check of its metrics port.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/health', timeout=2)"]

CMD ["llmq-gateway"]
