"""Offline training: `esperd train`, from a saved experience buffer and/or against the simulator.

The manual is docs/training.md. One module per job:

    spec        OfflineTrainingSpec (what a run is asked to do) and its validation, TrainError
    device      which torch device the run uses
    rollout     the training policy acting in the simulator (transitions for the learner)
    evaluation  the held-out set and the simulator evaluation
    driver      `train`: TrainingRun's loop of updates and evaluations, best/last checkpoints
    policytoml  the daemon's [policy] section for the best checkpoint (<out>/policy.toml)
    cli         the `esperd train` options, generated from one table, and its entry point
    warmstart   `--warm-start`: clone a reference policy into the training policy first
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from esperd.lazy import lazy_exports

if TYPE_CHECKING:
    from esperd.train.cli import add_arguments, main, spec_from_args
    from esperd.train.device import resolve_device
    from esperd.train.driver import TrainingRun, TrainResult, train
    from esperd.train.evaluation import HeldOut, evaluate_heldout, evaluate_sim, make_heldout, split_holdout
    from esperd.train.rollout import collect
    from esperd.train.spec import OfflineTrainingSpec, TrainError

_EXPORTS = {
    "HeldOut": "evaluation",
    "OfflineTrainingSpec": "spec",
    "TrainError": "spec",
    "TrainResult": "driver",
    "TrainingRun": "driver",
    "add_arguments": "cli",
    "collect": "rollout",
    "evaluate_heldout": "evaluation",
    "evaluate_sim": "evaluation",
    "main": "cli",
    "make_heldout": "evaluation",
    "resolve_device": "device",
    "spec_from_args": "cli",
    "split_holdout": "evaluation",
    "train": "driver",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(globals(), _EXPORTS)
