"""The reference training loop: a HostModel trained with seed slots that esperd drives.

One `HostRun` is one training run. Per step it applies the commands that arrived
(between optimizer steps, so a germination never lands mid-backward), trains, and
every `health_every` steps captures telemetry into one HealthBatch. Per epoch it
validates, measures each blended seed's counterfactual (validation accuracy with the
seed minus with its alpha forced to 0), takes the automatic lifecycle transitions and
sends one SystemStatePacket (`done` on the last).

Without a link (no esperd) and with `telemetry=False` it is the plain training loop:
no hooks, no yields, no packets -- the baseline the overhead benchmark compares with.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F

from esperd_contracts import (
    AdaptationCommand,
    Blueprint,
    HealthBatch,
    HealthSignal,
    SeedSlotState,
    SeedStage,
    SystemStatePacket,
    TopologyPacket,
)
from esperd_examples.host.blueprints import ALL_SEEDS
from esperd_examples.host.data import Split, batches, load_task, steps_per_epoch
from esperd_examples.host.models import HostModel, build_model
from esperd_examples.host.telemetry import LayerProbe, topology

_MEASURED = (SeedStage.BLENDING, SeedStage.PROBATIONARY)  # stages where alpha > 0 can be switched off


class Link(Protocol):
    """What the loop needs from its connection to esperd (`esperd.client.HostClient` is one)."""

    run_id: str
    dropped: int
    commands: asyncio.Queue[AdaptationCommand]

    def send_topology(self, packet: TopologyPacket) -> None: ...
    def send_health(self, signals: list[HealthSignal] | HealthBatch) -> None: ...
    def send_state(self, packet: SystemStatePacket) -> None: ...
    def ack(self, command: AdaptationCommand, applied: bool, reason: str = "") -> None: ...
    async def flush(self, timeout: float = 5.0) -> None: ...  # noqa: ASYNC109 - HostClient.flush


@dataclass(slots=True)
class HostConfig:
    """One run's settings. Defaults: a ~37k-parameter CNN on digits for 10 epochs."""

    task: str = "digits"  # digits (CNN) | sequence, sort (transformers) | teacher (MLP); see data.py
    width: float = 8  # the model's width: the CNN's stem channels (blocks 2x, 4x); see models.build_model
    depth: int | None = None  # blocks / hidden layers where the task's model has a variable depth
    epochs: int = 10
    seed: int = 0
    order_seed: int | None = None  # the batch order's seed (None: `seed`); the A/A control moves it alone
    batch_size: int = 64
    lr: float = 0.02  # SGD with momentum 0.9, cosine-decayed to 10% over the run
    device: str = "cpu"
    telemetry: bool = True  # hooks, health batches, counterfactuals, state packets
    health_every: int = 10  # K: one HealthBatch every K steps (bounds the overhead; see bench_host)
    cooldown_epochs: int = 2  # PRUNED -> DORMANT after this many epoch boundaries
    blueprints: tuple[Blueprint, ...] | None = None  # None: all sixteen
    degrade: str | None = None  # fault injection: this layer's units die progressively
    degrade_max: float = 0.75  # ... up to this fraction
    degrade_steps: int = 0  # ... over this many steps (0: the first epoch)
    epoch_pause_s: float = 0.0  # wait after each state packet, so commands land before the next epoch
    log: Callable[[str], None] | None = None


@dataclass(slots=True)
class EpochReport:
    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    host_params: int
    total_params: int
    seeds: list[SeedSlotState]
    train_seconds: float  # wall time of the training steps only (what the overhead benchmark compares)
    train_cpu_seconds: float  # CPU time of this process over the same steps (robust to other tenants)
    telemetry_seconds: float  # CPU time spent inside telemetry and publishing code itself
    steps: int


@dataclass(slots=True)
class CommandRecord:
    command: AdaptationCommand
    applied: bool
    reason: str
    epoch: int
    step: int


@dataclass(slots=True)
class RunReport:
    run_id: str
    epochs: list[EpochReport] = field(default_factory=list)
    commands: list[CommandRecord] = field(default_factory=list)
    health_batches: int = 0
    stale_commands: int = 0  # ignored: sent under an older ownership epoch than one already seen

    @property
    def final(self) -> EpochReport:
        return self.epochs[-1]

    @property
    def applied(self) -> int:
        return sum(record.applied for record in self.commands)

    @property
    def rejected(self) -> int:
        return sum(not record.applied for record in self.commands)

    @property
    def train_seconds(self) -> float:
        return sum(e.train_seconds for e in self.epochs)

    @property
    def train_cpu_seconds(self) -> float:
        return sum(e.train_cpu_seconds for e in self.epochs)

    @property
    def steps(self) -> int:
        return sum(e.steps for e in self.epochs)


class HostRun:
    """One training run of the reference host, optionally linked to esperd."""

    def __init__(self, config: HostConfig, link: Link | None = None, run_id: str | None = None) -> None:
        self.config = config
        self.link = link
        self.run_id = run_id or (link.run_id if link is not None else "local")
        self.device = torch.device(config.device)
        torch.manual_seed(config.seed)
        self.data: Split = load_task(config.task).to(self.device)
        registry = ALL_SEEDS if config.blueprints is None else {bp: ALL_SEEDS[bp] for bp in config.blueprints}
        self.model: HostModel = build_model(
            config.task,
            self.data.classes,
            width=config.width,
            depth=config.depth,
            registry=registry,
            cooldown_epochs=config.cooldown_epochs,
        ).to(self.device)
        self.steps_per_epoch = steps_per_epoch(self.data.x_train.shape[0], config.batch_size)
        for slot in self.model.slots:
            slot.steps_per_epoch, slot.device = self.steps_per_epoch, self.device
        # SGD, not Adam: a TRAINING seed's straight-through gradient never feels its own
        # output, and Adam's normalised steps grow such a seed without bound (it outgrew the
        # host's activations within a few epochs, wrecking the blend); SGD steps shrink with
        # the gradient.
        self.optimizer = torch.optim.SGD(
            [{"params": self.model.host_parameters(), "base_lr": config.lr}], lr=config.lr, momentum=0.9
        )
        self._seed_groups: dict[int, dict] = {}  # layer id -> its seed's optimizer param group
        self.probe = LayerProbe(self.model) if config.telemetry else None
        order_seed = config.seed if config.order_seed is None else config.order_seed
        self.generator = torch.Generator().manual_seed(order_seed)
        self.report = RunReport(self.run_id)
        self.epoch = 0
        self.global_step = 0
        self.val_accuracy = 0.0
        self.finished = False
        self.newest_epoch = 0  # newest ownership epoch among the commands received (fencing)
        self._fault = self.model.layer_named(config.degrade).block if config.degrade else None

    # ------------------------------------------------------------------ run

    async def run(self) -> RunReport:
        """Train for `config.epochs` epochs; returns what happened."""
        self.start()
        for _ in range(self.config.epochs):
            await self.run_epoch()
        await self.finish()
        return self.report

    def start(self) -> None:
        """Announce the topology and measure the accuracy before any training."""
        if self.link is not None:
            self.link.send_topology(topology(self.model))
        _, self.val_accuracy = self.evaluate()  # the baseline a seed germinated in epoch 0 is judged by

    async def run_epoch(self) -> EpochReport:
        """The next epoch: train, report, publish its state and give commands a chance to arrive."""
        report = await self.train_epoch()
        self.report.epochs.append(report)
        self._log_epoch(report)
        self.epoch += 1
        if self.link is not None:
            self.link.send_state(self.state_packet(report, done=self.epoch >= self.config.epochs))
            await asyncio.sleep(self.config.epoch_pause_s)
        return report

    async def finish(self) -> None:
        """Stop taking commands: whatever arrives now is answered (rejected), not left hanging."""
        self.finished = True
        if self.link is not None:
            await self.link.flush()
            self.poll_commands()
            await self.link.flush()

    async def train_epoch(self) -> EpochReport:
        """One pass over the training set, then validation, counterfactuals and transitions."""
        cfg, link, probe = self.config, self.link, self.probe
        self.model.train()
        self._set_lr()
        loss_sum = torch.zeros((), device=self.device)
        hits = torch.zeros((), device=self.device, dtype=torch.long)
        steps = 0
        probe_ns = probe.cost_ns if probe is not None else 0
        accounted_ns = 0  # CPU time inside the instrumentation's own code paths (see EpochReport)
        started, started_cpu = time.perf_counter(), time.process_time()
        for x, y in batches(self.data.x_train, self.data.y_train, cfg.batch_size, self.generator):
            if link is not None:
                t0 = time.thread_time_ns()
                self.poll_commands()
                accounted_ns += time.thread_time_ns() - t0
            self._inject_fault()
            capture = probe is not None and self.global_step % cfg.health_every == 0
            loss, correct = self.train_step(x, y, capture)
            loss_sum += loss * y.numel()
            hits += correct
            if capture:
                self._send_health()
            self.global_step += 1
            steps += 1
            if link is not None:
                t0 = time.thread_time_ns()
                await asyncio.sleep(0)  # let the client publish and receive between steps
                accounted_ns += time.thread_time_ns() - t0
        train_seconds, train_cpu_seconds = time.perf_counter() - started, time.process_time() - started_cpu
        if probe is not None:
            accounted_ns += probe.cost_ns - probe_ns
        n = self.data.y_train.numel()  # labels, not samples: per-position tasks label every token
        val_loss, self.val_accuracy = self.evaluate()
        if probe is not None:
            self.measure_counterfactuals()
        for slot in self.model.slots:
            slot.end_epoch(self.val_accuracy)
        self._sync_optimizer()
        return EpochReport(
            epoch=self.epoch,
            train_loss=loss_sum.item() / n,
            train_accuracy=hits.item() / n,
            val_loss=val_loss,
            val_accuracy=self.val_accuracy,
            host_params=self.model.host_param_count(),
            total_params=self.model.total_param_count(),
            seeds=[slot.state() for slot in self.model.slots],
            train_seconds=train_seconds,
            train_cpu_seconds=train_cpu_seconds,
            telemetry_seconds=accounted_ns / 1e9,
            steps=steps,
        )

    def train_step(
        self, x: torch.Tensor, y: torch.Tensor, capture: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward, backward, optimizer step, blend step; returns (loss, correct) as tensors."""
        if capture:
            assert self.probe is not None
            with self.probe.capture():
                logits = self.model(x)
        else:
            logits = self.model(x)
        loss = F.cross_entropy(logits, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if capture:
            self.probe.read_gradients()  # type: ignore[union-attr]  # counts itself in probe.cost_ns
        self.optimizer.step()
        for slot in self.model.slots:
            slot.step()
        return loss.detach(), (logits.argmax(dim=1) == y).sum()

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        """(loss, accuracy) on the validation set, in eval mode."""
        was_training = self.model.training
        self.model.eval()
        logits = self.model(self.data.x_val)
        loss = F.cross_entropy(logits, self.data.y_val).item()
        accuracy = (logits.argmax(dim=1) == self.data.y_val).float().mean().item()
        self.model.train(was_training)
        return loss, accuracy

    def measure_counterfactuals(self) -> None:
        """Each blended seed's contribution: val accuracy with it minus with its alpha forced to 0.

        And, once per alpha milestone (25/50/75/100 %) the blend has newly reached, the
        contribution with alpha forced to the milestone (004's contribution at milestones).
        """
        for slot in self.model.slots:
            if slot.seed is None or slot.stage not in _MEASURED:
                slot.counterfactual = 0.0 if slot.stage is not SeedStage.FOSSILIZED else slot.counterfactual
                continue
            with slot.forced_alpha(0.0):
                _, without = self.evaluate()
            slot.counterfactual = self.val_accuracy - without
            for milestone in slot.due_milestones():
                with slot.forced_alpha(milestone / 100):
                    _, at_milestone = self.evaluate()
                slot.milestones[milestone] = at_milestone - without

    # ------------------------------------------------------------------ commands

    def poll_commands(self) -> None:
        """Apply every command that has arrived (and ack each)."""
        assert self.link is not None
        queue = self.link.commands
        while not queue.empty():
            self.handle(queue.get_nowait())

    def handle(self, command: AdaptationCommand) -> str | None:
        """Apply one command if it is legal; returns the rejection reason or None. Acks it.

        A command older than the newest ownership epoch seen comes from an esperd instance that has
        lost this run (it was frozen, say, while another took over): it is ignored, not acked, since
        the instance that would read the ack no longer tracks the command.
        """
        if command.epoch < self.newest_epoch:
            self.report.stale_commands += 1
            reason = f"stale epoch {command.epoch} < {self.newest_epoch}"
            if self.config.log is not None:
                self.config.log(
                    f"{self.run_id} step {self.global_step:5d}  {command.op.value} layer {command.layer_id} "
                    f"ignored: {reason} (from an esperd instance that lost this run)"
                )
            return reason
        self.newest_epoch = command.epoch
        reason = self._target_problem(command)
        if reason is None:
            slot = self.model.layers[command.layer_id].slot
            assert slot is not None
            reason = slot.apply(command, self.val_accuracy)
        if reason is None:
            self._sync_optimizer()
        applied = reason is None
        self.report.commands.append(
            CommandRecord(command, applied, reason or "", self.epoch, self.global_step)
        )
        if self.link is not None:
            self.link.ack(command, applied, reason or "")
        self._log_command(command, reason)
        return reason

    def _target_problem(self, command: AdaptationCommand) -> str | None:
        if self.finished:
            return "the run has finished"
        if command.run_id != self.run_id:
            return f"command for run {command.run_id}, this is {self.run_id}"
        layer = self.model.layer(command.layer_id)
        if layer is None:
            return f"unknown layer {command.layer_id} (this model has {len(self.model.layers)})"
        if layer.slot is None:
            return f"layer {layer.layer_id} ({layer.name}) has no seed slot"
        return None

    def lr_factor(self) -> float:
        """Cosine decay from 1 to 0.1 over the run (a steady final accuracy to compare runs by)."""
        progress = self.epoch / max(self.config.epochs - 1, 1)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    def _set_lr(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * self.lr_factor()

    def _sync_optimizer(self) -> None:
        """One param group per trainable seed, at its LR multiplier; frozen or removed seeds leave."""
        for slot in self.model.slots:
            params = slot.trainable_parameters()
            group = self._seed_groups.get(slot.layer_id)
            if group is not None and [id(p) for p in group["params"]] == [id(p) for p in params]:
                continue
            if group is not None:
                # By identity: list.remove would compare dicts, i.e. parameter tensors elementwise.
                groups = self.optimizer.param_groups
                del groups[next(i for i, g in enumerate(groups) if g is group)]
                for p in group["params"]:
                    self.optimizer.state.pop(p, None)
                del self._seed_groups[slot.layer_id]
            if params:
                base_lr = self.config.lr * slot.lr_multiplier
                self.optimizer.add_param_group(
                    {"params": params, "lr": base_lr * self.lr_factor(), "base_lr": base_lr}
                )
                self._seed_groups[slot.layer_id] = self.optimizer.param_groups[-1]

    # ------------------------------------------------------------------ packets

    def _send_health(self) -> None:
        assert self.probe is not None
        t0 = time.thread_time_ns()
        signals = self.probe.signals()
        self.report.health_batches += 1
        if self.link is not None and signals:
            self.link.send_health(HealthBatch(signals=signals, timestamp=time.time()))
        self.probe.cost_ns += time.thread_time_ns() - t0

    def state_packet(self, report: EpochReport, done: bool = False) -> SystemStatePacket:
        metrics = {
            "train_seconds": report.train_seconds,
            "commands_applied": float(self.report.applied),
            "commands_rejected": float(self.report.rejected),
            "telemetry_dropped": float(self.link.dropped if self.link is not None else 0),
        }
        return SystemStatePacket(
            epoch=report.epoch,
            global_step=self.global_step,
            train_loss=report.train_loss,
            train_accuracy=report.train_accuracy,
            val_loss=report.val_loss,
            val_accuracy=report.val_accuracy,
            metrics=metrics,
            seeds=report.seeds,
            host_params=report.host_params,
            total_params=report.total_params,
            timestamp=time.time(),
            done=done,
            total_epochs=self.config.epochs,
            val_samples=int(self.data.y_val.shape[0]),
        )

    def _inject_fault(self) -> None:
        if self._fault is None:
            return
        ramp = self.config.degrade_steps or self.steps_per_epoch
        self._fault.dead_fraction = self.config.degrade_max * min(1.0, (self.global_step + 1) / ramp)

    # ------------------------------------------------------------------ logging

    def _log_epoch(self, r: EpochReport) -> None:
        if self.config.log is None:
            return
        live = [
            f"{s.layer_id}:{s.stage.value}" + (f"@{s.alpha:.2f}" if s.alpha else "")
            for s in r.seeds
            if s.stage is not SeedStage.DORMANT
        ]
        self.config.log(
            f"{self.run_id} epoch {r.epoch:3d}  train {r.train_loss:.3f}/{r.train_accuracy:.3f}  "
            f"val {r.val_loss:.3f}/{r.val_accuracy:.3f}  params {r.total_params} ({r.host_params} host)  "
            f"seeds [{' '.join(live)}]"
        )

    def _log_command(self, command: AdaptationCommand, reason: str | None) -> None:
        if self.config.log is None:
            return
        levers = ""
        if command.blueprint is not None:
            blend = command.blend.value if command.blend else "-"
            tempo = command.tempo.value if command.tempo else "-"
            levers = f" {command.blueprint.value} ({blend}, {tempo})"
        outcome = "applied" if reason is None else f"REJECTED: {reason}"
        self.config.log(
            f"{self.run_id} step {self.global_step:5d}  {command.op.value} layer {command.layer_id}{levers} "
            f"[{command.policy} v{command.policy_version}] -> {outcome}"
        )
