"""GNN policy: a GCN over the host's layer graph with factored per-node heads.

Nodes are the host's layers; each node's input is its own features concatenated
with the run's global features (so every head sees training progress). The GCN
uses the analyzer's precomputed normalized adjacency (obs.gcn_edge_index /
gcn_edge_weight, self loops included), hence `normalize=False`. A batch of runs is
one disjoint-union graph and one forward pass.

Message passing: in eager mode a GCN layer is one matrix product with the
adjacency that collate built (A @ (h W^T) + b, one addmm): a dense matrix for small
batches, which beats any sparse kernel at 20 nodes, and CSR beyond (one SpMM per
layer, faster than edge_index message passing on a 64-run x 64-layer batch).
The GCNConv modules hold the weights (state-dict keys unchanged) but are only
called on the torch.compile'd path, which gets the plain edge_index / edge_weight
(dynamo does not trace sparse tensors). At batch 1 the forward is ~25 small ops and
Python overhead matters: layers are applied functionally on weights kept at hand
(`_gather_weights`), not through nn.Module calls and attribute lookups (so forward
hooks on the layers do not fire in eager mode).
"""

from __future__ import annotations

from typing import Any, NamedTuple

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


class _Weights(NamedTuple):
    """The network's weights as the forward multiplies them: transposed (x @ w + b, one addmm
    per layer), and the encoder's also split into its node and global rows, so that one
    graph's global features go through the encoder once, not once per node. Views of the
    parameters."""

    encoder: torch.Tensor  # [F_node + F_global, H]
    encoder_node: torch.Tensor  # [F_node, H], rows of `encoder`
    encoder_global: torch.Tensor  # [F_global, H]
    encoder_bias: torch.Tensor
    convs: tuple[tuple[torch.Tensor, torch.Tensor], ...]  # (W^T [H, H], bias) per GCN layer
    node_head: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # W0^T, b0, W2^T, b2
    value_head: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class _Propagate(torch.autograd.Function):
    """addmm(bias, A, hw) for a CSR adjacency A, differentiable in bias and hw, with A's transpose
    given (collate's `adjacency_t`): autograd's own backward transposes A and converts it to CSR
    again at every call, which cost more than the layer's matrix products on a minibatch."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, bias: torch.Tensor, adjacency: torch.Tensor, adjacency_t: torch.Tensor, hw: torch.Tensor
    ) -> torch.Tensor:
        ctx.adjacency_t = adjacency_t
        return torch.addmm(bias, adjacency, hw)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, torch.Tensor | None]:  # type: ignore[override]
        bias_grad = grad.sum(0) if ctx.needs_input_grad[0] else None
        hw_grad = torch.mm(ctx.adjacency_t, grad) if ctx.needs_input_grad[3] else None
        return bias_grad, None, None, hw_grad


def _mlp(weights: tuple[torch.Tensor, ...], x: torch.Tensor) -> torch.Tensor:
    """A (Linear, ReLU, Linear) head from its (W0^T, b0, W2^T, b2)."""
    w0, b0, w2, b2 = weights
    return torch.addmm(b2, torch.addmm(b0, x, w0).relu_(), w2)  # in place: a fresh tensor


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

    def _weights(self) -> _Weights:
        """The parameters as the forward uses them (views: ~20 view ops, so built once for
        inference, see `_gather_weights`; per call under autograd, which tracks them)."""
        encoder, node_head, value_head = self.encoder[0], self.node_head, self.value_head
        n_node = len(NODE_FEATURES)
        encoder_t = encoder.weight.t()
        return _Weights(
            encoder=encoder_t,
            encoder_node=encoder_t[:n_node],
            encoder_global=encoder_t[n_node:],
            encoder_bias=encoder.bias,
            convs=tuple((conv.lin.weight.t(), conv.bias) for conv in self.convs),
            node_head=(
                node_head[0].weight.t(),
                node_head[0].bias,
                node_head[2].weight.t(),
                node_head[2].bias,
            ),
            value_head=(
                value_head[0].weight.t(),
                value_head[0].bias,
                value_head[2].weight.t(),
                value_head[2].bias,
            ),
        )

    def _gather_weights(self) -> None:
        """Build the inference weights once (at batch 1, fetching the parameters through
        nn.Module lookups and making the views were a large share of the forward). They
        are views made without autograd, so they share the parameters' storage: optimizers
        and load_state_dict update parameters in place, which the views see. `_apply` (to(),
        float(), ...) and loads with assign=True may give parameters new storage, so both
        build them again; nothing derived is ever saved (the state dict is the modules')."""
        with torch.no_grad():
            self._inference_weights = self._weights()

    def __getstate__(self) -> dict[str, Any]:
        # A copy (deepcopy, pickle) would clone the views apart from the copied parameters:
        # leave them out and build them again on the copy's own (__setstate__).
        state = super().__getstate__()
        state.pop("_inference_weights", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._gather_weights()

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
        adjacency_t: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-node head logits [N, NODE_HEAD_DIM], value [B]).

        `adjacency` is the normalized adjacency with rows = targets, dense [N, N] or sparse
        CSR, with `edge_weight` None; or an edge_index [2, E] with its `edge_weight` [E].
        `adjacency_t`: a CSR adjacency's transpose, for a cheaper backward (optional).
        """
        num_graphs = global_x.shape[0]
        # Without autograd: the prebuilt weight views; activations are fresh tensors, so ReLU
        # runs in place, and so does the residual sum (saves allocating and faulting in ~0.6 MB
        # per layer at 64 runs).
        in_place = not torch.is_grad_enabled()
        w = self._inference_weights if in_place and edge_weight is None else self._weights()
        if num_graphs == 1:  # encoder(cat[x, global_x]) = x W_node^T + (global_x W_global^T + b)
            per_graph = torch.addmm(w.encoder_bias, global_x, w.encoder_global)
            h = torch.addmm(per_graph, x, w.encoder_node)
        else:  # a [N, H] gather of that per-graph term costs more (page faults) than the cat
            h = torch.addmm(w.encoder_bias, torch.cat([x, global_x[batch]], dim=-1), w.encoder)
        h = h.relu_()
        for layer, (weight, bias) in enumerate(w.convs):
            if edge_weight is None:  # GCNConv's own computation on an adjacency matrix
                hw = torch.mm(h, weight)
                if adjacency_t is None or in_place:
                    out = torch.addmm(bias, adjacency, hw)
                else:
                    out = _Propagate.apply(bias, adjacency, adjacency_t, hw)
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
        if num_graphs == 1:  # the mean as a [1, N] x [N, H] product: PyG's scatter and h.mean's
            # reduction kernel both cost more for one graph (the kernel is rarely warm in cache
            # when a decision comes, where the matrix product shares the layers' BLAS code).
            pooled = torch.mm(h.new_full((1, h.shape[0]), 1.0 / h.shape[0]), h)
        else:
            pooled = global_mean_pool(h, batch, size=num_graphs)
        value = _mlp(w.value_head, torch.cat([pooled, global_x], dim=-1)).squeeze(-1)
        return _mlp(w.node_head, h), value


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
            node_out, values = self._network(
                batch.x, batch.global_x, adjacency, weight, batch.batch, batch.adjacency_t
            )
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
