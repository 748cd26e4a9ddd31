"""GNN policy: a GCN over the host's layer graph with factored per-node heads.

Nodes are the host's layers; each node's input is its own features concatenated
with the run's global features (so every head sees training progress). The GCN
uses the analyzer's precomputed normalized adjacency (obs.gcn_edge_index /
gcn_edge_weight, self loops included), hence `normalize=False`. A batch of runs is
one disjoint-union graph and one forward pass.
"""

from __future__ import annotations

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


class GNNNetwork(nn.Module):
    """Encoder -> L x (GCNConv, ReLU, dropout, residual) -> per-node heads; pooled value head."""

    def __init__(self, hidden: int = 128, layers: int = 3, dropout: float = 0.1, residual: bool = True) -> None:
        super().__init__()
        n_node, n_global = len(NODE_FEATURES), len(GLOBAL_FEATURES)
        self.dropout = dropout
        self.residual = residual
        self.encoder = nn.Sequential(layer_init(nn.Linear(n_node + n_global, hidden)), nn.ReLU())
        # normalize=False: the analyzer already gives D^-1/2 (A + I) D^-1/2 as edge weights.
        self.convs = nn.ModuleList(GCNConv(hidden, hidden, normalize=False) for _ in range(layers))
        self.node_head = nn.Sequential(
            layer_init(nn.Linear(hidden, hidden)), nn.ReLU(), layer_init(nn.Linear(hidden, NODE_HEAD_DIM), std=0.01)
        )
        self.value_head = nn.Sequential(
            layer_init(nn.Linear(hidden + n_global, hidden)), nn.ReLU(), layer_init(nn.Linear(hidden, 1), std=1.0)
        )

    def forward(
        self,
        x: torch.Tensor,
        global_x: torch.Tensor,
        edge_index: torch.Tensor,
        edge_weight: torch.Tensor,
        batch: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-node head logits [N, NODE_HEAD_DIM], value [B])."""
        h = self.encoder(torch.cat([x, global_x[batch]], dim=-1))
        for conv in self.convs:
            out = F.dropout(F.relu(conv(h, edge_index, edge_weight)), self.dropout, self.training)
            h = h + out if self.residual else out
        pooled = global_mean_pool(h, batch, size=global_x.shape[0])
        value = self.value_head(torch.cat([pooled, global_x], dim=-1)).squeeze(-1)
        return self.node_head(h), value


@register_policy("gnn")
class GNNPolicy(NeuralPolicyBundle):
    """The GCN policy bundle (feed-forward: no per-run memory)."""

    def _build_network(self, config: PolicyConfig) -> nn.Module:
        return GNNNetwork(config.hidden_size, config.gnn_layers, config.dropout, config.residual)

    def _forward(
        self, batch: GraphBatch, hidden: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        node_out, values = self._network(batch.x, batch.global_x, batch.edge_index, batch.edge_weight, batch.batch)
        return node_out, values, None
