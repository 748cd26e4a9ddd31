"""Action masks and stage tables as numpy lookups, built once from the contracts."""

from __future__ import annotations

from collections.abc import Iterable

import msgspec
import numpy as np

from esperd.analyzer.observation import BLUEPRINTS, OP_INDEX, OPS, STAGE_INDEX, STAGES, Observation
from esperd_contracts import LEGAL_OPS, BlueprintFamily, Op, SeedStage

#: [stage index, op index] -> legal. WAIT is legal from every stage (LEGAL_OPS says so).
STAGE_OP_MASK: np.ndarray = np.array([[op in LEGAL_OPS[stage] for op in OPS] for stage in STAGES], dtype=bool)
STAGE_OP_MASK.flags.writeable = False

#: family -> [blueprint index] -> fits.
FAMILY_BLUEPRINT_MASK: dict[BlueprintFamily, np.ndarray] = {
    family: np.array([bp.family is family for bp in BLUEPRINTS], dtype=bool) for family in BlueprintFamily
}

#: One-hot rows of the stage columns of the node features.
STAGE_ONE_HOT: np.ndarray = np.eye(len(STAGES), dtype=np.float32)

#: Stages in which a seed is alive but not yet permanent.
_LIVE = (SeedStage.GERMINATED, SeedStage.TRAINING, SeedStage.BLENDING, SeedStage.PROBATIONARY)
LIVE_STAGE: np.ndarray = np.array([stage in _LIVE for stage in STAGES], dtype=bool)

GERMINATE = OP_INDEX[Op.GERMINATE]
WAIT = OP_INDEX[Op.WAIT]
DORMANT = STAGE_INDEX[SeedStage.DORMANT]


def op_mask(stages: np.ndarray, can_germinate: np.ndarray) -> np.ndarray:
    """Legal ops per node: by the slot's stage, and GERMINATE only where the layer has a seed slot."""
    mask: np.ndarray = STAGE_OP_MASK[stages]  # fancy indexing copies, so the table stays intact
    mask[:, GERMINATE] &= can_germinate
    return mask


def mask_cooling(observation: Observation, layers: Iterable[int]) -> Observation:
    """The observation with every op but WAIT masked out on the given layers."""
    layer_set = set(layers)
    if not layer_set:
        return observation
    # A few layers against a few dozen ids: a Python pass costs a tenth of np.isin's set-up.
    rows = [i for i, layer_id in enumerate(observation.layer_ids.tolist()) if layer_id in layer_set]
    if not rows:
        return observation
    ops = observation.op_mask.copy()
    ops[rows] = False
    ops[rows, WAIT] = True
    return msgspec.structs.replace(observation, op_mask=ops)
