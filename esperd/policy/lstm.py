"""LSTM policy: the seed documents' factored recurrent actor-critic (003) over per-run features.

Each step, a run is summarised as [global features, mean over nodes, max over
nodes] and fed through an LSTM cell; per-node heads read each node's features
concatenated with the run's LSTM output, so the factored action space (node, op,
every lever) and masks are the same as the GNN's (esperd.policy.heads); the value
head reads the LSTM output. The recurrent state lives inside the bundle, keyed by
run id, in a bounded LRU (`lstm_max_runs`).

Learning is backpropagation through time over stored sequences: `evaluate(...,
sequences=...)` unrolls each sequence of one run's consecutive steps from the state
recorded at its first step, so the loss of a later step reaches the weights through
every earlier step of its sequence (truncated at the sequence's start). Without
sequences, each step replays from its own recorded state (one-step truncation).
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

    def encode(self, x: torch.Tensor, global_x: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        """Each run's step as the LSTM's input, [B, hidden]."""
        size = global_x.shape[0]
        run = torch.cat([global_x, global_mean_pool(x, batch, size), global_max_pool(x, batch, size)], dim=-1)
        encoded: torch.Tensor = self.run_encoder(run)
        return encoded

    def heads(
        self, x: torch.Tensor, batch: torch.Tensor, h: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-node head logits [N, NODE_HEAD_DIM], value [B]) from each run's LSTM output h."""
        node_out = self.node_head(torch.cat([x, h[batch]], dim=-1))
        return node_out, self.value_head(h).squeeze(-1)

    def forward(
        self, x: torch.Tensor, global_x: torch.Tensor, batch: torch.Tensor, h: torch.Tensor, c: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(per-node head logits [N, NODE_HEAD_DIM], value [B], h' [B, H], c' [B, H])."""
        h, c = self.cell(self.encode(x, global_x, batch), (h, c))
        node_out, value = self.heads(x, batch, h)
        return node_out, value, h, c

    def unroll(
        self,
        x: torch.Tensor,
        global_x: torch.Tensor,
        batch: torch.Tensor,
        start: torch.Tensor,
        sequences: Sequence[Sequence[int]],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-node head logits, value [B]) of B steps, each sequence of step indices unrolled in
        order from `start` [B, 2, H] at its first step (the later steps' rows of `start` are not
        read): a step's LSTM input state is the previous step's output, with its gradient.

        One LSTMCell call per time step for all sequences alive at it: sorted longest first, the
        alive ones are a prefix, so each step is a slice and a concatenation."""
        inputs = self.encode(x, global_x, batch)
        ordered = sorted(sequences, key=len, reverse=True)
        firsts = torch.tensor([seq[0] for seq in ordered], device=start.device)
        h, c = start[firsts, 0], start[firsts, 1]
        indices, outputs = [], []
        for t in range(len(ordered[0])):
            alive = sum(1 for seq in ordered if len(seq) > t)
            index = torch.tensor([seq[t] for seq in ordered[:alive]], device=start.device)
            h_t, c_t = self.cell(inputs[index], (h[:alive], c[:alive]))
            h, c = torch.cat([h_t, h[alive:]]), torch.cat([c_t, c[alive:]])
            indices.append(index)
            outputs.append(h_t)
        size = (inputs.shape[0], self.lstm_hidden)
        h_all = inputs.new_zeros(size).index_put((torch.cat(indices),), torch.cat(outputs))
        return self.heads(x, batch, h_all)


@register_policy("lstm")
class LSTMPolicy(NeuralPolicyBundle):
    """The recurrent bundle. Hidden state per run: [2, lstm_hidden] (h, c), zeros for a new run.

    `act` advances each run's state by one step. `ActResult.hidden` is the state the
    step started from; `evaluate(obs, actions, hidden)` replays single steps from
    such stored states (None means a fresh episode: zeros), and with `sequences`
    unrolls each sequence through time from its first step's stored state (BPTT).
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

    def _forward_sequences(
        self, batch: GraphBatch, hidden: torch.Tensor | None, sequences: Sequence[Sequence[int]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        assert hidden is not None
        network: LSTMNetwork = self.base_network  # type: ignore[assignment]
        return network.unroll(batch.x, batch.global_x, batch.batch, hidden, sequences)

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
