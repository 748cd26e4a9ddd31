"""The factored, masked action distribution shared by the neural policies.

Per node the network emits one row of NODE_HEAD_DIM logits, split as
(priority | op | blueprint | blend | tempo | dwell | isolation | lr | steepness |
alpha target | alpha speed | alpha curve). Per run (graph):

  node      ~ softmax over the priorities of nodes that have a legal non-WAIT op
              (if none has, node 0 only: the decision is then WAIT on node 0);
  op        ~ softmax over that node's op logits, illegal ops masked out;
  levers    ~ that node's lever logits (blueprint masked to those that fit), each counted only
              where it means something (base.counted_levers): blueprint, blend, tempo, dwell,
              isolation and LR multiplier with GERMINATE, steepness with GERMINATE and a
              sigmoid blend, alpha target / speed / curve with SET_ALPHA_TARGET. An uncounted
              lever is 0 in the action row and adds nothing to its log-probability, in
              sampling and in `log_prob` alike, so PPO and V-trace ratios see the same terms.

log p(a) = log p(node) + log p(op|node) + sum over the counted levers l of log p(l|node)

Entropy is the exact entropy of that joint distribution:
  H = H(node) + sum_n p(n) * (H(op|n) + p(GERMINATE|n) * (sum_germinate H(l|n) + p(sigmoid|n) H(steep|n))
                              + p(SET_ALPHA_TARGET|n) * sum_alpha H(l|n)).

Masked logits are set to the most negative finite float rather than -inf: their
probability is still exactly 0 (exp underflows), but 0 * log 0 stays finite in the
forward and backward pass, so entropy gradients never turn into NaN.

At 20 nodes every torch op costs microseconds of dispatch for nanoseconds of math,
so the code keeps the op count low: one masked_fill for all heads (the mask comes
precomputed from collate), the per-node conditional log-probs in one [N, 53] table
so a chosen node's row is one gather, one Gumbel noise draw for all heads, and
`sample_scored` returns log-prob, confidence and urgency from the rows it sampled.
The serving path (`sample_actions`) goes further for batches of a few graphs: it
evaluates the distribution in Python floats for the chosen action only, drawing each
categorical by inverting its CDF (the same distribution as Gumbel-max, from one uniform
number per categorical).
"""

from __future__ import annotations

import bisect
import itertools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from esperd.analyzer.observation import (
    ALPHA_LEVERS,
    BLEND_INDEX,
    GERMINATE_LEVERS,
    LEVERS,
    OP_INDEX,
    SIGMOID_LEVERS,
)
from esperd.policy.base import ACTION_WIDTH, BLEND, NODE, OP
from esperd.policy.batch import HEAD_SIZES, NODE_HEAD_DIM, GraphBatch
from esperd_contracts import BlendAlgorithm, Op

__all__ = ["HEAD_SIZES", "NODE_HEAD_DIM", "FactoredDistribution", "SampledActions", "sample_actions"]

_GERMINATE = OP_INDEX[Op.GERMINATE]
_SET_ALPHA = OP_INDEX[Op.SET_ALPHA_TARGET]
_SIGMOID = BLEND_INDEX[BlendAlgorithm.SIGMOID]
_MIN = torch.finfo(torch.float32).min
_TINY = torch.finfo(torch.float32).tiny
#: Column sizes of the per-node table of conditional log-probs: op, then each lever, and where
#: each starts (a chosen op / lever's column is its index plus its head's offset).
_TABLE_SIZES = HEAD_SIZES[1:]
_TABLE_STARTS = [sum(_TABLE_SIZES[:i]) for i in range(len(_TABLE_SIZES))]
_TABLE_SLICES = tuple(
    slice(start, start + size) for start, size in zip(_TABLE_STARTS, _TABLE_SIZES, strict=True)
)
_TABLE_OFFSETS = torch.tensor(_TABLE_STARTS)
_LEVER_NAMES = tuple(name for name, _ in LEVERS)
_LEVER_SLICE = {name: _TABLE_SLICES[1 + i] for i, name in enumerate(_LEVER_NAMES)}
#: Which levers (columns after op) GERMINATE, a sigmoid GERMINATE and SET_ALPHA_TARGET count.
_GERMINATE_COUNTS = torch.tensor([name in GERMINATE_LEVERS for name in _LEVER_NAMES])
_SIGMOID_COUNTS = torch.tensor([name in SIGMOID_LEVERS for name in _LEVER_NAMES])
_ALPHA_COUNTS = torch.tensor([name in ALPHA_LEVERS for name in _LEVER_NAMES])
#: The op column range of a node's logits (after its priority), then each lever's.
_OP_COLUMNS, *_LEVER_COLUMNS = (slice(1 + h.start, 1 + h.stop) for h in _TABLE_SLICES)
_GERMINATE_HEADS = [i for i, name in enumerate(_LEVER_NAMES) if name in GERMINATE_LEVERS]
_SIGMOID_HEADS = [i for i, name in enumerate(_LEVER_NAMES) if name in SIGMOID_LEVERS]
_ALPHA_HEADS = [i for i, name in enumerate(_LEVER_NAMES) if name in ALPHA_LEVERS]
_BLEND_HEAD = _LEVER_NAMES.index("blend")
#: Up to this many graphs, sample_actions samples in Python floats (see there).
_SMALL_BATCH = 32


class _Segments(NamedTuple):
    """The table's head layout as 0/1 matrices, on one device, so that what is done per head is
    done for all heads at once: a matrix product with a 0/1 matrix sums each head's columns,
    spreads a per-head value to its columns or picks columns, exactly (each output is one
    product by 1 plus zeros). Bool-mask ops (masked_fill, where) and column gathers cost
    several times as much as arithmetic on CPU at these sizes."""

    sums: torch.Tensor  # float32 [53, heads]: 1 where the column belongs to the head
    spread: torch.Tensor  # float32 [heads, 53]: its transpose
    # [53, slots * heads], slot-major: head h's k-th column goes to k * heads + h; `slot_floor`
    # puts the float32 minimum where a head has fewer columns than `slots` (a power of two)
    gather: torch.Tensor
    slot_floor: torch.Tensor  # float32 [slots * heads]
    slots: int
    # [heads, 4]: the op head's entropy; the sums over GERMINATE's levers, a sigmoid blend's
    # and SET_ALPHA_TARGET's
    head_groups: torch.Tensor
    picks: torch.Tensor  # float32 [53, 3]: p(GERMINATE), p(SET_ALPHA_TARGET), p(sigmoid blend)


def _build_segments(device: torch.device) -> _Segments:
    heads, width = len(_TABLE_SIZES), sum(_TABLE_SIZES)
    slots = 1 << (max(_TABLE_SIZES) - 1).bit_length()
    head_of_column = torch.repeat_interleave(torch.arange(heads), torch.tensor(_TABLE_SIZES))
    sums = F.one_hot(head_of_column, heads).float()
    gather = torch.zeros(width, slots * heads)
    slot_floor = torch.full((slots, heads), _MIN)
    for head, columns in enumerate(_TABLE_SLICES):
        for k, column in enumerate(range(columns.start, columns.stop)):
            gather[column, k * heads + head] = 1.0
            slot_floor[k, head] = 0.0
    head_groups = torch.zeros(heads, 4)
    head_groups[0, 0] = 1.0
    for group, counts in enumerate((_GERMINATE_COUNTS, _SIGMOID_COUNTS, _ALPHA_COUNTS), start=1):
        head_groups[1:, group] = counts.float()
    picks = torch.zeros(width, 3)
    blend_sigmoid = _LEVER_SLICE["blend"].start + _SIGMOID
    for i, column in enumerate((_GERMINATE, _SET_ALPHA, blend_sigmoid)):
        picks[column, i] = 1.0
    return _Segments(
        sums.to(device),
        sums.t().contiguous().to(device),
        gather.to(device),
        slot_floor.view(-1).to(device),
        slots,
        head_groups.to(device),
        picks.to(device),
    )


_SEGMENTS: dict[torch.device, _Segments] = {}


def _segments(device: torch.device) -> _Segments:
    segments = _SEGMENTS.get(device)
    if segments is None:
        segments = _SEGMENTS[device] = _build_segments(device)
    return segments


def logit_masks(illegal: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(legal, floor) of a bool mask of illegal logits, as float32: 1 / 0 where legal, 0 / the
    float32 minimum where illegal; x * legal + floor is x with the illegal entries at the
    minimum (what FactoredDistribution masks with; collate builds them for training)."""
    illegal_f = illegal.float()
    return 1.0 - illegal_f, illegal_f * _MIN


def _log_softmax_heads(
    logits: torch.Tensor, legal: torch.Tensor, floor: torch.Tensor, segments: _Segments
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p, p) over each head's columns of `logits` [N, 53], the illegal ones (`legal` 0,
    see logit_masks) masked out: log_softmax per head, as a few ops over all heads (eleven
    log_softmax calls and their backward cost several times as much on a minibatch).
    log p = logits - max - log(sum(exp(logits - max))) per head, the max over its legal logits
    taken without gradient (the result does not depend on it). Masked entries are excluded
    after the exp (set to exactly 0) rather than at the float32 minimum before it, because exp
    of values that underflow takes a slow path in torch's CPU kernel; their log p is the
    float32 minimum, as log_softmax of a masked logit gives."""
    with torch.no_grad():
        # Each head's legal logits in its own slots, the rest at the minimum; a halving tree of
        # elementwise maxima over the slots (amax over short rows is slow on CPU).
        slots = torch.addmm(segments.slot_floor, torch.addcmul(floor, logits, legal), segments.gather)
        slots = slots.view(logits.shape[0], segments.slots, -1)
        while slots.shape[1] > 1:
            half = slots.shape[1] // 2
            slots = torch.maximum(slots[:, :half], slots[:, half:])
        shift = torch.mm(slots[:, 0], segments.spread)
    # Masked logits are left out before the exp too: they may exceed the legal maximum by enough
    # to overflow it, and inf * 0 in its backward would be NaN.
    shifted = (logits - shift) * legal
    exps = shifted.exp() * legal
    sums = torch.mm(exps, segments.sums)  # [N, heads]
    log_p = torch.addcmul(floor, shifted - torch.mm(sums.log(), segments.spread), legal)
    return log_p, exps / torch.mm(sums, segments.spread)


def counted_lever_mask(actions: torch.Tensor) -> torch.Tensor:
    """bool [B, levers]: which of each action row's levers its op samples (base.counted_levers)."""
    device = actions.device
    germinate = (actions[:, OP] == _GERMINATE).unsqueeze(1)
    sigmoid = (actions[:, BLEND] == _SIGMOID).unsqueeze(1)
    alpha = (actions[:, OP] == _SET_ALPHA).unsqueeze(1)
    germinate_counts = _GERMINATE_COUNTS.to(device) | (_SIGMOID_COUNTS.to(device) & sigmoid)
    return (germinate & germinate_counts) | (alpha & _ALPHA_COUNTS.to(device))


def _entropy(log_probs: torch.Tensor) -> torch.Tensor:
    return -(log_probs.exp() * log_probs).sum(-1)


def _sample(logits: list[float], uniform: float | None) -> tuple[int, float]:
    """(index, log-probability) of one draw from a categorical given by its (masked) logits,
    by inverting its CDF at `uniform` ~ U[0, 1) (the first maximum if `uniform` is None).
    A masked logit sits at the float32 minimum: its weight exp(logit - max) is exactly 0, so
    it never comes out (bisect_right returns the first index whose running total exceeds
    the threshold, and the threshold is below the total)."""
    top = max(logits)
    cumulative = list(itertools.accumulate([math.exp(v - top) for v in logits]))
    pick = logits.index(top) if uniform is None else bisect.bisect_right(cumulative, uniform * cumulative[-1])
    return pick, logits[pick] - (top + math.log(cumulative[-1]))


def _log_exponential(shape: tuple[int, int]) -> torch.Tensor:
    """log E, E ~ Exp(1): argmax(log p - log E) samples p (the Gumbel-max trick; -log E is
    Gumbel noise). One draw serves any number of categoricals, where torch.multinomial
    validates its input on every call. Drawn by torch's CPU generator (torch.manual_seed applies), and
    E is clamped away from 0 so the noise is finite (at most 87.4): a masked log-prob (near
    the float32 minimum) minus log E can never win the argmax.
    """
    return torch.empty(shape).exponential_().clamp_min_(_TINY).log_()


class FactoredDistribution:
    """The masked factored distribution of one batch of graphs."""

    def __init__(self, batch: GraphBatch, node_out: torch.Tensor) -> None:
        self.batch = batch
        self.priority = node_out[:, 0]  # raw logits [N_total], for urgency
        self._segments = _segments(node_out.device)
        # log p(op | node) and log p(lever | node) for every lever side by side, [N_total, 53]:
        # a chosen node's conditionals are then one row. `_probs` is its exp (for the entropy).
        legal, floor = batch.logit_masks or logit_masks(batch.illegal_logits)
        self.table, self._probs = _log_softmax_heads(
            node_out[:, 1:], legal[:, 1:], floor[:, 1:], self._segments
        )
        priority = torch.addcmul(floor[:, 0], node_out[:, 0], legal[:, 0])
        self.node_logp = F.log_softmax(self._dense(priority), dim=-1)  # [B, max_nodes]

    @property
    def op_logp(self) -> torch.Tensor:  # [N_total, OPS]
        return self.table[:, _TABLE_SLICES[0]]

    def lever_logp(self, name: str) -> torch.Tensor:
        """log p(choice | node) of one lever (observation.LEVERS), [N_total, choices]."""
        return self.table[:, _LEVER_SLICE[name]]

    @property
    def blueprint_logp(self) -> torch.Tensor:  # [N_total, BLUEPRINTS]
        return self.lever_logp("blueprint")

    @property
    def blend_logp(self) -> torch.Tensor:  # [N_total, BLENDS]
        return self.lever_logp("blend")

    @property
    def tempo_logp(self) -> torch.Tensor:  # [N_total, TEMPOS]
        return self.lever_logp("tempo")

    def _dense(self, per_node: torch.Tensor) -> torch.Tensor:
        """[N_total] -> [B, max_nodes], padding at the float32 minimum (probability 0)."""
        b = self.batch
        if not b.is_padded:  # every graph has max_nodes nodes: already in that layout
            return per_node.view(b.num_graphs, b.max_nodes)
        dense = per_node.new_full((b.num_graphs * b.max_nodes,), _MIN)
        return dense.index_put((b.node_slot,), per_node).view(b.num_graphs, b.max_nodes)

    def _rows(self, node: torch.Tensor) -> torch.Tensor:
        """The table rows of each graph's chosen node, [B, 53]."""
        return self.table[self.batch.ptr[:-1] + node]

    def _scores(self, actions: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log p(actions), log p(op | node)), given the chosen nodes' table rows."""
        columns = actions[:, OP:] + _TABLE_OFFSETS.to(actions.device)  # [B, 11] table columns
        chosen = rows.gather(1, columns)  # [B, 11]: log p of the op and of each lever's choice
        node_lp = self.node_logp.gather(1, actions[:, NODE : NODE + 1]).squeeze(1)
        op_lp = chosen[:, 0]
        # where, not multiply: a masked blueprint's log-prob times 0 could be NaN.
        lever_lp = torch.where(counted_lever_mask(actions), chosen[:, 1:], 0.0).sum(-1)
        return node_lp + op_lp + lever_lp, op_lp

    def sample(self, deterministic: bool = False) -> torch.Tensor:
        """Actions int64 [B, ACTION_WIDTH]; levers are zeroed where their op does not sample them."""
        return self.sample_scored(deterministic)[0]

    def sample_scored(
        self, deterministic: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(actions [B, ACTION_WIDTH], log p(actions), confidence, urgency) in one pass of batched
        tensor ops: Gumbel-max sampling (argmax, if `deterministic`), then `log_prob`'s own
        formula on the rows it sampled from. Masked entries have probability exactly 0: they sit
        at the float32 minimum, beyond any noise, and never come out."""
        b = self.batch
        width = self.table.shape[1]
        if deterministic:
            node = self.node_logp.argmax(-1)
            rows = scores = self._rows(node)
        else:  # one noise draw for the node and every per-node head
            log_exp = _log_exponential((b.num_graphs, b.max_nodes + width)).to(self.table.device)
            node = (self.node_logp - log_exp[:, : b.max_nodes]).argmax(-1)
            rows = self._rows(node)
            scores = rows - log_exp[:, b.max_nodes :]
        picks = [scores[:, head].argmax(-1) for head in _TABLE_SLICES]
        actions = torch.stack([node, *picks], dim=-1)
        actions[:, OP + 1 :] *= counted_lever_mask(actions)  # levers only where they mean something
        log_prob, op_lp = self._scores(actions, rows)
        urgency = torch.sigmoid(self.priority[self.batch.ptr[:-1] + node])
        return actions, log_prob, op_lp.exp(), urgency

    def log_prob(self, actions: torch.Tensor) -> torch.Tensor:
        """log p(actions), [B]."""
        return self._scores(actions, self._rows(actions[:, NODE]))[0]

    def entropy(self) -> torch.Tensor:
        """Exact entropy of the joint factored distribution, [B]."""
        b, segments = self.batch, self._segments
        probs = self._probs
        # Each head's entropy -sum p log p, all heads in one product: [N_total, heads].
        head_h = torch.mm(probs * self.table, segments.sums).neg_()
        # Per node: the op head's entropy, and those GERMINATE's levers always add, a sigmoid
        # blend's, SET_ALPHA_TARGET's; p(GERMINATE), p(SET_ALPHA_TARGET), p(sigmoid blend).
        op_h, germinate_h, sigmoid_h, alpha_h = torch.mm(head_h, segments.head_groups).unbind(1)
        germinate_p, alpha_p, sigmoid_p = torch.mm(probs, segments.picks).unbind(1)
        per_node = op_h + germinate_p * (germinate_h + sigmoid_p * sigmoid_h) + alpha_p * alpha_h
        node_p = self.node_logp.exp().view(-1)
        if b.is_padded:
            node_p = node_p[b.node_slot]
        expected = per_node.new_zeros(b.num_graphs).index_add(0, b.batch, node_p * per_node)
        return _entropy(self.node_logp) + expected

    def confidence(self, actions: torch.Tensor) -> torch.Tensor:
        """p(chosen op | chosen node), [B]."""
        return self._scores(actions, self._rows(actions[:, NODE]))[1].exp()

    def urgency(self, actions: torch.Tensor) -> torch.Tensor:
        """sigmoid of the chosen node's priority logit, [B]."""
        return torch.sigmoid(self.priority[self.batch.ptr[:-1] + actions[:, NODE]])

    def op_probs(self) -> torch.Tensor:
        """p(op | node) for every node, [N_total, OPS] (for inspection and tests)."""
        return self.op_logp.exp()

    def node_probs(self) -> torch.Tensor:
        """p(node) per graph, [B, max_nodes], zero on padding (for inspection and tests)."""
        return self.node_logp.exp()


class SampledActions(NamedTuple):
    """What the serving path samples for B graphs, as Python values: `act` turns them into its
    tensors and Decisions without a round trip through per-item tensor ops."""

    actions: list[list[int]]  # [B][ACTION_WIDTH], columns base.ACTION_FIELDS
    log_probs: list[float]  # log p(action)
    confidences: list[float]  # p(chosen op | chosen node)
    urgencies: list[float]  # sigmoid of the chosen node's priority logit


def sample_actions(batch: GraphBatch, node_out: torch.Tensor, deterministic: bool = False) -> SampledActions:
    """The serving path's sampler (call it outside inference_mode).

    Batches of up to _SMALL_BATCH graphs are sampled in Python floats (`_sample_small`),
    larger ones with FactoredDistribution.sample_scored's batched tensor ops: the Python path
    costs little per call and a little more per graph, the tensor path much more per call and
    a little less per graph, so they meet at a few tens of graphs (figures in
    benchmarks/RESULTS.md, "Measurements quoted in the code").
    """
    if batch.num_graphs <= _SMALL_BATCH:
        return _sample_small(batch, node_out, deterministic)
    scored = FactoredDistribution(batch, node_out).sample_scored(deterministic)
    actions, log_probs, confidences, urgencies = (t.tolist() for t in scored)
    return SampledActions(actions, log_probs, confidences, urgencies)


def _sample_small(batch: GraphBatch, node_out: torch.Tensor, deterministic: bool) -> SampledActions:
    """sample_actions for a few graphs: FactoredDistribution's distribution (same masks, same
    formula for log p, which `evaluate` must reproduce), evaluated in Python floats for the
    chosen action only, after one masked_fill: only the priority column and the chosen
    nodes' rows become Python floats. At batch 1 the ~40 tiny tensor ops of a
    FactoredDistribution plus sampling cost several times as much: their dispatch
    dominates, and grows when other work has evicted their code from the CPU caches.

    Each categorical is sampled by inverting its CDF at one uniform draw (`_sample`): the
    same distribution as the batched path's Gumbel-max, from one random number per head
    instead of one per choice, and no tensor op to turn them into noise. Masked choices have
    probability exactly 0 and never come out.
    """
    logits = node_out.masked_fill(batch.illegal_logits, _MIN)
    if deterministic:
        uniforms: list[list[float | None]] = [[None] * ACTION_WIDTH] * batch.num_graphs
    else:  # drawn by torch's CPU generator, so torch.manual_seed applies
        uniforms = torch.rand((batch.num_graphs, ACTION_WIDTH)).tolist()
    bounds = batch.ptr.tolist()
    priorities = logits[:, 0].tolist()
    sampled = SampledActions([], [], [], [])
    for (first, stop), uniform in zip(itertools.pairwise(bounds), uniforms, strict=True):
        node, node_lp = _sample(priorities[first:stop], uniform[NODE])
        row = logits[first + node].tolist()
        op, op_lp = _sample(row[_OP_COLUMNS], uniform[OP])
        levers, levers_lp = [0] * len(_LEVER_COLUMNS), 0.0
        heads = _GERMINATE_HEADS if op == _GERMINATE else _ALPHA_HEADS if op == _SET_ALPHA else []
        for i in heads:  # a lever only counts where its op samples it
            levers[i], lever_lp = _sample(row[_LEVER_COLUMNS[i]], uniform[OP + 1 + i])
            levers_lp += lever_lp
        if op == _GERMINATE and levers[_BLEND_HEAD] == _SIGMOID:
            for i in _SIGMOID_HEADS:
                levers[i], lever_lp = _sample(row[_LEVER_COLUMNS[i]], uniform[OP + 1 + i])
                levers_lp += lever_lp
        sampled.actions.append([node, op, *levers])
        sampled.log_probs.append(node_lp + op_lp + levers_lp)
        sampled.confidences.append(math.exp(op_lp))
        # The chosen node is never masked, so its row still holds its raw priority logit.
        sampled.urgencies.append(0.5 + 0.5 * math.tanh(0.5 * row[0]))  # sigmoid
    return sampled
