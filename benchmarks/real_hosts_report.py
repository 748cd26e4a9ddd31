"""The tables, goal checks and plot of `benchmarks/real_hosts.py`, from its per-run records."""

from __future__ import annotations

import argparse
import collections
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.hoststats import Interval, paired, spread
from esperd_examples.host.tasks import benchmark_task

#: The controllers that grow the host (the others are static controls).
GROWN = ("fixed", "random", "heuristic", "gnn-sim", "gnn-real", "gnn-online")
#: The A/A control: static small with another batch order, held to the safety check as a yardstick.
AA = "static-reshuffled"
LABELS = {
    "static-small": "static small",
    AA: "static small, reshuffled (A/A)",
    "static-large": "static large",
    "matched-heuristic": "static matched (heuristic)",
    "fixed": "fixed schedule",
    "random": "random",
    "heuristic": "heuristic",
    "gnn-sim": "GNN (sim)",
    "gnn-real": "GNN (real BC)",
    "gnn-online": "GNN (online)",
}


def _shown(path: str) -> str:
    """A path inside the repository relative to its root (the same on every clone)."""
    root = Path(__file__).resolve().parent.parent
    return str(Path(path).relative_to(root)) if Path(path).is_relative_to(root) else path


def label(controller: str) -> str:
    if controller in LABELS:
        return LABELS[controller]
    return f"static matched ({controller.removeprefix('matched-')})"


def by_seed(records: Sequence[dict[str, Any]], task: str, controller: str, key: str) -> dict[int, float]:
    return {r["seed"]: float(r[key]) for r in records if r["task"] == task and r["controller"] == controller}


def _mean(values: Any) -> float:
    values = list(values)
    return statistics.fmean(values) if values else float("nan")


class TaskResults:
    """One task's runs, summarised per controller and paired against the references."""

    def __init__(self, task: str, records: Sequence[dict[str, Any]], controllers: Sequence[str]) -> None:
        self.task = task
        self.spec = benchmark_task(task)
        self.records = [r for r in records if r["task"] == task]
        self.controllers = [c for c in controllers if any(r["controller"] == c for r in self.records)]
        self.small = by_seed(self.records, task, "static-small", "val_accuracy")
        self.heuristic = by_seed(self.records, task, "heuristic", "val_accuracy")
        self.static_spread = spread(list(self.small.values()))

    def acc(self, controller: str) -> dict[int, float]:
        return by_seed(self.records, self.task, controller, "val_accuracy")

    def values(self, controller: str, key: str) -> list[float]:
        return list(by_seed(self.records, self.task, controller, key).values())

    def versus(self, controller: str, reference: dict[int, float]) -> Interval:
        return paired(self.acc(controller), reference)

    def worst_vs_small(self, controller: str) -> float:
        diffs = [a - self.small[s] for s, a in self.acc(controller).items() if s in self.small]
        return min(diffs) if diffs else float("nan")

    def summary(self, controller: str) -> dict[str, Any]:
        acc = self.values(controller, "val_accuracy")
        return {
            "controller": controller,
            "seeds": len(acc),
            "val_accuracy_mean": _mean(acc),
            "val_accuracy_sd": spread(acc),
            "val_accuracy_worst": min(acc) if acc else float("nan"),
            "val_loss_mean": _mean(self.values(controller, "val_loss")),
            "total_params_mean": _mean(self.values(controller, "total_params")),
            "added_params_mean": _mean(self.values(controller, "added_params")),
            "wall_s_mean": _mean(self.values(controller, "wall_s")),
            "commands_mean": _mean(self.values(controller, "commands")),
            "rejected_mean": _mean(self.values(controller, "rejected")),
            "commands_total": int(sum(self.values(controller, "commands"))),
            "rejected_total": int(sum(self.values(controller, "rejected"))),
            "rejected_after_finish_total": int(sum(self.values(controller, "rejected_after_finish"))),
            "vs_static_small": _interval(self.versus(controller, self.small)),
            "vs_heuristic": _interval(self.versus(controller, self.heuristic)),
            "worst_seed_vs_static_small": self.worst_vs_small(controller),
        }

    def table(self) -> list[str]:
        small_params = self.spec.params()
        lines = [
            f"### {self.task}: {self.spec.summary}",
            "",
            f"Static small {small_params} parameters; {self._recipe()}. "
            f"Static small's seed-to-seed spread (sd): {self.static_spread * 100:.2f} points.",
            "",
            "| controller | val acc (mean ± sd) | worst seed | val loss | params | added | wall s "
            "| commands / run | rejected / run |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for c in self.controllers:
            s = self.summary(c)
            added_pct = s["added_params_mean"] / small_params * 100
            lines.append(
                f"| {label(c)} | {s['val_accuracy_mean']:.4f} ± {s['val_accuracy_sd']:.4f} "
                f"| {s['val_accuracy_worst']:.4f} | {s['val_loss_mean']:.4f} | {s['total_params_mean']:.0f} "
                f"| {s['added_params_mean']:+.0f} ({added_pct:+.0f}%) | {s['wall_s_mean']:.1f} "
                f"| {s['commands_mean']:.1f} | {s['rejected_mean']:.1f} |"
            )
        lines += [
            "",
            "Paired over seeds (accuracy points, mean [bootstrap 95% interval]); safety: the worst seed's "
            f"difference to static small against the static spread ({self.static_spread * 100:.2f}).",
            "",
            "| controller | Δ vs static small | Δ vs heuristic | worst seed vs static small | safety |",
            "|---|---|---|---|---|",
        ]
        for c in self.controllers:
            worst = self.worst_vs_small(c)
            safe = "—" if c not in (*GROWN, AA) else ("ok" if worst >= -self.static_spread else "**below**")
            lines.append(
                f"| {label(c)} | {self.versus(c, self.small).format()} "
                f"| {self.versus(c, self.heuristic).format()} "
                f"| {worst * 100:+.2f} | {safe} |"
            )
        lines += ["", *self._rejections(), ""]
        return lines

    def _recipe(self) -> str:
        epochs = {r["epochs"] for r in self.records}
        return f"{'/'.join(map(str, sorted(epochs)))} epochs, lr {self.spec.lr}, batch {self.spec.batch_size}"

    def _rejections(self) -> list[str]:
        lines = []
        for c in self.controllers:
            reasons: dict[str, int] = {}
            for r in self.records:
                if r["controller"] == c:
                    for reason, n in r["rejection_reasons"].items():
                        reasons[reason] = reasons.get(reason, 0) + n
            if reasons:
                top = sorted(reasons.items(), key=lambda kv: -kv[1])[:4]
                lines.append(f"- {label(c)} rejections: " + "; ".join(f'{n} x "{why}"' for why, n in top))
        return lines


#: The levers a GERMINATE carries (issue 16), as the command's fields; absent = the host's default.
GERMINATE_LEVERS = ("blend", "tempo", "dwell_epochs", "isolation", "lr_multiplier", "steepness")


def lever_counts(traces: Path, task: str, controller: str) -> dict[str, collections.Counter[str]]:
    """Per lever, how often each value went out in the GERMINATE commands of the controller's
    traced runs of the task ("default" where the command left it to the host), plus the counts
    of GERMINATE and SET_ALPHA_TARGET commands under "op"."""
    from esperd.ops.traces import read_trace

    counts: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for path in sorted((traces / task / controller).glob("*.jsonl*")):
        for record in read_trace(path):
            command = record.msg if record.channel == "command" else None
            if not command or command.get("op") not in ("germinate", "set_alpha_target"):
                continue
            counts["op"][command["op"]] += 1
            if command["op"] == "germinate":
                for lever in GERMINATE_LEVERS:
                    value = command.get(lever)
                    counts[lever]["default" if value is None else str(value)] += 1
    return counts


def lever_lines(traces: Path | None, tasks: Sequence[str], controllers: Sequence[str]) -> list[str]:
    """A table of the lever values each growing controller sent, over every task (from the traces)."""
    if traces is None or not traces.exists():
        return []
    rows = []
    for controller in (c for c in controllers if c in GROWN):
        total: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        for task in tasks:
            for lever, counter in lever_counts(traces, task, controller).items():
                total[lever].update(counter)
        if not total["op"]:
            continue
        cells = [", ".join(f"{v} ({n})" for v, n in total[lever].most_common()) for lever in GERMINATE_LEVERS]
        ops = total["op"]
        rows.append(
            f"| {label(controller)} | {ops['germinate']} | {' | '.join(cells)} | {ops['set_alpha_target']} |"
        )
    if not rows:
        return []
    return [
        "### Levers sent (from the traces, every task)",
        "",
        "The optional levers of each GERMINATE (issue 16; `default`: left to the host), and how many "
        "SET_ALPHA_TARGET commands went out.",
        "",
        "| controller | GERMINATEs | blend | tempo | dwell | isolation | LR multiplier | steepness "
        "| SET_ALPHA_TARGETs |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]


def _interval(interval: Interval) -> dict[str, float]:
    return {"mean": interval.mean, "low": interval.low, "high": interval.high, "n": interval.n}


# ------------------------------------------------------------------ goals


def goal_lines(results: list[TaskResults]) -> list[str]:
    n = len(results)
    lines = ["## The issue's goals", ""]
    online = [r for r in results if "gnn-online" in r.controllers]
    if online:
        wins = [r.task for r in online if _wins(r.versus("gnn-online", r.heuristic))]
        verdict = "holds" if len(wins) >= 2 else "does not hold"
        lines.append(
            f"- GNN after online fine-tuning beats the heuristic on >= 2 of 3 tasks: **{verdict}** "
            f"(wins on {wins or 'none'} of {[r.task for r in online]})."
        )
    else:
        lines.append(
            "- GNN after online fine-tuning beats the heuristic: **not evaluated** "
            "(no fine-tuned checkpoint)."
        )
    heuristic = [r for r in results if "heuristic" in r.controllers]
    wins = [r.task for r in heuristic if _wins(r.versus("heuristic", r.small))]
    verdict = "holds" if len(wins) >= 2 else "does not hold"
    lines.append(
        f"- The heuristic beats static small on >= 2 of 3 tasks: **{verdict}** "
        f"(wins on {wins or 'none'} of {n})."
    )
    lines.append(
        "- A grown model within 0.5 points of static large with <= 70% of its parameters, "
        f"beating static matched: {_goal3(results)}"
    )
    unsafe = [
        f"{label(c)} on {r.task} ({r.worst_vs_small(c) * 100:+.2f} vs -{r.static_spread * 100:.2f})"
        for r in results
        for c in r.controllers
        if c in GROWN and r.worst_vs_small(c) < -r.static_spread
    ]
    lines.append(
        "- Safety (no controller's worst seed below static small by more than static small's spread): "
        + (
            "**holds** for every controller and task."
            if not unsafe
            else "**fails** for " + "; ".join(unsafe) + "."
        )
    )
    return lines + _aa_lines(results) + [""]


def _aa_lines(results: list[TaskResults]) -> list[str]:
    """How the safety check treats a change that cannot hurt: the A/A control against it."""
    checked = [r for r in results if AA in r.controllers]
    if not checked:
        return []
    worst = ", ".join(
        f"{r.task} {r.worst_vs_small(AA) * 100:+.2f} (spread {r.static_spread * 100:.2f}, "
        f"mean {r.versus(AA, r.small).format()})"
        for r in checked
    )
    flagged = [r.task for r in checked if r.worst_vs_small(AA) < -r.static_spread]
    verdict = f"the check flags it on {flagged}" if flagged else "the check passes it everywhere"
    beyond = [
        f"{label(c)} on {r.task} ({r.worst_vs_small(c) * 100:+.2f} vs {r.worst_vs_small(AA) * 100:+.2f})"
        for r in checked
        for c in r.controllers
        if c in GROWN and r.worst_vs_small(c) < min(r.worst_vs_small(AA), -r.static_spread)
    ]
    return [
        "- The A/A control (static small, same init, another batch order: it cannot hurt) against the "
        f"safety check, worst seed vs static small: {worst}; {verdict}. A controller flagged by less "
        "than the A/A control's margin is not distinguishable from a harmless perturbation.",
        "- Worst seed below both the static spread and the A/A control's worst seed: "
        + ("; ".join(beyond) + "." if beyond else "none."),
    ]


def _wins(interval: Interval) -> bool:
    return interval.n > 1 and interval.mean > 0 and interval.low > 0


def _goal3(results: list[TaskResults]) -> str:
    found, near = [], []
    for r in results:
        large = r.acc("static-large")
        if not large:
            continue
        large_acc, large_params = _mean(large.values()), _mean(r.values("static-large", "total_params"))
        for c in r.controllers:
            if c not in GROWN:
                continue
            acc, params = _mean(r.acc(c).values()), _mean(r.values(c, "total_params"))
            close, lean = acc >= large_acc - 0.005, params <= 0.7 * large_params
            matched = f"matched-{c}" if f"matched-{c}" in r.controllers else None
            beats = matched is not None and _wins(r.versus(c, r.acc(matched)))
            text = (
                f"{label(c)} on {r.task}: {acc:.4f} vs large {large_acc:.4f}, "
                f"{params:.0f} params = {params / large_params:.0%} of large"
            )
            if close and lean and beats:
                found.append(text)
            elif close and lean:
                near.append(
                    text + (f" (not better than {label(matched)})" if matched else " (no matched arm)")
                )
    if found:
        return "**holds**: " + "; ".join(found) + "."
    if near:
        return "**does not hold** (close and lean, but static matched not beaten: " + "; ".join(near) + ")."
    return "**does not hold** (no grown model within 0.5 points of static large at <= 70% of its parameters)."


# ------------------------------------------------------------------ files


def write_results(
    records: list[dict[str, Any]],
    tasks: Sequence[str],
    controllers: Sequence[str],
    seeds: Sequence[int],
    settings: Any,
    notes: Sequence[str],
    args: argparse.Namespace,
) -> list[Path]:
    results = [TaskResults(task, records, controllers) for task in tasks]
    command = " ".join([".venv/bin/python", "benchmarks/real_hosts.py", *args.argv])
    lines = [
        "# Controllers on real training runs",
        "",
        f"`{command}`",
        "",
        f"Run seeds {list(seeds)} (task recipes tuned on seeds 100 and up), {args.jobs} runs at once, "
        "one torch thread each. Every run speaks the wire contract to a real nats-server; esperd controllers "
        f"are esperd services (scheduler {settings.scheduler}, the host waits {settings.epoch_pause_s} s "
        "for commands after "
        "each state packet). Static matched is matched per seed to the final parameter count of that seed's "
        "heuristic run. GNNs are served "
        + ("sampling" if args.gnn_sampling else "argmax (deterministic)")
        + ". Commands per run are what the host received (sent by the controller), "
        "rejections what it refused.",
        "",
        *[f"- {note}" for note in notes],
        "",
        *goal_lines(results),
    ]
    for r in results:
        lines += r.table()
    lines += lever_lines(getattr(args, "traces", None), tasks, controllers)
    for controller in ("gnn-sim", "gnn-real", "gnn-online"):
        if controller in settings.gnn:
            served = settings.gnn[controller]
            shown = _shown(served["checkpoint"])
            lines.append(f"{label(controller)} checkpoint: `{shown}` ({served['sha256']}).")
    md = args.out / "real_hosts.md"
    md.write_text("\n".join(lines) + "\n")
    raw = args.out / "real_hosts.json"
    raw.write_text(
        json.dumps(
            {
                "command": command,
                "seeds": list(seeds),
                "settings": {"epochs": settings.epochs, "gnn": settings.gnn, "scheduler": settings.scheduler},
                "notes": list(notes),
                "summary": {r.task: [r.summary(c) for c in r.controllers] for r in results},
                "static_spread": {r.task: r.static_spread for r in results},
                "runs": records,
            },
            indent=1,
        )
    )
    paths = [md, raw]
    if not args.no_plot:
        paths.append(plot(results, args.out / "real_hosts.png"))
    return paths


def plot(results: list[TaskResults], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.2 * len(results), 4.4), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = "osD^vPX*<>"  # distinct shapes: static and grown arms often end at the same point
    for ax, r in zip(axes[0], results, strict=True):
        statics = []
        for i, c in enumerate(r.controllers):
            params = r.values(c, "total_params")
            acc = r.values(c, "val_accuracy")
            color = colors[i % len(colors)]
            marker = markers[i % len(markers)]
            ax.scatter(params, acc, s=10, alpha=0.3, color=color, marker=marker)
            ax.errorbar(
                _mean(params), _mean(acc), xerr=spread(params), yerr=spread(acc),
                fmt=marker, color=color, capsize=3, label=label(c), markerfacecolor="none", markersize=8,
            )  # fmt: skip
            if c.startswith("static") or c.startswith("matched"):
                statics.append((_mean(params), _mean(acc)))
        if len(statics) > 1:
            xs, ys = zip(*sorted(statics), strict=True)
            ax.plot(xs, ys, "--", color="grey", linewidth=1)
        ax.set_title(f"{r.task}")
        ax.set_xlabel("parameters at the end")
        ax.set_ylabel("final validation accuracy")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
