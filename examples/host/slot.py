"""SeedSlot: a Kasmina-style seed slot wrapped around one host layer's output.

    out = host + alpha * seed(host)

What the forward pass does in each stage (the lifecycle lives in `lifecycle.py`):

    DORMANT, GERMINATED, PRUNED  out = host (no seed runs; a GERMINATED seed exists but
                                 waits for the epoch boundary before it trains)
    TRAINING      (for the GERMINATE's dwell_epochs, when it set one; then the slot starts
                  blending by itself, else it waits for ADVANCE)
                  gradient isolation and alpha 0: the seed reads host.detach(), and the
                  output is host + (s - s.detach()) -- exactly `host` in value, but the
                  seed receives the loss gradient as if it were fully blended in (a
                  straight-through estimator), so it learns what the host is missing
                  without changing the host's forward pass or its gradients at all.
    BLENDING      alpha ramps per optimizer step (see `blending.py`); GATED multiplies the
                  schedule by a learned per-sample gate. The seed input stays detached
                  (ISOLATED) unless the GERMINATE chose SHARED; the default is ISOLATED
                  for CNN layers and SHARED for transformer layers (the seed documents'
                  topology-dependent default).
    PROBATIONARY  alpha holds where the blend ended; the seed keeps training.
    FOSSILIZED    the seed is frozen (requires_grad False, eval mode, out of the
                  optimizer) and becomes part of the host: its input is no longer
                  detached, so the host learns around it from then on.

PRUNE removes the seed module at once; the slot returns to DORMANT after a cooldown.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import nn

from esperd_contracts import (
    AdaptationCommand,
    BlendAlgorithm,
    Blueprint,
    BlueprintFamily,
    IsolationMode,
    Op,
    SeedSlotState,
    SeedStage,
    Tempo,
)
from esperd_examples.host.blending import BlendSchedule
from esperd_examples.host.blueprints import ALL_SEEDS, Gate, SeedFactory, build_seed
from esperd_examples.host.lifecycle import SeedLifecycle
from esperd_examples.host.seedstats import SeedGradientLog

_SILENT = frozenset({SeedStage.DORMANT, SeedStage.GERMINATED, SeedStage.PRUNED})
_LIVE = frozenset({SeedStage.GERMINATED, SeedStage.TRAINING, SeedStage.BLENDING, SeedStage.PROBATIONARY})
#: Alpha milestones (percent) at which a seed's counterfactual is measured once (004).
MILESTONES: tuple[int, ...] = (25, 50, 75, 100)


class SeedSlot(nn.Module):
    """One seed slot: its lifecycle, its seed module (when it has one) and the blend."""

    def __init__(
        self,
        layer_id: int,
        name: str,
        width: int,
        family: BlueprintFamily,
        *,
        registry: Mapping[Blueprint, SeedFactory] = ALL_SEEDS,
        cooldown_epochs: int = 2,
        steps_per_epoch: int = 1,
        device: torch.device | str = "cpu",
        output_decay: float = 0.1,
    ) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.slot_name = name
        self.width = width
        self.family = family
        self.registry = registry
        self.steps_per_epoch = steps_per_epoch
        self.device = torch.device(device)
        self.lifecycle = SeedLifecycle(cooldown_epochs=cooldown_epochs)
        self.seed: nn.Module | None = None
        self.gate: Gate | None = None
        self.schedule: BlendSchedule | None = None
        self.blueprint: Blueprint | None = None
        self.blend = BlendAlgorithm.LINEAR
        self.tempo = Tempo.STANDARD
        self.steepness = 1.0
        self.isolation = IsolationMode.ISOLATED
        self.lr_multiplier = 1.0
        self.dwell: int | None = None  # epochs in TRAINING before blending by itself (None: on ADVANCE)
        self.output_decay = output_decay  # bounds a TRAINING seed's output (see _decayed)
        self.counterfactual = 0.0  # val accuracy with the seed minus with alpha forced to 0
        self.accuracy_at_germination = 0.0
        self.total_improvement = 0.0  # val accuracy now minus at germination
        self._forced_alpha: float | None = None
        # Lever telemetry (004), see esperd_contracts.HealthSignal. While `probing` (a step the
        # probe captures) the forward pass leaves the tensors below for the probe to read.
        self.probing = False
        self.gradients = SeedGradientLog()
        self.milestones: dict[int, float] = {}  # alpha milestone (percent) -> its counterfactual
        self.alpha_spread: torch.Tensor | None = None  # variance of the gated alpha over the batch
        self.grad_via_seed: torch.Tensor | None = None  # gradient at the layer output via the seed
        self.grad_total: torch.Tensor | None = None  # ... via both paths

    # ------------------------------------------------------------ state

    @property
    def stage(self) -> SeedStage:
        return self.lifecycle.stage

    @property
    def live(self) -> bool:
        """A seed that exists and is not yet permanent."""
        return self.stage in _LIVE

    @property
    def alpha(self) -> float:
        """The blend weight in force (the schedule's; GATED's gate multiplies it per sample)."""
        if self.schedule is None or self.stage not in (
            SeedStage.BLENDING,
            SeedStage.PROBATIONARY,
            SeedStage.FOSSILIZED,
        ):
            return 0.0
        return self.schedule.alpha

    def seed_parameters(self) -> list[nn.Parameter]:
        """The seed's parameters, gate included (empty without a seed)."""
        modules = [m for m in (self.seed, self.gate) if m is not None]
        return [p for m in modules for p in m.parameters()]

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Seed parameters the optimizer should update now (none once fossilized)."""
        if self.stage not in (SeedStage.TRAINING, SeedStage.BLENDING, SeedStage.PROBATIONARY):
            return []
        return self.seed_parameters()

    def seed_param_count(self) -> int:
        return sum(p.numel() for p in self.seed_parameters())

    def state(self) -> SeedSlotState:
        """This slot as the wire's SeedSlotState."""
        return SeedSlotState(
            layer_id=self.layer_id,
            stage=self.stage,
            blueprint=self.blueprint if self.seed is not None else None,
            alpha=min(max(self.alpha, 0.0), 1.0),
            epochs_in_stage=self.lifecycle.epochs_in_stage,
            params=self.seed_param_count(),
            counterfactual=self.counterfactual,
            total_improvement=self.total_improvement,
            counterfactual_alpha25=self.milestones.get(25),
            counterfactual_alpha50=self.milestones.get(50),
            counterfactual_alpha75=self.milestones.get(75),
            counterfactual_alpha100=self.milestones.get(100),
        )

    def due_milestones(self) -> list[int]:
        """Alpha milestones the blend has reached whose counterfactual is not measured yet."""
        if self.seed is None or self.stage not in (SeedStage.BLENDING, SeedStage.PROBATIONARY):
            return []
        return [m for m in MILESTONES if m not in self.milestones and self.alpha >= m / 100 - 1e-6]

    def blending_velocity(self) -> float:
        if self.schedule is None or self.stage is not SeedStage.BLENDING:
            return 0.0
        return self.schedule.velocity(self.steps_per_epoch)

    # ------------------------------------------------------------ forward

    def forward(self, host: torch.Tensor) -> torch.Tensor:
        delta = self.seed_branch(host)
        return host if delta is None else host + delta

    def seed_branch(self, host: torch.Tensor) -> torch.Tensor | None:
        """The term this slot adds to `host` (None when it adds nothing): the seed path."""
        stage, seed = self.stage, self.seed
        if seed is None or stage in _SILENT:
            return None
        if stage is SeedStage.TRAINING:
            if not torch.is_grad_enabled():
                return None  # evaluation: the seed adds exactly nothing, skip computing it
            s = seed(host.detach())
            if s.requires_grad and self.output_decay > 0.0:
                s.register_hook(self._decayed(s.detach()))
            return s - s.detach()  # zero in value; carries the loss gradient to the seed only
        isolated = stage is not SeedStage.FOSSILIZED and self.isolation is IsolationMode.ISOLATED
        if isolated:
            x = host.detach()
        elif self.probing and host.requires_grad:
            x = self._tapped(host)
        else:
            x = host
        return self._effective_alpha(x) * seed(x)

    def _tapped(self, host: torch.Tensor) -> torch.Tensor:
        """`host` for the seed's path, with hooks that keep the gradient reaching the layer's
        output through that path alone (a view of its own) and through both (`host` itself)."""
        x = host.view_as(host)
        x.register_hook(self._keep("grad_via_seed"))
        host.register_hook(self._keep("grad_total"))
        return x

    def _keep(self, name: str) -> Callable[[torch.Tensor], None]:
        def hook(grad: torch.Tensor) -> None:
            setattr(self, name, grad.detach())

        return hook

    def _decayed(self, output: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """The straight-through gradient plus `output_decay` x the seed's own output (per position).

        The loss never feels a TRAINING seed, so its gradient does not shrink as the seed
        follows it: unchecked, the seed's output grows without bound (x1000 in three epochs on
        the sort transformer) and the blend that follows wrecks the host. With the decay the
        seed settles where its output is the loss's negative gradient / `output_decay`, a
        bounded step in the direction that would lower the loss: what blending then adds.
        """
        channels = output.shape[1] if output.dim() == 4 else output.shape[-1]
        decay = self.output_decay * channels / output.numel()  # per position: a mean over positions
        return lambda grad: grad + decay * output

    def _effective_alpha(self, x: torch.Tensor) -> torch.Tensor | float:
        if self._forced_alpha is not None:
            return self._forced_alpha
        if self.gate is not None:
            alpha = self.gate(x) * self.alpha
            if self.probing:
                self.alpha_spread = alpha.detach().float().var(correction=0)
            return alpha
        return self.alpha

    @contextlib.contextmanager
    def forced_alpha(self, alpha: float) -> Iterator[None]:
        """Run the block with alpha forced (0 = the counterfactual without this seed)."""
        previous, self._forced_alpha = self._forced_alpha, alpha
        try:
            yield
        finally:
            self._forced_alpha = previous

    def train(self, mode: bool = True) -> SeedSlot:
        super().train(mode)
        if self.stage is SeedStage.FOSSILIZED and self.seed is not None:
            self.seed.eval()  # frozen: its BatchNorm statistics must not drift either
        return self

    # ------------------------------------------------------------ commands

    def check(self, command: AdaptationCommand) -> str | None:
        """Why this slot cannot apply `command`, or None when it can."""
        if command.seed_id != 0:
            return f"one seed per slot here: seed_id {command.seed_id} does not exist"
        reason = self.lifecycle.check(command.op)
        if reason is not None:
            return f"{reason} (layer {self.layer_id}, {self.slot_name})"
        if command.op is Op.GERMINATE:
            return self._check_blueprint(command.blueprint) or self._check_size(command)
        if command.op is Op.SET_ALPHA_TARGET and command.alpha_target is None:
            return "set_alpha_target needs alpha_target"
        return None

    def _check_blueprint(self, blueprint: Blueprint | None) -> str | None:
        if blueprint is None:
            return "germinate needs a blueprint"
        if blueprint.family is not self.family:
            return (
                f"blueprint {blueprint.value} is {blueprint.family.value}-family; layer {self.layer_id} "
                f"({self.slot_name}) takes {self.family.value} blueprints"
            )
        if blueprint not in self.registry:
            return f"blueprint {blueprint.value} is not implemented by this host"
        return None

    def _check_size(self, command: AdaptationCommand) -> str | None:
        """Whether the seed `command` asks for fits its max_seed_params (built on the meta device:
        no memory, and the RNG that initialises real seeds is not touched)."""
        limit = command.max_seed_params
        if limit <= 0 or command.blueprint is None:
            return None
        with torch.device("meta"):
            modules = [build_seed(command.blueprint, self.width, self.registry)]
            if command.blend is BlendAlgorithm.GATED:
                modules.append(Gate(self.width))
        size = sum(p.numel() for m in modules for p in m.parameters())
        if size > limit:
            return (
                f"a {command.blueprint.value} seed here has {size} parameters, over the command's "
                f"max_seed_params {limit} (layer {self.layer_id}, {self.slot_name})"
            )
        return None

    def apply(self, command: AdaptationCommand, val_accuracy: float = 0.0) -> str | None:
        """Apply `command` if it is legal here; returns the rejection reason, or None if applied.

        `val_accuracy` is the host's latest validation accuracy: a germination remembers it
        so that the seed's total improvement can be reported later.
        """
        reason = self.check(command)
        if reason is not None:
            return reason
        op = command.op
        if op is Op.GERMINATE:
            self._germinate(command, val_accuracy)
        elif op is Op.ADVANCE and self.stage is SeedStage.TRAINING:
            self._start_blending()
        elif op is Op.SET_ALPHA_TARGET:
            assert self.schedule is not None and command.alpha_target is not None
            self.schedule.set_target(
                command.alpha_target, command.alpha_speed, command.alpha_curve, self.steps_per_epoch
            )
            return None  # stays BLENDING
        elif op is Op.FOSSILIZE:
            self._fossilize()
        elif op is Op.PRUNE:
            self._prune()
        self.lifecycle.apply(op)
        return None

    def _germinate(self, command: AdaptationCommand, val_accuracy: float) -> None:
        assert command.blueprint is not None
        self.blueprint = command.blueprint
        self.seed = build_seed(command.blueprint, self.width, self.registry).to(self.device)
        self.blend = command.blend or BlendAlgorithm.LINEAR
        self.tempo = command.tempo or Tempo.STANDARD
        self.steepness = command.steepness or 1.0
        self.lr_multiplier = command.lr_multiplier or 1.0
        self.dwell = command.dwell_epochs
        default = IsolationMode.ISOLATED if self.family is BlueprintFamily.CNN else IsolationMode.SHARED
        self.isolation = command.isolation or default
        self.gate = Gate(self.width).to(self.device) if self.blend is BlendAlgorithm.GATED else None
        self.schedule = None
        self.accuracy_at_germination = val_accuracy
        self.counterfactual = self.total_improvement = 0.0
        self._forget_telemetry()
        self.train(self.training)

    def _start_blending(self) -> None:
        total = self.tempo.epochs * max(self.steps_per_epoch, 1)
        self.schedule = BlendSchedule(self.blend, total, steepness=self.steepness)

    def _fossilize(self) -> None:
        for p in self.seed_parameters():
            p.requires_grad_(False)

    def _prune(self) -> None:
        self.seed = self.gate = self.schedule = None
        self.blueprint = self.dwell = None
        self.counterfactual = self.total_improvement = 0.0
        self._forget_telemetry()

    def _forget_telemetry(self) -> None:
        """A new seed (or none): its predecessor's history says nothing about it."""
        self.gradients = SeedGradientLog()
        self.milestones = {}
        self.alpha_spread = self.grad_via_seed = self.grad_total = None

    # ------------------------------------------------------------ time

    def step(self) -> None:
        """One optimizer step happened: move the blend on."""
        if self.stage is SeedStage.BLENDING and self.schedule is not None:
            self.schedule.advance()

    def end_epoch(self, val_accuracy: float) -> SeedStage:
        """The epoch ended: update the improvement, then take automatic transitions."""
        if self.live:
            self.total_improvement = val_accuracy - self.accuracy_at_germination
            self.gradients.end_epoch()
        complete = self.schedule is not None and self.schedule.complete
        before = self.stage
        stage = self.lifecycle.end_epoch(blend_complete=complete, dwell=self.dwell)
        if before is SeedStage.TRAINING and stage is SeedStage.BLENDING:
            self._start_blending()  # the dwell is over: blend as ADVANCE would
        if stage is SeedStage.FOSSILIZED or stage is SeedStage.PROBATIONARY:
            self.train(self.training)
        return stage

    def extra_repr(self) -> str:
        bp = self.blueprint.value if self.blueprint else "-"
        return f"layer={self.layer_id}, {self.slot_name}, stage={self.stage.value}, blueprint={bp}"
