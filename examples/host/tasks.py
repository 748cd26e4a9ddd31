"""Benchmark tasks: real host tasks where capacity limits accuracy, and their static variants.

A `TaskSpec` fixes one host task (data and model family, `data.py` / `models.py`), its
training recipe and the widths of the static controls of `../shared/EVIDENCE.md`:

    small     the host as it starts: what a controller grows (`spec.config(seed)`)
    large     about twice the small model's parameters (`spec.config(seed, width=spec.large_width)`)
    matched   a static model with a given parameter count (`spec.width_for_params(n)`)

Each runs offline on CPU in seconds with one torch thread. The recipes were tuned on run
seeds 100 and up; benchmarks report seeds 0 and up. `benchmarks/germination_sweep.py`
shows, per task, which layer is the bottleneck (where a seed helps most).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

from esperd_contracts import BlendAlgorithm, Blueprint, BlueprintFamily, Tempo
from esperd_examples.host.data import load_task
from esperd_examples.host.models import build_model
from esperd_examples.host.schedule import Germination
from esperd_examples.host.train import HostConfig


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """One benchmark task: which host, how it trains, and its small and large widths."""

    name: str
    task: str  # esperd_examples.host.data.TASKS
    summary: str
    width: float  # static small: the host as it starts
    epochs: int
    lr: float
    batch_size: int
    depth: int | None = None
    bottleneck: str = ""  # the layer where the germination sweep found seeds help most

    def config(self, seed: int, *, width: float | None = None, **fields: object) -> HostConfig:
        """This task's HostConfig for one run seed (the small model unless `width` is given)."""
        base = HostConfig(
            task=self.task,
            width=self.width if width is None else width,
            depth=self.depth,
            epochs=self.epochs,
            seed=seed,
            lr=self.lr,
            batch_size=self.batch_size,
        )
        return replace(base, **fields)  # type: ignore[arg-type]

    @property
    def large_width(self) -> float:
        """Static large: the width whose parameter count is nearest twice the small model's."""
        return self.width_for_params(2 * self.params())

    def params(self, width: float | None = None) -> int:
        """Parameters of the static model at `width` (the small one by default)."""
        return _param_count(self.task, self.width if width is None else width, self.depth)

    def width_for_params(self, params: int) -> float:
        """The width whose static model has the parameter count nearest to `params`.

        Parameter counts are a step function of the width (channels round), so this
        bisects for the first width at or above `params` and returns it or the width
        just below, whichever is nearer.
        """
        if params <= 0:
            raise ValueError(f"params must be positive, got {params}")
        lo, hi = self.width / 16, self.width * 16
        if self.params(hi) < params:
            raise ValueError(f"{params} parameters is beyond {self.name}'s widths (max {self.params(hi)})")
        if self.params(lo) >= params:
            return lo
        for _ in range(40):
            mid = (lo + hi) / 2
            if self.params(mid) >= params:
                hi = mid
            else:
                lo = mid
        above, below = self.params(hi), self.params(lo)
        return hi if above - params <= params - below else lo

    def fixed_schedule(self) -> list[Germination]:
        """The fixed-schedule control: one seed per slotted layer, the same rule on every task.

        Every layer with a seed slot gets its family's default blueprint (`FIXED_BLUEPRINT`)
        at epoch 2, trains 2 epochs, blends over the standard tempo and is fossilized: capacity
        added everywhere, early, with no telemetry and no choice of where or what.
        """
        model = build_model(self.task, load_task(self.task).classes, width=self.width, depth=self.depth)
        return [
            Germination(
                layer.name,
                FIXED_BLUEPRINT[layer.slot.family],
                epoch=2,
                train_epochs=2,
                blend=BlendAlgorithm.SIGMOID,
                tempo=Tempo.STANDARD,
            )
            for layer in model.layers
            if layer.slot is not None
        ]


#: The blueprint the fixed schedule germinates, per family (a mid-sized seed of each).
FIXED_BLUEPRINT: dict[BlueprintFamily, Blueprint] = {
    BlueprintFamily.CNN: Blueprint.CONV_LIGHT,
    BlueprintFamily.TRANSFORMER: Blueprint.MLP_SMALL,
}


@functools.lru_cache(maxsize=4096)
def _param_count(task: str, width: float, depth: int | None) -> int:
    return build_model(task, load_task(task).classes, width=width, depth=depth).total_param_count()


BENCHMARK_TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(
            name="digits",
            task="digits",
            summary="scikit-learn digits, the residual CNN at stem width 2",
            width=2,
            epochs=24,
            lr=0.02,
            batch_size=64,
            bottleneck="block3",
        ),
        TaskSpec(
            name="sort",
            task="sort",
            summary="sort 8 tokens of 10 (per-position accuracy), a one-block transformer at d=8",
            width=8,
            depth=1,
            epochs=20,
            lr=0.1,
            batch_size=64,
            bottleneck="attn1",
        ),
        TaskSpec(
            name="teacher",
            task="teacher",
            summary="an MLP student (3 x 8 units) of a random tanh teacher, 8 features, 5 classes",
            width=8,
            epochs=15,
            lr=0.05,
            batch_size=64,
            bottleneck="fc1",
        ),
    )
}


def benchmark_task(name: str) -> TaskSpec:
    """The benchmark task `name`; KeyError lists the known ones."""
    try:
        return BENCHMARK_TASKS[name]
    except KeyError:
        raise KeyError(f"unknown benchmark task {name!r}; known: {', '.join(BENCHMARK_TASKS)}") from None
