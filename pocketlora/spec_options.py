"""The training options every submitting command takes (`job submit`, `campaign create`), and
the TrainingSpec they make: declared once so both commands read and check them the same way."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from pocketlora.cli_common import UserError
from protos.pocketlora.v1 import types_pb2 as tpb

Dataset = Annotated[str, typer.Option("--dataset", help="Name of a dataset in the device's dataset directory.")]
DatasetFile = Annotated[
    Path | None, typer.Option("--dataset-file", help="Or: a local JSONL file to ship to the devices through the store.")
]
Store = Annotated[
    str,
    typer.Option(
        "--store", envvar="POCKETLORA_STORE", help="Store URL for --dataset-file (credentials from the environment)."
    ),
]
AdapterName = Annotated[str, typer.Option("--adapter-name", help="Adapter name (versions count per device and name).")]
BaseModelId = Annotated[str, typer.Option("--base-model-id", help="Base model the device must have.")]
Rank = Annotated[int, typer.Option(min=1, max=256, help="LoRA rank.")]
Alpha = Annotated[float, typer.Option(min=0.0, help="LoRA alpha (0: the default).")]
LearningRate = Annotated[float, typer.Option("--lr", min=0.0, max=1.0, help="AdamW learning rate (0: 2e-4).")]
Epochs = Annotated[int, typer.Option(min=0, help="Passes over the data (0: 1).")]
MaxSteps = Annotated[int, typer.Option(min=0, help="Optimizer steps (0: from epochs).")]
MaxSeqLen = Annotated[int, typer.Option(min=0, help="Longest example in tokens (0: 256).")]
Seed = Annotated[int, typer.Option(min=0)]
Quantization = Annotated[str, typer.Option(help="nf4 or none.")]
EvalShare = Annotated[
    float,
    typer.Option(
        min=0.0,
        max=0.5,
        help="Share of each device's data held out to measure the base and the adapter (0: no evaluation).",
    ),
]
MaxAttempts = Annotated[int, typer.Option(min=0, max=100, help="Attempts (0: 6).")]
RequestId = Annotated[str, typer.Option(help="Idempotency key (default: random).")]
DEFAULT_BASE = "SmolLM2-135M-Instruct"


SPEC_OPTIONS = (
    "dataset",
    "dataset_file",
    "store",
    "adapter_name",
    "base_model_id",
    "rank",
    "alpha",
    "learning_rate",
    "epochs",
    "max_steps",
    "max_seq_len",
    "seed",
    "quantization",
    "eval_share",
)


def spec_from(options: dict[str, Any]) -> tpb.TrainingSpec:
    """The TrainingSpec of a command's training options (its locals(), named as above)."""
    return build_spec(**{name: options[name] for name in SPEC_OPTIONS})


def build_spec(
    *,
    dataset: str,
    dataset_file: Path | None,
    store: str,
    adapter_name: str,
    base_model_id: str,
    rank: int,
    alpha: float,
    learning_rate: float,
    epochs: int,
    max_steps: int,
    max_seq_len: int,
    seed: int,
    quantization: str,
    eval_share: float,
) -> tpb.TrainingSpec:
    """The TrainingSpec of the options; a shipped dataset is checked and uploaded first."""
    if quantization not in ("nf4", "none"):
        raise typer.BadParameter(f"{quantization!r} is not nf4 or none", param_hint="--quantization")
    if bool(dataset) == (dataset_file is not None):
        raise typer.BadParameter(
            "give exactly one of --dataset (on the device) and --dataset-file (shipped)", param_hint="--dataset"
        )
    shipped, shipped_sha = ("", "") if dataset_file is None else ship_dataset(dataset_file, store)
    return tpb.TrainingSpec(
        adapter_name=adapter_name,
        base_model_id=base_model_id,
        dataset=dataset,
        dataset_object=shipped,
        dataset_sha256=shipped_sha,
        lora=tpb.LoraSettings(rank=rank, alpha=alpha, dropout=-1),
        quantization=tpb.QUANTIZATION_NF4 if quantization == "nf4" else tpb.QUANTIZATION_NONE,
        learning_rate=learning_rate,
        epochs=epochs,
        max_steps=max_steps,
        max_seq_len=max_seq_len,
        seed=seed,
        eval_share=eval_share,
    )


def ship_dataset(path: Path, store_url: str) -> tuple[str, str]:
    """Check a dataset file, then upload it to its content address; returns (key, sha256)."""
    from adapters_store import dataset_key, open_store, sha256_file
    from adapters_store.errors import StoreError
    from agent.training.datasets import read_records
    from agent.training.errors import DatasetError

    if not path.is_file():
        raise UserError(f"--dataset-file {path}: no such file")
    try:
        read_records(path)
    except DatasetError as exc:
        raise UserError(f"--dataset-file {exc}") from None
    if not store_url:
        raise UserError("--dataset-file needs --store (or POCKETLORA_STORE): the orchestrator's store URL")
    digest = sha256_file(path)
    key = dataset_key(digest)
    try:
        with open_store(store_url) as blobs:
            if blobs.stat(key) is None:
                blobs.put_file(key, path)
    except StoreError as exc:
        raise UserError(f"--store: {exc}") from None
    return key, digest
