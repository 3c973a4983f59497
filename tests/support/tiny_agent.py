"""A real device agent on a tiny Llama, for end-to-end tests: a "codes" dataset, a sensor trace
that always allows training, and a job spec small enough for two CPU cores."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.agent import Agent, AgentConfig
from agent.gate import Gate, GatePolicy
from agent.sensors import TraceSensors
from pocketlora.tls import TlsConfig
from protos.pocketlora.v1 import types_pb2 as tpb
from tests.support.tiny_models import make_tiny_llama

BASE_MODEL_ID = "tiny-llama"


def codes_spec(**overrides: Any) -> tpb.TrainingSpec:
    """A job on the "codes" dataset that teaches the tiny model one answer."""
    fields: dict[str, Any] = {
        "adapter_name": "codes",
        "base_model_id": BASE_MODEL_ID,
        "dataset": "codes",
        "learning_rate": 5e-3,
        "max_steps": 6,
        "max_seq_len": 64,
        "seed": 3,
        "lora": tpb.LoraSettings(rank=8, alpha=16, dropout=0.0),
    }
    return tpb.TrainingSpec(**{**fields, **overrides})


def tiny_agent(
    address: str,
    tmp: Path,
    device_id: str,
    enrollment_token: str,
    listener: Callable[[str, dict[str, Any]], None] | None = None,
    tls: TlsConfig | None = None,
    store_tls: TlsConfig | None = None,
) -> tuple[Agent, AgentConfig]:
    """An Agent (not started) with a tiny base model, the codes dataset and a cool, charging device
    (dialling the orchestrator over TLS with `tls`, the store's https with `store_tls`)."""
    base = make_tiny_llama(tmp / "base", hidden=64, layers=2)
    work = tmp / device_id
    (work / "datasets").mkdir(parents=True)
    rows = [{"prompt": f"Say the code {i}.", "completion": " The secret code is PocketLoRA."} for i in range(16)]
    (work / "datasets" / "codes.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    trace = tmp / f"{device_id}-trace.jsonl"
    trace.write_text(json.dumps({"t": 0, "charging": True, "battery": 90, "temp_c": 30}) + "\n")
    cfg = AgentConfig(
        orchestrator=address,
        device_id=device_id,
        work_dir=work,
        base_model_dir=base,
        base_model_id=BASE_MODEL_ID,
        datasets_dir=work / "datasets",
        enrollment_token=enrollment_token,
        tick_s=0.2,
        progress_every_s=0.5,
        tls=tls,
        store_tls=store_tls,
    )
    return Agent(cfg, TraceSensors(trace), Gate(GatePolicy()), listener=listener), cfg


def start(agent: Agent) -> tuple[threading.Event, threading.Thread]:
    """Run the agent's loop in a daemon thread; set the event to stop it."""
    stop = threading.Event()
    thread = threading.Thread(target=agent.run, args=(stop,), daemon=True)
    thread.start()
    return stop, thread
