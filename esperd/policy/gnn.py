"""GNN policy: a GCN over the host's layer graph with factored per-node heads.

Nodes are the host's layers; each node's input is its own features concatenated
with the run's global features (so every head sees training progress). The GCN
uses the analyzer's precomputed normalized adjacency (obs.gcn_edge_index /
gcn_edge_weight, self loops included), hence `normalize=False`. A batch of runs is
one disjoint-union graph and one forward pass.

Message passing: in eager mode a GCN layer is one matrix product with the
adjacency that collate built (A @ (h W^T) + b, one addmm): a dense matrix for small
batches, which beats any sparse kernel at 20 nodes, and CSR beyond (one SpMM per
layer, ~3x faster than edge_index message passing on a 64-run x 64-layer batch).
The GCNConv modules hold the weights (state-dict keys unchanged) but are only
called on the torch.compile'd path, which gets the plain edge_index / edge_weight
(dynamo does not trace sparse tensors). At batch 1 the forward is ~25 small ops and
Python overhead matters: layers are applied functionally on weights kept at hand
(`_gather_weights`), not through nn.Module calls and attribute lookups (so forward
hooks on the layers do not fire in eager mode).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch_geometric.nn import GCNConv, global_mean_pool

from esperd.analyzer.observation import GLOBAL_FEATURES, NODE_FEATURES
from esperd.policy.batch import GraphBatch
from esperd.policy.config import PolicyConfig
from esperd.policy.heads import NODE_HEAD_DIM
from esperd.policy.neural import NeuralPolicyBundle, layer_init
from esperd.policy.registry import register_policy


def _mlp(weights: tuple[torch.Tensor, ...], x: torch.Tensor) -> torch.Tensor:
    """A (Linear, ReLU, Linear) head from its (weight, bias, weight, bias)."""
    w0, b0, w2, b2 = weights
    return F.linear(F.linear(x, w0, b0).relu_(), w2, b2)  # in place: a fresh tensor


class GNNNetwork(nn.Module):
    """Encoder -> L x (GCNConv, ReLU, dropout, residual) -> per-node heads; pooled value head."""

    def __init__(
        self, hidden: int = 128, layers: int = 3, dropout: float = 0.1, residual: bool = True
    ) -> None:
        super().__init__()
        n_node, n_global = len(NODE_FEATURES), len(GLOBAL_FEATURES)
        self.dropout = dropout
        self.residual = residual
        self.encoder = nn.Sequential(layer_init(nn.Linear(n_node + n_global, hidden)), nn.ReLU())
        # normalize=False: the analyzer already gives D^-1/2 (A + I) D^-1/2 as edge weights.
        self.convs = nn.ModuleList(GCNConv(hidden, hidden, normalize=False) for _ in range(layers))
        self.node_head = nn.Sequential(
            layer_init(nn.Linear(hidden, hidden)),
            nn.ReLU(),
            layer_init(nn.Linear(hidden, NODE_HEAD_DIM), std=0.01),
        )
        self.value_head = nn.Sequential(
            layer_init(nn.Linear(hidden + n_global, hidden)),
            nn.ReLU(),
            layer_init(nn.Linear(hidden, 1), std=1.0),
        )
        self._gather_weights()

    def _gather_weights(self) -> None:
        """Keep the parameters at hand in plain attributes: at batch 1, fetching them through
        nn.Module attribute lookups and Sequential indexing costs ~30 µs of a ~130 µs forward.
        Optimizers and load_state_dict update parameters in place, so these references stay
        valid; `_apply` (to(), float(), ...) and loads with assign=True may replace
        parameters, so both gather them again."""
        encoder, node_head, value_head = self.encoder[0], self.node_head, self.value_head
        self._encoder_weights = (encoder.weight, encoder.bias)
        self._conv_weights = tuple((conv.lin.weight, conv.bias) for conv in self.convs)
        self._node_head_weights = (
            node_head[0].weight,
            node_head[0].bias,
            node_head[2].weight,
            node_head[2].bias,
        )
        self._value_head_weights = (
            value_head[0].weight,
            value_head[0].bias,
            value_head[2].weight,
            value_head[2].bias,
        )

    def _apply(self, *args: Any, **kwargs: Any) -> GNNNetwork:
        module = super()._apply(*args, **kwargs)
        self._gather_weights()
        return module

    def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:
        result = super().load_state_dict(*args, **kwargs)
        self._gather_weights()
        return result

    def forward(
        self,
        x: torch.Tensor,
        global_x: torch.Tensor,
        adjacency: torch.Tensor,
        edge_weight: torch.Tensor | None,
        batch: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-node head logits [N, NODE_HEAD_DIM], value [B]).

        `adjacency` is the normalized adjacency with rows = targets, dense [N, N] or sparse
        CSR, with `edge_weight` None; or an edge_index [2, E] with its `edge_weight` [E].
        """
        num_graphs = global_x.shape[0]
        # Activations are fresh tensors, so ReLU runs in place; without autograd the residual
        # sum does too (saves allocating and faulting in ~0.6 MB per layer at 64 runs).
        in_place = not torch.is_grad_enabled()
        h = F.linear(torch.cat([x, global_x[batch]], dim=-1), *self._encoder_weights).relu_()
        for layer, (weight, bias) in enumerate(self._conv_weights):
            if edge_weight is None:  # GCNConv's own computation on an adjacency matrix
                out = torch.addmm(bias, adjacency, F.linear(h, weight))
            else:
                out = self.convs[layer](h, adjacency, edge_weight)
            out = out.relu_()
            if self.training:
                out = F.dropout(out, self.dropout)
            if not self.residual:
                h = out
            elif in_place:
                h += out
            else:
                h = h + out
        if num_graphs == 1:  # a plain mean: PyG's scatter costs 4x as much for one graph
            pooled = h.mean(0, keepdim=True)
        else:
            pooled = global_mean_pool(h, batch, size=num_graphs)
        value = _mlp(self._value_head_weights, torch.cat([pooled, global_x], dim=-1)).squeeze(-1)
        return _mlp(self._node_head_weights, h), value


@register_policy("gnn")
class GNNPolicy(NeuralPolicyBundle):
    """The GCN policy bundle (feed-forward: no per-run memory)."""

    architecture_fields = ("hidden_size", "gnn_layers", "residual")
    uses_adjacency = True

    def _build_network(self, config: PolicyConfig) -> nn.Module:
        return GNNNetwork(config.hidden_size, config.gnn_layers, config.dropout, config.residual)

    def _forward(
        self, batch: GraphBatch, hidden: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        if self._network is self.base_network:  # eager: the adjacency matrix from collate
            adjacency = batch.adjacency if batch.adjacency is not None else sparse_adjacency(batch)
            weight = None
        else:  # compiled: edge_index message passing that dynamo can trace
            adjacency, weight = batch.edge_index, batch.edge_weight
        node_out, values = self._network(batch.x, batch.global_x, adjacency, weight, batch.batch)
        return node_out, values, None


def sparse_adjacency(batch: GraphBatch) -> torch.Tensor:
    """The batch's normalized adjacency as CSR, rows = targets (GCNConv's adj_t), from its
    edge_index (collate builds `batch.adjacency` itself, in numpy; this is for batches
    collated without it, tests and benchmarks)."""
    n = batch.x.shape[0]
    src, dst = batch.edge_index
    order = torch.argsort(dst * n + src, stable=True)
    crow = torch.zeros(n + 1, dtype=torch.int64, device=dst.device)
    crow[1:] = torch.cumsum(torch.bincount(dst, minlength=n), 0)
    return torch.sparse_csr_tensor(crow, src[order], batch.edge_weight[order], (n, n), check_invariants=False)
