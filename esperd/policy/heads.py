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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from contracts import Op
from esperd.analyzer.observation import BLENDS, BLUEPRINTS, OP_INDEX, OPS, TEMPOS
from esperd.policy.base import BLEND, BLUEPRINT, NODE, OP, TEMPO
from esperd.policy.batch import GraphBatch

#: Per-node output columns: priority, op logits, blueprint logits, blend logits, tempo logits.
HEAD_SIZES: tuple[int, ...] = (1, len(OPS), len(BLUEPRINTS), len(BLENDS), len(TEMPOS))
NODE_HEAD_DIM = sum(HEAD_SIZES)

_GERMINATE = OP_INDEX[Op.GERMINATE]
_WAIT = OP_INDEX[Op.WAIT]


def _masked(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return logits.masked_fill(~mask, torch.finfo(logits.dtype).min)


def _entropy(log_probs: torch.Tensor) -> torch.Tensor:
    return -(log_probs.exp() * log_probs).sum(-1)


def _pick(log_probs: torch.Tensor, deterministic: bool) -> torch.Tensor:
    """Argmax, or a sample; masked entries have probability exactly 0, so never come out."""
    if deterministic:
        return log_probs.argmax(-1)
    return torch.multinomial(log_probs.exp(), 1).squeeze(-1)


class FactoredDistribution:
    """The masked factored distribution of one batch of graphs."""

    def __init__(self, batch: GraphBatch, node_out: torch.Tensor) -> None:
        self.batch = batch
        priority, op, blueprint, blend, tempo = node_out.split(HEAD_SIZES, dim=-1)
        self.priority = priority.squeeze(-1)  # [N_total]
        self.op_logp = F.log_softmax(_masked(op, batch.op_mask), dim=-1)  # [N_total, OPS]
        self.blueprint_logp = F.log_softmax(_masked(blueprint, batch.blueprint_mask), dim=-1)
        self.blend_logp = F.log_softmax(blend, dim=-1)
        self.tempo_logp = F.log_softmax(tempo, dim=-1)
        self.node_logp = F.log_softmax(self._dense_node_logits(), dim=-1)  # [B, max_nodes]

    def _dense_node_logits(self) -> torch.Tensor:
        b = self.batch
        actionable = b.op_mask.clone()
        actionable[:, _WAIT] = False
        node_mask = torch.zeros(b.num_graphs, b.max_nodes, dtype=torch.bool, device=b.x.device)
        node_mask[b.batch, b.position] = actionable.any(-1)
        node_mask[:, 0] |= ~node_mask.any(-1)  # nothing to do anywhere: WAIT on node 0
        dense = self.priority.new_full((b.num_graphs, b.max_nodes), torch.finfo(self.priority.dtype).min)
        dense = dense.index_put((b.batch, b.position), self.priority)
        return _masked(dense, node_mask)

    def _flat(self, node: torch.Tensor) -> torch.Tensor:
        """Flat node index of each graph's chosen node."""
        return self.batch.ptr[:-1] + node

    def sample(self, deterministic: bool = False) -> torch.Tensor:
        """Actions int64 [B, 5]; levers are zeroed unless op is GERMINATE."""
        node = _pick(self.node_logp, deterministic)
        flat = self._flat(node)
        op = _pick(self.op_logp[flat], deterministic)
        germinate = op == _GERMINATE
        levers = [
            torch.where(germinate, _pick(logp[flat], deterministic), 0)
            for logp in (self.blueprint_logp, self.blend_logp, self.tempo_logp)
        ]
        return torch.stack([node, op, *levers], dim=-1)

    def log_prob(self, actions: torch.Tensor) -> torch.Tensor:
        """log p(actions), [B]."""
        node = actions[:, NODE]
        flat = self._flat(node)
        node_lp = self.node_logp.gather(1, node[:, None]).squeeze(1)
        op_lp = self.op_logp[flat].gather(1, actions[:, OP, None]).squeeze(1)
        lever_lp = (
            self.blueprint_logp[flat].gather(1, actions[:, BLUEPRINT, None]).squeeze(1)
            + self.blend_logp[flat].gather(1, actions[:, BLEND, None]).squeeze(1)
            + self.tempo_logp[flat].gather(1, actions[:, TEMPO, None]).squeeze(1)
        )
        germinate = actions[:, OP] == _GERMINATE
        return node_lp + op_lp + torch.where(germinate, lever_lp, torch.zeros_like(lever_lp))

    def entropy(self) -> torch.Tensor:
        """Exact entropy of the joint factored distribution, [B]."""
        b = self.batch
        lever_h = _entropy(self.blueprint_logp) + _entropy(self.blend_logp) + _entropy(self.tempo_logp)
        per_node = _entropy(self.op_logp) + self.op_logp[:, _GERMINATE].exp() * lever_h  # [N_total]
        node_p = self.node_logp.exp()[b.batch, b.position]
        expected = per_node.new_zeros(b.num_graphs).index_add(0, b.batch, node_p * per_node)
        return _entropy(self.node_logp) + expected

    def confidence(self, actions: torch.Tensor) -> torch.Tensor:
        """p(chosen op | chosen node), [B]."""
        flat = self._flat(actions[:, NODE])
        return self.op_logp[flat].gather(1, actions[:, OP, None]).squeeze(1).exp()

    def urgency(self, actions: torch.Tensor) -> torch.Tensor:
        """sigmoid of the chosen node's priority logit, [B]."""
        return torch.sigmoid(self.priority[self._flat(actions[:, NODE])])

    def op_probs(self) -> torch.Tensor:
        """p(op | node) for every node, [N_total, OPS] (for inspection and tests)."""
        return self.op_logp.exp()

    def node_probs(self) -> torch.Tensor:
        """p(node) per graph, [B, max_nodes], zero on padding (for inspection and tests)."""
        return self.node_logp.exp()
