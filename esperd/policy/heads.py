"""The factored, masked action distribution shared by the neural policies.

Per node the network emits one row of NODE_HEAD_DIM logits, split as
(priority | op | blueprint | blend | tempo). Per run (graph):

  node      ~ softmax over the priorities of nodes that have a legal non-WAIT op
              (if none has, node 0 only: the decision is then WAIT on node 0);
  op        ~ softmax over that node's op logits, illegal ops masked out;
  levers    ~ that node's blueprint (masked) / blend / tempo logits, used only for GERMINATE.

log p(a) = log p(node) + log p(op|node)
         + [op = GERMINATE] * (log p(bp|node) + log p(blend|node) + log p(tempo|node))

Entropy is the exact entropy of that joint distribution:
  H = H(node) + sum_n p(n) * (H(op|n) + p(GERMINATE|n) * (H(bp|n) + H(blend|n) + H(tempo|n))).

Masked logits are set to the most negative finite float rather than -inf: their
probability is still exactly 0 (exp underflows), but 0 * log 0 stays finite in the
forward and backward pass, so entropy gradients never turn into NaN.

At 20 nodes every torch op costs microseconds of dispatch for nanoseconds of math,
so the code keeps the op count low: one masked_fill for all heads (the mask comes
precomputed from collate), the per-node conditional log-probs in one [N, 29] table
so a chosen node's row is one gather, one Gumbel noise draw for all heads, and
`sample_scored` returns log-prob, confidence and urgency from the rows it sampled.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from contracts import Op
from esperd.analyzer.observation import OP_INDEX
from esperd.policy.base import NODE, OP
from esperd.policy.batch import HEAD_SIZES, NODE_HEAD_DIM, GraphBatch

__all__ = ["HEAD_SIZES", "NODE_HEAD_DIM", "FactoredDistribution"]

_GERMINATE = OP_INDEX[Op.GERMINATE]
_MIN = torch.finfo(torch.float32).min
_TINY = torch.finfo(torch.float32).tiny
#: Column sizes of the per-node table of conditional log-probs: op, blueprint, blend, tempo,
#: and where each starts (a chosen op / lever's column is its index plus its head's offset).
_TABLE_SIZES = HEAD_SIZES[1:]
_TABLE_STARTS = np.array([sum(_TABLE_SIZES[:i]) for i in range(len(_TABLE_SIZES))])
_TABLE_SLICES = tuple(slice(start, start + size) for start, size in zip(_TABLE_STARTS.tolist(), _TABLE_SIZES))
_TABLE_OFFSETS = torch.from_numpy(_TABLE_STARTS)
#: The four heads as rows of one [4, 16] grid of table columns, for one argmax over all of
#: them. Short heads are padded by repeating their first column: argmax returns the first
#: maximal position, so a repeat never shadows the original and picks are head indices.
_HEAD_GRID = np.array(
    [
        [start + (i if i < size else 0) for i in range(max(_TABLE_SIZES))]
        for start, size in zip(_TABLE_STARTS.tolist(), _TABLE_SIZES)
    ]
)


def _entropy(log_probs: torch.Tensor) -> torch.Tensor:
    return -(log_probs.exp() * log_probs).sum(-1)


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    """A numpy view (a copy only off the CPU or off the autograd graph)."""
    if tensor.requires_grad or tensor.device.type != "cpu":
        tensor = tensor.detach().cpu()
    return tensor.numpy()


def _log_exponential(shape: tuple[int, int]) -> np.ndarray:
    """log E, E ~ Exp(1): argmax(log p - log E) samples p (the Gumbel-max trick; -log E is
    Gumbel noise). One draw serves any number of categoricals, where torch.multinomial costs
    ~30 µs a call at B = 1. Drawn by torch's CPU generator (torch.manual_seed applies), and
    E is clamped away from 0 so the noise is finite (at most 87.4): a masked log-prob (near
    the float32 minimum) minus log E can never win the argmax.
    """
    exp = torch.empty(shape).exponential_().numpy()
    return np.log(np.maximum(exp, _TINY))


class FactoredDistribution:
    """The masked factored distribution of one batch of graphs."""

    def __init__(self, batch: GraphBatch, node_out: torch.Tensor) -> None:
        self.batch = batch
        self.priority = node_out[:, 0]  # raw logits [N_total], for urgency
        priority, *heads = node_out.masked_fill(batch.illegal_logits, _MIN).split(HEAD_SIZES, dim=-1)
        # log p(op | node), log p(bp | node), log p(blend | node), log p(tempo | node) side by
        # side, [N_total, 6 + 16 + 3 + 4]: a chosen node's conditionals are then one row.
        self.table = torch.cat([F.log_softmax(head, dim=-1) for head in heads], dim=-1)
        self.node_logp = F.log_softmax(self._dense(priority.view(-1)), dim=-1)  # [B, max_nodes]

    @property
    def op_logp(self) -> torch.Tensor:  # [N_total, OPS]
        return self.table[:, _TABLE_SLICES[0]]

    @property
    def blueprint_logp(self) -> torch.Tensor:  # [N_total, BLUEPRINTS]
        return self.table[:, _TABLE_SLICES[1]]

    @property
    def blend_logp(self) -> torch.Tensor:  # [N_total, BLENDS]
        return self.table[:, _TABLE_SLICES[2]]

    @property
    def tempo_logp(self) -> torch.Tensor:  # [N_total, TEMPOS]
        return self.table[:, _TABLE_SLICES[3]]

    def _dense(self, per_node: torch.Tensor) -> torch.Tensor:
        """[N_total] -> [B, max_nodes], padding at the float32 minimum (probability 0)."""
        b = self.batch
        if not b.is_padded:  # every graph has max_nodes nodes: already in that layout
            return per_node.view(b.num_graphs, b.max_nodes)
        dense = per_node.new_full((b.num_graphs * b.max_nodes,), _MIN)
        return dense.index_put((b.node_slot,), per_node).view(b.num_graphs, b.max_nodes)

    def _rows(self, node: torch.Tensor) -> torch.Tensor:
        """The table rows of each graph's chosen node, [B, 29]."""
        return self.table[self.batch.ptr[:-1] + node]

    def _scores(self, actions: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log p(actions), log p(op | node)), given the chosen nodes' table rows."""
        columns = actions[:, OP:] + _TABLE_OFFSETS.to(actions.device)  # [B, 4] table columns
        chosen = rows.gather(1, columns)  # [B, 4]: log p of the op, blueprint, blend, tempo
        node_lp = self.node_logp.gather(1, actions[:, NODE : NODE + 1]).squeeze(1)
        op_lp = chosen[:, 0]
        germinate = actions[:, OP] == _GERMINATE
        # where, not multiply: a masked blueprint's log-prob times 0 could be NaN.
        lever_lp = torch.where(germinate, chosen[:, 1:].sum(-1), 0.0)
        return node_lp + op_lp + lever_lp, op_lp

    def sample(self, deterministic: bool = False) -> torch.Tensor:
        """Actions int64 [B, 5] on the batch's device; levers are zeroed unless op is GERMINATE."""
        return self.sample_scored(deterministic)[0].to(self.table.device)

    def sample_scored(
        self, deterministic: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(actions [B, 5], log p(actions), confidence, urgency) as CPU tensors: what `act` needs.

        Sampling is the Gumbel-max trick (argmax, if `deterministic`): masked entries have
        probability exactly 0 and never come out. It runs in numpy on CPU views of the node
        log-probs and of the chosen nodes' table rows, where at B = 1 its ~30 small ops cost
        half of what they cost as torch ops. log p is `log_prob`'s formula (the one `evaluate`
        uses), in float32 as well. Called outside inference_mode, the results are ordinary
        tensors (sharing numpy memory).
        """
        b = self.batch
        node_logp, table = _numpy(self.node_logp), _numpy(self.table)
        first_node = _numpy(b.ptr)[:-1]
        if deterministic:
            node = node_logp.argmax(1)
            flat = first_node + node
            rows = scores = table[flat]
        else:  # one noise draw for the node and the four per-node heads
            log_exp = _log_exponential((b.num_graphs, b.max_nodes + table.shape[1]))
            node = (node_logp - log_exp[:, : b.max_nodes]).argmax(1)
            flat = first_node + node
            rows = table[flat]
            scores = rows - log_exp[:, b.max_nodes :]
        picks = scores[:, _HEAD_GRID].argmax(-1)  # [B, 4]: op, blueprint, blend, tempo
        germinate = picks[:, 0] == _GERMINATE
        picks[:, 1:] *= germinate[:, None]  # levers only for GERMINATE
        # log p as in _scores: the chosen entries of the node's row, levers only for GERMINATE.
        graph = np.arange(b.num_graphs)
        chosen = rows[graph[:, None], picks + _TABLE_STARTS]
        log_prob = node_logp[graph, node] + chosen[:, 0] + np.where(germinate, chosen[:, 1:].sum(1), 0.0)
        urgency = 0.5 + 0.5 * np.tanh(0.5 * _numpy(self.priority)[flat])  # sigmoid, no overflow
        return (
            torch.from_numpy(np.concatenate([node[:, None], picks], axis=1)),
            torch.from_numpy(log_prob),
            torch.from_numpy(np.exp(chosen[:, 0])),
            torch.from_numpy(urgency),
        )

    def log_prob(self, actions: torch.Tensor) -> torch.Tensor:
        """log p(actions), [B]."""
        return self._scores(actions, self._rows(actions[:, NODE]))[0]

    def entropy(self) -> torch.Tensor:
        """Exact entropy of the joint factored distribution, [B]."""
        b = self.batch
        lever_h = _entropy(self.blueprint_logp) + _entropy(self.blend_logp) + _entropy(self.tempo_logp)
        per_node = _entropy(self.op_logp) + self.op_logp[:, _GERMINATE].exp() * lever_h  # [N_total]
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
