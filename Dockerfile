# CPU serving image for a classforge run directory: REST API + web UI (`classforge serve`).
#
# UNTESTED: written where no Docker engine runs; the commands inside are the ones the tests run natively.
#
# Build from the committed sources only (keeps .venv, data and runs out of the build context):
#   git archive --format=tar HEAD | docker build -t classforge-serve -
# Run a trained (and preferably exported: `classforge export RUN`) run directory, mounted read-only:
#   docker run --rm -p 127.0.0.1:8000:8000 -v "$PWD/runs/my-run:/model:ro" classforge-serve
# then http://127.0.0.1:8000/ (UI), /docs (API). Inside the container the server must bind 0.0.0.0 to be
# reachable through the published port; `-p 127.0.0.1:8000:8000` keeps it on the host's loopback.
# Extra flags go after the image name, e.g. `... classforge-serve --max-upload-mb 5 --no-ui`.

FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    GRADIO_ANALYTICS_ENABLED=False \
    HF_HUB_DISABLE_TELEMETRY=1 \
    HF_HUB_OFFLINE=1 \
    CLASSFORGE_OFFLINE=1

# libsndfile ships inside the soundfile wheel; libgomp is needed by torch/onnxruntime wheels on slim images.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# CPU-only torch first (the default PyPI wheel is the much larger CUDA build).
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch>=2.3" "torchvision>=0.18"
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install ".[serve,audio]"

RUN useradd --create-home --uid 10001 classforge
USER classforge
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s \
    CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health').status != 200)"

ENTRYPOINT ["classforge", "serve", "/model", "--host", "0.0.0.0", "--port", "8000"]
