"""Staged rollouts of a campaign's adapters, with guard rails.

    RUNNING <--pause/resume--> PAUSED
    RUNNING --a step crosses the failure threshold--> HALTED (that step's devices rolled back)
    RUNNING --every step healthy--> COMPLETED
    any but UNDONE --undo--> UNDONE (every device it changed rolled back)

The eligible devices are the campaign's succeeded devices whose adapter suits the device and
passes the rollout's eval gate, in canary order (a stable hash of campaign and device, as
`adapter activate --campaign-id` uses). Step k brings the adapter to steps[k]% of them: when the
step starts, the next devices in that order get their own adapter as the desired one. The
control loop (`tick`) then watches that step's devices through their heartbeats: a device that
reports the adapter active is ACTIVE, one that reports refusing it (a failed check, a load
failure, a runtime that would not start) is FAILED. More than max_failure_share FAILED halts the
rollout and sends that step's devices back to what they wanted before; at least
min_healthy_share ACTIVE (and the bake time passed) starts the next step. Earlier steps' devices
are left alone: they were healthy. Devices whose adapter succeeds after a step started join at
a later step (each step re-reads the eligible devices).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from orchestrator import audit, validation
from orchestrator.activation import campaign_adapters, revert, set_desired
from orchestrator.audit import Actor
from orchestrator.domain import DeviceRecord, RolloutRecord, RolloutState, RolloutTarget, TargetOutcome, new_id
from orchestrator.errors import FailedPrecondition, InvalidArgument, NotFound, found
from orchestrator.evaluation import EvalGate
from orchestrator.state.base import StateStore, Tx

DEFAULT_STEPS = (1, 10, 50, 100)
DEFAULT_MIN_HEALTHY = 0.9
DEFAULT_MAX_FAILURE = 0.1
# Who the audit log names for what the control loop does on its own (a halt and its rollback).
CONTROL_LOOP = Actor("system", "control-loop")


@dataclass
class StepSummary:
    """How one step's devices are doing."""

    percent: int
    devices: int = 0
    active: int = 0
    failed: int = 0
    pending: int = 0
    rolled_back: int = 0


@dataclass
class RolloutView:
    """A rollout, its steps and (on request) its devices with what they want and run."""

    rollout: RolloutRecord
    steps: list[StepSummary]
    devices: list[tuple[RolloutTarget, DeviceRecord | None]] = field(default_factory=list)


class Rollouts:
    """Start, read, pause, resume and undo rollouts; the control loop's step-by-step progress."""

    def __init__(self, state: StateStore, clock: Callable[[], float]) -> None:
        self.state = state
        self.clock = clock

    # ------------------------------------------------------------------ operator calls
    def start(
        self,
        actor: Actor,
        request_id: str,
        campaign_id: str,
        steps: list[int],
        eval_gate: EvalGate | None,
        min_healthy_share: float | None = None,
        max_failure_share: float | None = None,
        bake_s: float = 0.0,
    ) -> tuple[RolloutView, bool]:
        """Start a rollout of the campaign's adapters (idempotent on request_id); the control loop
        starts its first step."""
        validation.text(request_id, "request_id", 128)
        validation.object_id(campaign_id, "campaign_id")
        steps = check_steps(steps or list(DEFAULT_STEPS))
        healthy = DEFAULT_MIN_HEALTHY if min_healthy_share is None else min_healthy_share
        failure = DEFAULT_MAX_FAILURE if max_failure_share is None else max_failure_share
        if not 0 < healthy <= 1:
            raise InvalidArgument("min_healthy_share", f"{healthy} is outside (0, 1]")
        if not 0 <= failure < 1:
            raise InvalidArgument("max_failure_share", f"{failure} is outside [0, 1)")
        if not 0 <= bake_s <= 30 * 86400:
            raise InvalidArgument("bake", f"{bake_s} s is outside 0 s - 30 days")
        now = self.clock()
        with self.state.transaction() as tx:
            earlier = tx.get_rollout_by_request(request_id) if request_id else None
            if earlier is not None:
                return self._view(tx, earlier, False), False
            found(tx.get_campaign(campaign_id, for_update=True), "campaign", campaign_id)
            live = tx.list_rollouts(campaign_id, (RolloutState.RUNNING, RolloutState.PAUSED), 1)
            if live:
                raise FailedPrecondition(
                    f"campaign {campaign_id} already has rollout {live[0].rollout_id} ({live[0].state.value});"
                    " undo it or wait for it to end"
                )
            rollout = RolloutRecord(
                rollout_id=new_id("ro"),
                campaign_id=campaign_id,
                steps=steps,
                eval_gate=eval_gate.to_dict() if eval_gate is not None else {},
                min_healthy_share=healthy,
                max_failure_share=failure,
                bake_s=bake_s,
                request_id=request_id,
                created_at=now,
                updated_at=now,
                message="waiting for the control loop to start step 1",
            )
            tx.insert_rollout(rollout)
            audit.record(tx, now, actor, "StartRollout", rollout.rollout_id, detail=f"campaign {campaign_id}")
            return self._view(tx, rollout, False), True

    def get(self, rollout_id: str = "", campaign_id: str = "", *, include_devices: bool = False) -> RolloutView:
        """A rollout by id, or the latest rollout of a campaign."""
        with self.state.transaction() as tx:
            return self._view(tx, self._find(tx, rollout_id, campaign_id), include_devices)

    def list_rollouts(
        self, campaign_id: str, states: tuple[RolloutState, ...], page_size: int, page_token: str
    ) -> tuple[list[RolloutView], str]:
        """A page of rollouts, newest first."""
        size = validation.page_size(page_size)
        validation.optional_object_id(campaign_id, "campaign_id")
        validation.optional_object_id(page_token, "page_token")
        with self.state.transaction() as tx:
            rows = tx.list_rollouts(campaign_id, states, size + 1, page_token)
            views = [self._view(tx, r, False) for r in rows[:size]]
        return views, (rows[size - 1].rollout_id if len(rows) > size else "")

    def pause(self, actor: Actor, rollout_id: str) -> RolloutView:
        """Hold a running rollout at its current step."""
        return self._move(actor, "PauseRollout", rollout_id, RolloutState.RUNNING, RolloutState.PAUSED)

    def resume(self, actor: Actor, rollout_id: str) -> RolloutView:
        """Let a paused rollout go on."""
        return self._move(actor, "ResumeRollout", rollout_id, RolloutState.PAUSED, RolloutState.RUNNING)

    def undo(self, actor: Actor, rollout_id: str) -> tuple[RolloutView, list[str]]:
        """Send every device the rollout changed back to what it wanted before; returns them."""
        validation.object_id(rollout_id, "rollout_id")
        now = self.clock()
        with self.state.transaction() as tx:
            rollout = found(tx.get_rollout(rollout_id, for_update=True), "rollout", rollout_id)
            if rollout.state == RolloutState.UNDONE:
                raise FailedPrecondition(f"rollout {rollout_id} was undone already")
            back = self._roll_back(tx, rollout, None, "undone by an operator", now)
            rollout.state = RolloutState.UNDONE
            self._note(rollout, f"undone by {actor.name}: {len(back)} device(s) rolled back", now)
            tx.save_rollout(rollout)
            audit.record(tx, now, actor, "UndoRollout", rollout_id, detail=f"{len(back)} devices rolled back")
            return self._view(tx, rollout, False), back

    def _move(self, actor: Actor, action: str, rollout_id: str, frm: RolloutState, to: RolloutState) -> RolloutView:
        validation.object_id(rollout_id, "rollout_id")
        now = self.clock()
        with self.state.transaction() as tx:
            rollout = found(tx.get_rollout(rollout_id, for_update=True), "rollout", rollout_id)
            if rollout.state != to:
                if rollout.state != frm:
                    raise FailedPrecondition(f"rollout {rollout_id} is {rollout.state.value}, not {frm.value}")
                rollout.state = to
                self._note(rollout, f"{to.value.lower()} by {actor.name}", now)
                tx.save_rollout(rollout)
                audit.record(tx, now, actor, action, rollout_id)
            return self._view(tx, rollout, False)

    @staticmethod
    def _find(tx: Tx, rollout_id: str, campaign_id: str) -> RolloutRecord:
        if bool(rollout_id) == bool(campaign_id):
            raise InvalidArgument("rollout_id", "set exactly one of rollout_id and campaign_id")
        if rollout_id:
            validation.object_id(rollout_id, "rollout_id")
            return found(tx.get_rollout(rollout_id), "rollout", rollout_id)
        validation.object_id(campaign_id, "campaign_id")
        latest = tx.list_rollouts(campaign_id, (), 1)
        if not latest:
            raise NotFound(f"campaign {campaign_id} has no rollout")
        return latest[0]

    @staticmethod
    def _view(tx: Tx, rollout: RolloutRecord, include_devices: bool) -> RolloutView:
        steps = [StepSummary(p) for p in rollout.steps]
        targets = list(tx.iter_rollout_targets(rollout.rollout_id))
        for t in targets:
            s = steps[t.step]
            s.devices += 1
            setattr(s, t.outcome.value.lower(), getattr(s, t.outcome.value.lower()) + 1)
        view = RolloutView(rollout, steps)
        if include_devices:
            devices = {d.device_id: d for d in tx.get_devices([t.device_id for t in targets])}
            view.devices = [(t, devices.get(t.device_id)) for t in targets]
        return view

    @staticmethod
    def _note(rollout: RolloutRecord, message: str, now: float) -> None:
        rollout.message = message
        rollout.updated_at = now

    # ------------------------------------------------------------------ control loop
    def tick(self) -> int:
        """Move every running rollout on by what its devices reported; returns devices changed."""
        with self.state.transaction() as tx:
            ids = [r.rollout_id for r in tx.list_rollouts("", (RolloutState.RUNNING,), 1000)]
        return sum(self._advance(rollout_id) for rollout_id in ids)

    def _advance(self, rollout_id: str) -> int:
        now = self.clock()
        with self.state.transaction() as tx:
            rollout = tx.get_rollout(rollout_id, for_update=True)
            if rollout is None or rollout.state != RolloutState.RUNNING:
                return 0
            before = dataclasses.replace(rollout)
            if rollout.assigned_step < rollout.current_step:
                changed = self._start_step(tx, rollout, now)
            else:
                changed = self._watch_step(tx, rollout, now)
            if rollout != before:  # a rollout waiting on its devices writes nothing
                tx.save_rollout(rollout)
        return changed

    def _start_step(self, tx: Tx, rollout: RolloutRecord, now: float) -> int:
        """Give the adapter to the next devices in canary order, up to this step's share."""
        gate = EvalGate.from_dict(rollout.eval_gate)
        pool, refused = [], 0
        for device, adapter in campaign_adapters(tx, rollout.campaign_id):
            if gate is not None and gate.problem(adapter):
                refused += 1
            else:
                pool.append((device, adapter))
        step = rollout.current_step
        if not pool:
            rollout.eligible_devices, rollout.gate_refused_devices = 0, refused
            waiting = f"waiting for eligible devices ({refused} kept out by the eval gate)"
            if rollout.message != waiting:
                self._note(rollout, waiting, now)
            return 0
        targeted = {t.device_id for t in tx.iter_rollout_targets(rollout.rollout_id)}
        want = math.ceil(len(pool) * rollout.steps[step] / 100) - len(targeted)
        chosen = [(d, a) for d, a in pool if d.device_id not in targeted][: max(want, 0)]
        new: list[RolloutTarget] = []
        for device, adapter in chosen:
            locked = tx.get_device(device.device_id, for_update=True)
            if locked is None:
                continue
            previous = locked.desired_adapter_id
            if previous == adapter.adapter_id:  # it wanted this adapter already
                previous = locked.adapter_history[-1] if locked.adapter_history else ""
            set_desired(tx, locked, adapter.adapter_id)
            new.append(
                RolloutTarget(rollout.rollout_id, device.device_id, adapter.adapter_id, step, previous, changed_at=now)
            )
        tx.insert_rollout_targets(new)
        rollout.assigned_step = step
        rollout.step_started_at = now
        rollout.eligible_devices, rollout.gate_refused_devices = len(pool), refused
        self._note(rollout, f"step {step + 1} ({rollout.steps[step]}%): {len(new)} device(s) given the adapter", now)
        return len(new)

    def _watch_step(self, tx: Tx, rollout: RolloutRecord, now: float) -> int:
        """Record what the step's devices report; halt, hold, or start the next step."""
        step = rollout.current_step
        every = list(tx.iter_rollout_targets(rollout.rollout_id))
        targets = [t for t in every if t.step == step]
        # Earlier steps' stragglers are recorded too (status stays true); only this step decides.
        pending = [t for t in every if t.outcome == TargetOutcome.PENDING]
        devices = {d.device_id: d for d in tx.get_devices([t.device_id for t in pending])}
        for t in pending:
            device = devices.get(t.device_id)
            if device is None:
                continue
            if t.adapter_id in device.adapter_refusals:
                t.outcome, t.reason = TargetOutcome.FAILED, device.adapter_refusals[t.adapter_id]
            elif device.active_adapter_id == t.adapter_id:
                t.outcome = TargetOutcome.ACTIVE
            else:
                continue
            t.changed_at = now
            tx.save_rollout_target(t)
        n = len(targets)
        failed = [t for t in targets if t.outcome == TargetOutcome.FAILED]
        active = sum(1 for t in targets if t.outcome == TargetOutcome.ACTIVE)
        label = f"step {step + 1} ({rollout.steps[step]}%)"
        if n and len(failed) / n > rollout.max_failure_share:
            back = self._roll_back(tx, rollout, step, "rolled back: the step crossed its failure threshold", now)
            rollout.state = RolloutState.HALTED
            example = f"{failed[0].device_id}: {failed[0].reason}"
            self._note(
                rollout,
                f"halted at {label}: {len(failed)} of {n} device(s) refused the adapter "
                f"({len(failed) / n:.0%} > {rollout.max_failure_share:.0%} allowed; e.g. {example}); "
                f"rolled back {len(back)} device(s) of this step",
                now,
            )
            audit.record(tx, now, CONTROL_LOOP, "HaltRollout", rollout.rollout_id, detail=rollout.message)
            return len(back)
        if (n == 0 or active / n >= rollout.min_healthy_share) and now - rollout.step_started_at >= rollout.bake_s:
            rollout.current_step += 1
            if rollout.current_step == len(rollout.steps):
                rollout.state = RolloutState.COMPLETED
                self._note(rollout, f"completed: {label} healthy ({active} of {n} active)", now)
            else:
                self._note(rollout, f"{label} healthy ({active} of {n} active); next step starting", now)
        return 0

    @staticmethod
    def _roll_back(tx: Tx, rollout: RolloutRecord, step: int | None, why: str, now: float) -> list[str]:
        """Send the rollout's devices (of one step, or all) back; returns those changed."""
        back: list[str] = []
        for t in list(tx.iter_rollout_targets(rollout.rollout_id)):
            if (step is not None and t.step != step) or t.outcome == TargetOutcome.ROLLED_BACK:
                continue
            device = tx.get_device(t.device_id, for_update=True)
            if device is not None and revert(tx, device, t.adapter_id, t.previous_adapter_id):
                back.append(t.device_id)
            t.reason = f"{why} ({t.reason})" if t.reason else why
            t.outcome, t.changed_at = TargetOutcome.ROLLED_BACK, now
            tx.save_rollout_target(t)
        return back


def check_steps(steps: list[int]) -> list[int]:
    """Increasing percentages in 1-100 that end at 100."""
    if any(not 1 <= p <= 100 for p in steps):
        raise InvalidArgument("steps", f"{steps} must be percentages from 1 to 100")
    if any(b <= a for a, b in itertools.pairwise(steps)) or steps[-1] != 100:
        raise InvalidArgument("steps", f"{steps} must increase and end at 100")
    if len(steps) > 20:
        raise InvalidArgument("steps", f"{len(steps)} steps, above 20")
    return list(steps)
