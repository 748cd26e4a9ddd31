"""`esperd train`'s command line, generated from one table of options.

Each option names the field of OfflineTrainingSpec it sets ("imitation.steps": a field of a
nested config), and its default is that field's default, shown in the help by argparse's
`%(default)s`: a default is written once, in esperd.train.spec (or in the config Struct it
comes from). Options without a field (`--threads`, `--config`, `--quiet`'s summary, and the two
that need the loaded config: `--sim-config`, `--eval-reward`) are handled in `spec_from_args`
and `main`.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from esperd.train.spec import (
    ALGORITHMS,
    DEFAULT_UPDATES,
    LEARNABLE_POLICIES,
    OfflineTrainingSpec,
    TrainError,
)
from esperd.train.warmstart import REFERENCES


def _argument(
    convert: Callable[[str], float], ok: Callable[[float], bool], expected: str
) -> Callable[[str], float]:
    """An argparse `type=` that converts with `convert` and refuses values `ok` rejects."""

    def parse(text: str) -> float:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


_positive_int = _argument(int, lambda v: v >= 1, "a positive integer")
_non_negative_int = _argument(int, lambda v: v >= 0, "an integer >= 0")
_positive_float = _argument(float, lambda v: v > 0 and math.isfinite(v), "a positive number")
_fraction = _argument(float, lambda v: 0.0 <= v < 1.0, "a fraction in [0, 1)")
_non_negative_float = _argument(float, lambda v: v >= 0 and math.isfinite(v), "a number >= 0")

_UNSET = object()


@dataclass(frozen=True)
class Option:
    """One `esperd train` option. `field`: what it sets in OfflineTrainingSpec (None: the command
    line's own); its default is that field's, unless `default` is given (options without a field)."""

    flags: tuple[str, ...]
    field: str | None
    help: str
    type: Callable[[str], Any] | None = None
    metavar: str | None = None
    choices: Sequence[str] | None = None
    flag: bool = False  # a switch (store_true)
    invert: bool = False  # the switch sets its field to False (`--quiet`: progress)
    required: bool = False
    exclusive: str | None = None  # options sharing this name exclude one another
    dest: str | None = None
    default: Any = _UNSET


OPTIONS: tuple[Option, ...] = (
    Option(("--algo",), "algo", "learning algorithm", choices=ALGORITHMS, required=True),
    Option(
        ("--experience",),
        "experience",
        "a saved buffer (<state_dir>/learner/buffer.safetensors)",
        metavar="PATH",
    ),
    Option(("--sim",), "sim", "learn against the simulator", flag=True),
    Option(
        ("--sim-config",),
        None,
        "simulator parameters (e.g. from `esperd sim calibrate`); the reward still comes from "
        "the [learner.rewards] config",
        metavar="TOML",
    ),
    Option(("--policy",), "policy", "policy to train (default %(default)s)", choices=LEARNABLE_POLICIES),
    Option(
        ("--updates",),
        "updates",
        f"learner updates (default {DEFAULT_UPDATES})",
        type=_positive_int,
        metavar="N",
        exclusive="budget",
    ),
    Option(
        ("--steps",),
        "steps",
        "env steps (--sim), or transitions trained on (experience only)",
        type=_positive_int,
        metavar="N",
        exclusive="budget",
    ),
    Option(("--envs",), "envs", "simulated runs (default %(default)s)", type=_positive_int, metavar="N"),
    Option(
        ("--eval-every",),
        "eval_every",
        "updates between evaluations (%(default)s)",
        type=_positive_int,
        metavar="K",
    ),
    Option(
        ("--eval-episodes",),
        "eval_episodes",
        "simulator episodes per evaluation (%(default)s)",
        type=_non_negative_int,
        metavar="M",
    ),
    Option(
        ("--eval-sample",),
        "eval_deterministic",
        "evaluate the sampling policy instead of argmax",
        flag=True,
        invert=True,
    ),
    Option(
        ("--eval-reward",),
        None,
        "reward mode of the evaluation (default: training's)",
        choices=("basic", "sparse", "shaped"),
    ),
    Option(("--holdout",), "holdout", "held-out fraction of runs (%(default)s)", type=_fraction, metavar="F"),
    Option(
        ("--unroll",),
        "unroll",
        "IMPALA --sim: steps per env per round (%(default)s)",
        type=_positive_int,
        metavar="T",
    ),
    Option(
        ("--replay-ratio",),
        "replay_ratio",
        "IMPALA --sim: samples per new transition (%(default)g)",
        type=_positive_float,
        metavar="R",
    ),
    Option(
        ("--seq-len",),
        "sequence_length",
        "IMPALA: replay unrolls of L consecutive steps, V-trace over each (%(default)s: single steps)",
        type=_positive_int,
        metavar="L",
        dest="seq_len",
    ),
    Option(
        ("--warm-start",),
        "warm_start",
        "first fit the policy to this reference policy's decisions in the simulator (behaviour cloning)",
        choices=REFERENCES,
    ),
    Option(
        ("--warm-start-steps",),
        "warm_start_steps",
        "simulator steps the reference plays for the warm start (%(default)s)",
        type=_positive_int,
        metavar="N",
    ),
    Option(
        ("--warm-start-updates",),
        "imitation.steps",
        "behaviour-cloning optimizer steps (%(default)s)",
        type=_positive_int,
        metavar="N",
    ),
    Option(
        ("--lever-smoothing",),
        "imitation.lever_smoothing",
        "warm start: label smoothing of the GERMINATE levers, so RL still samples others (%(default)s)",
        type=_fraction,
        metavar="EPS",
    ),
    Option(
        ("--anchor-coef",),
        "anchor_coef",
        "PPO after a warm start: weight of a behaviour-cloning term on the demonstrations, "
        "decaying to 0 over --anchor-updates (%(default)s: none)",
        type=_non_negative_float,
        metavar="C",
    ),
    Option(
        ("--anchor-updates",),
        "anchor_updates",
        "updates over which the anchor decays (%(default)s)",
        type=_positive_int,
        metavar="N",
    ),
    Option(("--out",), "out", "output directory (default ./%(default)s)", metavar="DIR"),
    Option(("--device",), "device", "torch device (default %(default)s)", metavar="cpu|cuda|auto"),
    Option(("--seed",), "seed", "seeds init, simulator and sampling (%(default)s)", type=int, metavar="S"),
    Option(
        ("--threads",),
        None,
        "torch intra-op threads (%(default)s: half the cores)",
        type=_non_negative_int,
        metavar="N",
        default=0,
    ),
    Option(("--config", "-c"), None, "TOML with [policy] / [learner]", metavar="FILE", dest="train_config"),
    Option(("--quiet", "-q"), "progress", "no progress bar or summary", flag=True, invert=True),
)

#: Where the option defaults come from: a spec with every field at its default (`algo` is
#: required on the command line, so its value here is never used).
_DEFAULTS = OfflineTrainingSpec(algo=ALGORITHMS[0])


def field_default(path: str) -> Any:
    """The default of a spec field, or of a nested config's field ("imitation.steps")."""
    value: Any = _DEFAULTS
    for name in path.split("."):
        value = getattr(value, name)
    return value


def dest_of(option: Option) -> str:
    return option.dest or option.flags[0].lstrip("-").replace("-", "_")


def add_arguments(parser: Any) -> None:
    """The `esperd train` options (on an argparse parser), from OPTIONS."""
    groups: dict[str, Any] = {}
    for option in OPTIONS:
        target = parser
        if option.exclusive is not None:
            if option.exclusive not in groups:
                groups[option.exclusive] = parser.add_mutually_exclusive_group()
            target = groups[option.exclusive]
        kwargs: dict[str, Any] = {"help": option.help}
        if option.dest is not None:
            kwargs["dest"] = option.dest
        if option.flag:
            kwargs["action"] = "store_true"
        else:
            kwargs.update(type=option.type, metavar=option.metavar, choices=option.choices)
            if option.required:
                kwargs["required"] = True
            elif option.default is not _UNSET:
                kwargs["default"] = option.default
            elif option.field is not None:
                kwargs["default"] = field_default(option.field)
        target.add_argument(*option.flags, **{k: v for k, v in kwargs.items() if v is not None})


def spec_from_args(args: Any, config_path: str | None) -> OfflineTrainingSpec:
    """An OfflineTrainingSpec from parsed `esperd train` arguments (ConfigError propagates)."""
    from esperd.config import load_config

    config = load_config(config_path)
    learner = config.learner
    fields: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for option in OPTIONS:
        if option.field is None:
            continue
        value = getattr(args, dest_of(option))
        if option.invert:
            value = not value
        name, _, inner = option.field.partition(".")
        if inner:
            nested.setdefault(name, {})[inner] = value
        else:
            fields[name] = value
    for name, values in nested.items():  # a nested config made from its options alone
        fields[name] = type(field_default(name))(**values)
    sim_config = None
    if getattr(args, "sim_config", None):
        from esperd.sim.calibrate import load_sim_config

        try:
            sim_config = msgspec.structs.replace(load_sim_config(args.sim_config), reward=learner.rewards)
        except ValueError as exc:
            raise TrainError(str(exc)) from None
    eval_reward = None
    if args.eval_reward is not None:
        eval_reward = msgspec.structs.replace(learner.rewards, mode=args.eval_reward)
    return OfflineTrainingSpec(
        **fields,
        policy_config=config.policy,
        learner=learner,
        eval_reward=eval_reward,
        sim_config=sim_config,
    )


def main(args: Any, config_path: str | None) -> int:
    """`esperd train`: 0 on success, 2 on bad input."""
    import torch

    from esperd.config import ConfigError
    from esperd.train.driver import train

    threads = args.threads or max(1, (os.cpu_count() or 2) // 2)
    torch.set_num_threads(threads)
    try:
        spec = spec_from_args(args, config_path)
        result = train(spec)
    except (ConfigError, TrainError) as exc:
        print(f"esperd train: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # a bad file (BufferFileError, CheckpointError) is an input error too
        from esperd.learn.persist import BufferFileError
        from esperd.policy.checkpoint import CheckpointError

        if isinstance(exc, (BufferFileError, CheckpointError)):
            print(f"esperd train: {exc}", file=sys.stderr)
            return 2
        raise
    if not args.quiet:
        best = f"{result.best_metric} {result.best_value:.4f} at update {result.best_update}"
        print(
            f"esperd train: {result.updates} updates, {result.env_steps} env steps, {result.samples} samples "
            f"in {result.seconds:.1f}s; best {best}\n"
            f"  best  {result.best_path}\n  last  {result.last_path}\n"
            f"  serve with the [policy] section in {result.out / 'policy.toml'}",
            file=sys.stderr,
        )
    return 0
