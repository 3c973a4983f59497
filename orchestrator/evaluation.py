"""Evaluation before use: does an adapter beat its base model on the device's held-out data?

A job may hold out a share of the device's examples (TrainingSpec.eval_share); the device then
measures the mean token loss of the base model and of the new adapter on them (the data never
leaves the device) and the adapter's manifest carries both figures in its metrics
(`eval_loss_base`, `eval_loss_adapter`, `eval_examples`). The manifest is read from the verified
blob, so the figures are the ones the device packed with the weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from orchestrator.domain import AdapterRecord
from orchestrator.errors import InvalidArgument


@dataclass(frozen=True)
class EvalFigures:
    """An adapter's held-out figures."""

    base_loss: float
    adapter_loss: float
    examples: int

    @property
    def improvement(self) -> float:
        """Relative improvement of the loss, (base - adapter) / base."""
        return (self.base_loss - self.adapter_loss) / self.base_loss if self.base_loss > 0 else 0.0


def figures(adapter: AdapterRecord) -> EvalFigures | None:
    """The adapter's eval figures from its manifest, or None when the device reported none."""
    metrics = adapter.manifest.get("metrics") or {}
    base, tuned = metrics.get("eval_loss_base"), metrics.get("eval_loss_adapter")
    if not isinstance(base, int | float) or not isinstance(tuned, int | float):
        return None
    if not (math.isfinite(base) and math.isfinite(tuned)):
        return None
    return EvalFigures(float(base), float(tuned), int(metrics.get("eval_examples") or 0))


@dataclass(frozen=True)
class EvalGate:
    """An adapter passes when its held-out loss is at least `min_improvement` (relative) below
    the base's; an adapter without figures never passes."""

    min_improvement: float = 0.0

    def __post_init__(self) -> None:
        if not math.isfinite(self.min_improvement) or not -1.0 <= self.min_improvement < 1.0:
            raise InvalidArgument("eval_gate.min_improvement", f"{self.min_improvement} is outside [-1, 1)")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalGate | None:
        """The gate stored as a dict; None for an empty dict (no gate)."""
        return cls(float(data["min_improvement"])) if data else None

    def to_dict(self) -> dict[str, Any]:
        """The gate as stored."""
        return {"min_improvement": self.min_improvement}

    def problem(self, adapter: AdapterRecord) -> str:
        """Why the adapter fails the gate, with the figures; "" when it passes."""
        got = figures(adapter)
        if got is None:
            return f"adapter {adapter.adapter_id} has no held-out evaluation (train with eval_share > 0)"
        if got.improvement >= self.min_improvement:
            return ""
        return (
            f"adapter {adapter.adapter_id} does not beat its base by {self.min_improvement:.1%}: "
            f"eval loss {got.adapter_loss:.4f} vs base {got.base_loss:.4f} "
            f"({got.improvement:+.1%} on {got.examples} held-out examples)"
        )
