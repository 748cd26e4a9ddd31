"""Action rows for the policy tests: what a legal row is, and every row a distribution can draw."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

from esperd.analyzer.observation import (
    ACTION_WIDTH,
    LEVER_COLUMN,
    LEVERS,
    OP_INDEX,
    OPS,
    Observation,
    counted_levers,
)
from esperd_contracts import Op

WAIT = OP_INDEX[Op.WAIT]
GERMINATE = OP_INDEX[Op.GERMINATE]
_CHOICES = dict(LEVERS)


def row(node: int, op: int, **levers: int) -> list[int]:
    """An action row with the given levers' indices (observation.LEVERS names), else 0."""
    out = [node, op] + [0] * (ACTION_WIDTH - 2)
    for name, index in levers.items():
        out[LEVER_COLUMN[name]] = index
    return out


def legality_problem(obs: Observation, action: Sequence[int], *, choosable: bool = False) -> str | None:
    """Why `action` is not one a policy may emit for `obs` (None when it is): the node exists, the
    op is legal there, a GERMINATE's blueprint fits the layer, every lever is a valid index, and
    every lever the op does not sample is 0 (a lever is set only where it means something).
    `choosable`: also the neural sampler's rule, that the node has something to do (node 0 and
    WAIT when no node has)."""
    if len(action) != ACTION_WIDTH:
        return f"{len(action)} columns, not {ACTION_WIDTH}"
    node, op = int(action[0]), int(action[1])
    if not 0 <= node < obs.num_nodes:
        return f"node {node} outside [0, {obs.num_nodes})"
    if not 0 <= op < len(OPS) or not obs.op_mask[node, op]:
        return f"op {op} illegal at node {node} (stage {obs.stages[node]})"
    actionable = obs.op_mask[:, [i for i in range(len(OPS)) if i != WAIT]].any(axis=1)
    if choosable and actionable.any() and not actionable[node]:
        return f"node {node} has nothing but WAIT while others could act"
    if choosable and not actionable.any() and (node, op) != (0, WAIT):
        return "nothing to do anywhere, but not WAIT on node 0"
    counted = set(counted_levers(OPS[op], int(action[LEVER_COLUMN["blend"]])))
    for name, choices in LEVERS:
        index = int(action[LEVER_COLUMN[name]])
        if not 0 <= index < len(choices):
            return f"{name} index {index} outside [0, {len(choices)})"
        if name not in counted and index != 0:
            return f"{name} set ({index}) with {OPS[op].value}, which does not carry it"
    if op == GERMINATE and not obs.blueprint_mask[node, action[LEVER_COLUMN["blueprint"]]]:
        return f"blueprint {action[LEVER_COLUMN['blueprint']]} does not fit node {node}"
    return None


def every_action(obs: Observation, nodes: Sequence[int]) -> Iterator[list[int]]:
    """Every action row at `nodes` whose op is legal there, with every combination of the levers
    that op samples (blueprints: those that fit), the others 0."""
    for node, op in itertools.product(nodes, range(len(OPS))):
        if not obs.op_mask[node, op]:
            continue
        for blend in range(len(_CHOICES["blend"])) if OPS[op] is Op.GERMINATE else [0]:
            names = [n for n in counted_levers(OPS[op], blend) if n != "blend"]
            ranges = [
                [b for b in range(len(_CHOICES[n])) if obs.blueprint_mask[node, b]]
                if n == "blueprint"
                else range(len(_CHOICES[n]))
                for n in names
            ]
            for combo in itertools.product(*ranges):
                levers = dict(zip(names, combo, strict=True))
                if OPS[op] is Op.GERMINATE:
                    levers["blend"] = blend
                yield row(node, op, **levers)
