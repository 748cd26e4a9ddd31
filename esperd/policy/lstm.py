"""LSTM policy: a factored recurrent actor-critic over fixed-size per-run features.

Each step, a run is summarised as [global features, mean over nodes, max over
nodes] and fed through an LSTM cell; per-node heads read each node's features
concatenated with the run's LSTM output, so the factored action space (node, op,
levers) and masks are the same as the GNN's. The recurrent state lives inside
the bundle, keyed by run id, in a bounded LRU (`lstm_max_runs`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn
from torch_geometric.nn import global_max_pool, global_mean_pool

from esperd.analyzer.observation import GLOBAL_FEATURES, NODE_FEATURES, Observation
from esperd.policy.batch import GraphBatch
from esperd.policy.config import PolicyConfig
from esperd.policy.heads import NODE_HEAD_DIM
from esperd.policy.neural import NeuralPolicyBundle, layer_init
from esperd.policy.registry import register_policy


class LSTMNetwork(nn.Module):
    """Run encoder -> LSTMCell -> (per-node heads on [node features, h], value on h)."""

    def __init__(self, hidden: int = 128, lstm_hidden: int = 128, dropout: float = 0.1) -> None:
        super().__init__()
        n_node, n_global = len(NODE_FEATURES), len(GLOBAL_FEATURES)
        self.lstm_hidden = lstm_hidden
        self.run_encoder = nn.Sequential(
            layer_init(nn.Linear(n_global + 2 * n_node, hidden)), nn.ReLU(), nn.Dropout(dropout)
        )
        self.cell = nn.LSTMCell(hidden, lstm_hidden)
        self.node_head = nn.Sequential(
            layer_init(nn.Linear(n_node + lstm_hidden, hidden)),
            nn.ReLU(),
            layer_init(nn.Linear(hidden, NODE_HEAD_DIM), std=0.01),
        )
        self.value_head = layer_init(nn.Linear(lstm_hidden, 1), std=1.0)

    def forward(
        self, x: torch.Tensor, global_x: torch.Tensor, batch: torch.Tensor, h: torch.Tensor, c: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(per-node head logits [N, NODE_HEAD_DIM], value [B], h' [B, H], c' [B, H])."""
        size = global_x.shape[0]
        run = torch.cat([global_x, global_mean_pool(x, batch, size), global_max_pool(x, batch, size)], dim=-1)
        h, c = self.cell(self.run_encoder(run), (h, c))
        node_out = self.node_head(torch.cat([x, h[batch]], dim=-1))
        return node_out, self.value_head(h).squeeze(-1), h, c


@register_policy("lstm")
class LSTMPolicy(NeuralPolicyBundle):
    """The recurrent bundle. Hidden state per run: [2, lstm_hidden] (h, c), zeros for a new run.

    `act` advances each run's state by one step. `ActResult.hidden` is the state the
    step started from; `evaluate(obs, actions, hidden)` replays single steps from
    such stored states (None means a fresh episode: zeros).
    """

    is_recurrent = True
    architecture_fields = ("hidden_size", "lstm_hidden")

    def __init__(self, config: PolicyConfig, device: torch.device | str = "cpu") -> None:
        super().__init__(config, device)
        self._hidden: OrderedDict[str, torch.Tensor] = OrderedDict()

    def _build_network(self, config: PolicyConfig) -> nn.Module:
        return LSTMNetwork(config.hidden_size, config.lstm_hidden, config.dropout)

    def _zeros(self, batch_size: int) -> torch.Tensor:
        return torch.zeros(batch_size, 2, self.config.lstm_hidden, device=self.device)

    def _checked(self, hidden: torch.Tensor, batch_size: int) -> torch.Tensor:
        expected = (batch_size, 2, self.config.lstm_hidden)
        if tuple(hidden.shape) != expected:
            raise ValueError(f"hidden must have shape {expected}, got {tuple(hidden.shape)}")
        return hidden.to(self.device, torch.float32)

    def _hidden_for_act(
        self, observations: Sequence[Observation], hidden: torch.Tensor | None
    ) -> torch.Tensor:
        if hidden is not None:
            return self._checked(hidden, len(observations))
        zero = None
        rows = []
        for obs in observations:
            row = self._hidden.get(obs.run_id)
            if row is None:
                zero = zero if zero is not None else self._zeros(1)[0]
                row = zero
            rows.append(row)
        return torch.stack(rows)

    def _hidden_for_evaluate(self, batch_size: int, hidden: torch.Tensor | None) -> torch.Tensor:
        return self._zeros(batch_size) if hidden is None else self._checked(hidden, batch_size)

    def _remember(self, observations: Sequence[Observation], hidden: torch.Tensor | None) -> None:
        # A run appearing twice in one batch keeps the state of its last occurrence.
        assert hidden is not None
        for obs, row in zip(observations, hidden.unbind(0), strict=True):
            self._hidden[obs.run_id] = row
            self._hidden.move_to_end(obs.run_id)
        while len(self._hidden) > self.config.lstm_max_runs:
            self._hidden.popitem(last=False)  # least recently acted-on run

    def _forward(
        self, batch: GraphBatch, hidden: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        assert hidden is not None
        node_out, values, h, c = self._network(
            batch.x, batch.global_x, batch.batch, hidden[:, 0], hidden[:, 1]
        )
        return node_out, values, torch.stack([h, c], dim=1)

    def hidden_state(self, run_id: str) -> torch.Tensor | None:
        """The run's current [2, H] state (None if unknown)."""
        with self._lock:
            row = self._hidden.get(run_id)
            return None if row is None else row.clone()

    @property
    def tracked_runs(self) -> int:
        return len(self._hidden)

    def reset_run(self, run_id: str) -> None:
        """Start the run's next step from zeros (e.g. a new episode)."""
        self.forget([run_id])

    def forget(self, run_ids: Sequence[str]) -> None:
        with self._lock:
            for run_id in run_ids:
                self._hidden.pop(run_id, None)
