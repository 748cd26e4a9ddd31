"""PPO (Schulman et al. 2017) on recorded Transitions, in the shape of CleanRL's ppo.py.

One `update(transitions)` is one CleanRL iteration after the rollout:

 1. group the transitions by run, in order, into sequences (cut at episode ends and gaps);
 2. bootstrap each sequence that did not end its episode with V(next_obs) from the current
    network (truncated sequences included: an eviction is not a terminal state);
 3. GAE(lambda) per sequence on the recorded values, returns = advantages + values;
 4. `epochs` x shuffled minibatches of `policy.evaluate`: clipped surrogate, (optionally
    clipped) value loss, entropy bonus, gradient-norm clipping, Adam;
 5. KL early stop: once a minibatch's approx KL to the behaviour policy exceeds
    1.5 * target_kl, stop before stepping on it (the Stable-Baselines3 rule).

The old log-probs are the behaviour log-probs recorded at decision time, so a batch made
partly by an older policy version still gets a correct ratio (and, if it is far off,
stops at once on KL). Non-finite data, loss or gradients raise `NonFiniteError` with the
weights and optimizer state restored to what they were before the call.

Also home of what the PPO and IMPALA learners share: `UpdateStats`, `NonFiniteError`
and the sequence helpers.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Annotated, Any

import msgspec
import numpy as np
import torch
from msgspec import Meta

from esperd.analyzer.observation import ACTION_WIDTH, OP_INDEX, Observation
from esperd.learn.config import PPOConfig
from esperd.learn.experience import Transition
from esperd.learn.gae import compute_gae
from esperd.policy.base import PolicyBundle
from esperd.policy.batch import PackedGraphs
from esperd.policy.neural import NeuralPolicyBundle
from esperd_contracts import Op

PositiveFloat = Annotated[float, Meta(gt=0.0)]
Coef = Annotated[float, Meta(ge=0.0, le=1e3)]
Discount = Annotated[float, Meta(ge=0.0, le=1.0)]


class NonFiniteError(RuntimeError):
    """A learner met a non-finite reward, loss or gradient. Nothing was applied: the policy's
    weights and the optimizer state are as they were before the update."""


class UpdateStats(msgspec.Struct, kw_only=True):
    """What one learner update did. Losses are means per sample (minibatch means for PPO)."""

    algorithm: str  # "ppo" | "impala"
    update: int  # the learner's update counter after this update
    samples: int  # transitions in this update
    policy_loss: float
    value_loss: float
    entropy: float  # mean entropy of the policy on the batch
    approx_kl: float  # KL(behaviour || current) estimate, (r - 1) - log r, at the last minibatch
    clip_fraction: float  # PPO: |ratio - 1| > clip; IMPALA: rho > rho_bar
    grad_norm: float  # mean pre-clipping gradient norm over optimizer steps
    lr: float
    epochs_run: int
    steps: int  # optimizer steps taken
    early_stopped: bool  # PPO: stopped on KL
    explained_variance: float  # 1 - Var(target - V) / Var(target); 1 is perfect, <= 0 is useless
    seconds: float
    td_errors: list[float] = []  # IMPALA: |v_s - V(x_s)| per input transition (replay priorities)
    # IMPALA's V-trace diagnostics (002), over the batch's steps: mean importance ratio rho and
    # trace coefficient c = min(c_bar, rho), the replay importance weights' mean, and the
    # fractions of rho clipped by c_bar and by pg_rho_bar (clip_fraction: by rho_bar).
    rho_mean: float = 0.0
    c_mean: float = 0.0
    importance_weight_mean: float = 0.0
    c_clip_fraction: float = 0.0
    pg_clip_fraction: float = 0.0
    unrolls: int = 0  # contiguous sequences V-trace ran over


def lr_factor(steps: int, warmup: int, total: int, final_ratio: float) -> float:
    """Multiplier of the base LR once `steps` environment steps have been trained on (this update's
    included): linear warmup over `warmup` steps, then linear decay to `final_ratio` at `total`."""
    if steps < warmup:
        return max(steps, 1) / warmup
    if total <= warmup:
        return 1.0
    progress = min((steps - warmup) / (total - warmup), 1.0)
    return 1.0 - progress * (1.0 - final_ratio)


# ---------------------------------------------------------------- shared helpers


def _same_step(a: Observation, b: Observation) -> bool:
    # Identity is the normal case (the recorder links next_obs to the next obs); after a
    # buffer reload they are equal copies, so compare the step's identity instead.
    return a is b or (
        a.run_id == b.run_id
        and a.epoch == b.epoch
        and a.timestamp == b.timestamp
        and a.topology_version == b.topology_version
    )


def split_sequences(transitions: Sequence[Transition]) -> list[list[int]]:
    """Indices of `transitions` grouped by run, in order, one list per contiguous piece of an episode.

    A sequence ends where its episode ends (done or truncated) or where the next transition of
    the run does not start from this one's `next_obs` (a gap, or steps sampled from a replay
    buffer). Sequences are ordered by their first transition.
    """
    open_by_run: dict[str, list[int]] = {}
    sequences: list[list[int]] = []
    for i, tr in enumerate(transitions):
        seq = open_by_run.get(tr.run_id)
        prev_next = transitions[seq[-1]].next_obs if seq else None
        if seq and prev_next is not None and _same_step(prev_next, tr.obs):
            seq.append(i)
        else:
            seq = [i]
            sequences.append(seq)
            open_by_run[tr.run_id] = seq
        if tr.done or tr.truncated:
            del open_by_run[tr.run_id]
    return sequences


class SequenceLayout:
    """Sequences right-aligned in a time-major [T, S] grid, so one backward scan serves all.

    Sequence j of length L fills rows T - L .. T - 1 of column j; the rows above it are
    padding, which recursions running backward in time never read for real steps.
    """

    def __init__(self, sequences: Sequence[Sequence[int]], device: torch.device) -> None:
        self.T = max(len(s) for s in sequences)
        self.S = len(sequences)
        order = [i for s in sequences for i in s]
        rows = [self.T - len(s) + k for s in sequences for k in range(len(s))]
        cols = [j for j, s in enumerate(sequences) for _ in s]
        self.order = torch.tensor(order, dtype=torch.int64, device=device)
        self.rows = torch.tensor(rows, dtype=torch.int64, device=device)
        self.cols = torch.tensor(cols, dtype=torch.int64, device=device)

    def grid(self, flat: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """[n] per-transition values -> [T, S] grid (padding = `fill`)."""
        out = flat.new_full((self.T, self.S), fill)
        out[self.rows, self.cols] = flat[self.order]
        return out

    def flat(self, grid: torch.Tensor) -> torch.Tensor:
        """[T, S] grid -> [n] per-transition values, in the transitions' order."""
        out = grid.new_empty(self.order.shape[0])
        out[self.order] = grid[self.rows, self.cols]
        return out


def bptt_chunks(sequences: Sequence[Sequence[int]], length: int) -> list[list[int]]:
    """The sequences cut into pieces of at most `length` consecutive steps (truncated BPTT)."""
    return [list(seq[i : i + length]) for seq in sequences for i in range(0, len(seq), length)]


def stack_actions(transitions: Sequence[Transition], device: torch.device) -> torch.Tensor:
    """int64 [n, ACTION_WIDTH] action rows."""
    return torch.from_numpy(np.stack([np.asarray(t.action, dtype=np.int64) for t in transitions])).to(device)


def stack_hidden(
    policy: PolicyBundle, transitions: Sequence[Transition], device: torch.device
) -> torch.Tensor | None:
    """Recurrent policies: the [n, 2, H] states the steps started from (zeros where unknown)."""
    if not policy.is_recurrent:
        return None
    known = [t.hidden for t in transitions if t.hidden is not None]
    if not known:
        return None  # evaluate starts every step from zeros
    zeros = np.zeros_like(known[0], dtype=np.float32)
    rows = [zeros if t.hidden is None else np.asarray(t.hidden, dtype=np.float32) for t in transitions]
    return torch.from_numpy(np.stack(rows)).to(device)


@torch.no_grad()
def bootstrap_values(
    policy: PolicyBundle,
    transitions: Sequence[Transition],
    sequences: Sequence[Sequence[int]],
    fallback: torch.Tensor,
) -> torch.Tensor:
    """[S] value of the state after each sequence: 0 when its episode ended, else V(next_obs).

    V(next_obs) comes from the current network in one batched forward. A recurrent policy
    starts that step from a zero state (the next step's state is not recorded). A step with
    neither `done` nor `next_obs` falls back to `fallback[i]`, its own value estimate.
    """
    device = fallback.device
    out = torch.zeros(len(sequences), device=device)
    wanted: list[tuple[int, Observation]] = []
    for j, seq in enumerate(sequences):
        last = transitions[seq[-1]]
        if last.done:
            continue
        if last.next_obs is None:
            out[j] = fallback[seq[-1]]
        else:
            wanted.append((j, last.next_obs))
    if wanted:
        observations = [obs for _, obs in wanted]
        # evaluate needs actions; WAIT on node 0 is always representable, and only values are used.
        actions = torch.zeros(len(observations), ACTION_WIDTH, dtype=torch.int64, device=device)
        actions[:, 1] = OP_INDEX[Op.WAIT]
        values = policy.evaluate(observations, actions).values.float()
        out[torch.tensor([j for j, _ in wanted], device=device)] = values.to(device)
    return out


def explained_variance(predicted: torch.Tensor, target: torch.Tensor) -> float:
    """1 - Var(target - predicted) / Var(target); 0 when the target does not vary."""
    var = float(target.var(unbiased=False))
    if var == 0.0:
        return 0.0
    return 1.0 - float((target - predicted).var(unbiased=False)) / var


def check_finite(what: str, *tensors: torch.Tensor) -> None:
    for tensor in tensors:
        if not bool(torch.isfinite(tensor).all()):
            raise NonFiniteError(f"non-finite {what}")


def _snapshot(
    policy: PolicyBundle, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, Any], dict[str, Any]]:
    return policy.state_dict(), _cloned(optimizer.state_dict())


def _cloned(value: Any) -> Any:
    """A deep copy of a state dict's nesting of dicts, lists and tensors (copy.deepcopy's
    generic walk costs several times as much, once per update)."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _cloned(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_cloned(v) for v in value)
    return copy.deepcopy(value)


def clip_grad_norm(params: Sequence[torch.Tensor], max_norm: float) -> torch.Tensor:
    """nn.utils.clip_grad_norm_(params, max_norm) for parameters on one device, the same ops
    (foreach norms, their norm, foreach scaling by min(1, max_norm / (norm + 1e-6))) without its
    per-call grouping and checks, which cost as much as the ops at a minibatch's size."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)), 2.0)
    torch._foreach_mul_(grads, torch.clamp(max_norm / (total + 1e-6), max=1.0))
    return total


def _restore(
    policy: PolicyBundle, optimizer: torch.optim.Optimizer, snapshot: tuple[dict[str, Any], dict[str, Any]]
) -> None:
    weights, optim_state = snapshot
    policy.load_state_dict(weights)
    optimizer.load_state_dict(optim_state)
    optimizer.zero_grad(set_to_none=True)


# ---------------------------------------------------------------- PPO


def _minibatches(chunks: Sequence[Sequence[int]], size: int) -> list[list[Sequence[int]]]:
    """Consecutive groups of chunks of about `size` steps each (a group closes once it reaches
    `size`; single-step chunks give exactly `size`, the last group the rest)."""
    groups: list[list[Sequence[int]]] = [[]]
    count = 0
    for chunk in chunks:
        if count >= size:
            groups.append([])
            count = 0
        groups[-1].append(chunk)
        count += len(chunk)
    return [g for g in groups if g]


def _epoch_minibatches(
    chunks: Sequence[Sequence[int]], perm: torch.Tensor, size: int
) -> Iterator[tuple[np.ndarray, list[list[int]] | None]]:
    """One epoch's minibatches, the chunks taken in `perm` order: (the steps, as indices into the
    update's transitions; each chunk's positions within the minibatch, or None where every
    chunk is a single step). Single steps are plain slices of the permutation."""
    if all(len(chunk) == 1 for chunk in chunks):
        order = np.asarray([chunk[0] for chunk in chunks], dtype=np.int64)[perm.numpy()]
        for start in range(0, len(order), size):
            yield order[start : start + size], None
        return
    for group in _minibatches([chunks[j] for j in perm.tolist()], size):
        flat = np.asarray([i for chunk in group for i in chunk], dtype=np.int64)
        local, offset = [], 0
        for chunk in group:  # positions of each chunk's steps within the minibatch
            local.append(list(range(offset, offset + len(chunk))))
            offset += len(chunk)
        yield flat, local


def _fused(device: torch.device) -> bool:
    """Whether Adam runs its fused kernel on `device`: one op per step for all parameters, where
    torch's default on CPU loops over them with about ten ops each (most of an optimizer step
    at a minibatch's size). Same update up to float rounding."""
    return device.type in ("cpu", "cuda")


def _fuse(optimizer: torch.optim.Optimizer) -> None:
    """Switch a loaded Adam to the fused kernel (a loaded state brings its own flags), its step
    counts on the parameters' device as the kernel wants them."""
    for group in optimizer.param_groups:
        if group.get("fused"):
            continue
        group["fused"], group["foreach"] = True, None
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            if "step" in state:
                step = torch.as_tensor(state["step"], dtype=torch.float32)
                state["step"] = step.to(param.device, copy=True)  # its own: the kernel counts in place


class PPOUpdater:
    """Trains a learnable PolicyBundle in place with PPO. Not thread-safe: one caller at a time.

    It never touches `policy.version`; whoever publishes the new weights does (the Learner,
    esperd.learn.learner, which orchestrates; esperd.learn.algorithms is its loop side).
    """

    algorithm = "ppo"

    def __init__(
        self,
        policy: PolicyBundle,
        config: PPOConfig | None = None,
        auxiliary: Callable[[int], torch.Tensor | None] | None = None,
    ) -> None:
        """`auxiliary(update)`: an extra loss added to every minibatch's (None: nothing), given the
        number of updates made so far (e.g. a decaying behaviour-cloning term after a warm start)."""
        if not policy.is_learnable:
            raise ValueError(f"policy {policy.name!r} has no parameters to learn")
        self.policy = policy
        self.auxiliary = auxiliary
        self.config = config = config or PPOConfig()
        self.device = torch.device(policy.device)
        self.params = [p for p in policy.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(
            self.params, lr=config.lr, eps=config.adam_eps, fused=_fused(self.device)
        )
        # The schedule follows environment steps (002), not updates: an update's LR is set from the
        # steps trained on once its batch is in, so a larger batch moves it further.
        self._schedule = config.schedule_steps
        self._set_lr(0)
        self.generator = torch.Generator()
        if config.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(config.seed)
        self.updates = 0  # successful updates
        self.samples = 0  # transitions trained on

    # ------------------------------------------------------------ the update

    def update(self, transitions: Sequence[Transition]) -> UpdateStats:
        """One PPO iteration on `transitions` (ideally `rollout_size` fresh on-policy steps)."""
        if not transitions:
            raise ValueError("ppo: no transitions to learn from")
        start = time.perf_counter()
        cfg, device, n = self.config, self.device, len(transitions)

        rewards = torch.tensor([t.reward for t in transitions], dtype=torch.float32, device=device)
        dones = torch.tensor([t.done for t in transitions], dtype=torch.float32, device=device)
        old_values = torch.tensor([t.value for t in transitions], dtype=torch.float32, device=device)
        old_log_probs = torch.tensor([t.log_prob for t in transitions], dtype=torch.float32, device=device)
        check_finite("rewards, values or log-probs in the batch", rewards, old_values, old_log_probs)

        # GAE over each run's sequences at once: right-aligned columns of a [T, S] grid.
        sequences = split_sequences(transitions)
        layout = SequenceLayout(sequences, device)
        last_values = bootstrap_values(self.policy, transitions, sequences, old_values)
        check_finite("bootstrap values", last_values)
        adv_grid, _ = compute_gae(
            layout.grid(rewards),
            layout.grid(old_values),
            layout.grid(dones, fill=1.0),
            last_values,
            cfg.gamma,
            cfg.gae_lambda,
        )
        advantages = layout.flat(adv_grid)
        returns = advantages + old_values

        # Collated once for the whole update; a minibatch is then an index selection of it.
        observations: list[Observation] | PackedGraphs = [t.obs for t in transitions]
        if isinstance(self.policy, NeuralPolicyBundle):
            observations = self.policy.pack(observations)
        actions = stack_actions(transitions, device)
        hidden = stack_hidden(self.policy, transitions, device)
        # Recurrent policies learn through time over pieces of each run's steps; others step by step.
        chunks = bptt_chunks(sequences, cfg.bptt_length) if hidden is not None else [[i] for i in range(n)]
        snapshot = _snapshot(self.policy, self.optimizer)
        lr = self._set_lr(self.samples + n)  # this update's LR, from the steps trained on with it
        try:
            totals, approx_kl, epochs_run, steps, stopped = self._optimize(
                observations, actions, hidden, old_log_probs, old_values, advantages, returns, chunks
            )
        except NonFiniteError:
            _restore(self.policy, self.optimizer, snapshot)  # its LR too: the batch was not trained on
            raise

        self.updates += 1
        self.samples += n
        evaluated = max(totals["minibatches"], 1)
        return UpdateStats(
            algorithm=self.algorithm,
            update=self.updates,
            samples=n,
            policy_loss=totals["policy_loss"] / evaluated,
            value_loss=totals["value_loss"] / evaluated,
            entropy=totals["entropy"] / evaluated,
            approx_kl=approx_kl,
            clip_fraction=totals["clip_fraction"] / evaluated,
            grad_norm=totals["grad_norm"] / max(steps, 1),
            lr=lr,
            epochs_run=epochs_run,
            steps=steps,
            early_stopped=stopped,
            explained_variance=explained_variance(old_values, returns),
            seconds=time.perf_counter() - start,
        )

    def _optimize(
        self,
        observations: list[Observation] | PackedGraphs,
        actions: torch.Tensor,
        hidden: torch.Tensor | None,
        old_log_probs: torch.Tensor,
        old_values: torch.Tensor,
        advantages: torch.Tensor,
        returns: torch.Tensor,
        chunks: Sequence[Sequence[int]],
    ) -> tuple[dict[str, float], float, int, int, bool]:
        """Epochs x minibatches; (summed stats, last approx KL, epochs run, steps, early-stopped).

        A minibatch is whole `chunks` (single steps, or a recurrent policy's pieces of a run's
        consecutive steps, unrolled through time) in shuffled order, about minibatch_size steps."""
        cfg, n = self.config, len(observations)
        size = min(cfg.minibatch_size, n)
        totals = dict.fromkeys(("policy_loss", "value_loss", "entropy", "clip_fraction", "grad_norm"), 0.0)
        totals["minibatches"] = 0
        approx_kl, steps, epochs_run = 0.0, 0, 0
        for _epoch in range(cfg.epochs):
            epochs_run += 1
            perm = torch.randperm(len(chunks), generator=self.generator)
            for flat, local in _epoch_minibatches(chunks, perm, size):
                idx = torch.from_numpy(flat).to(self.device)
                if isinstance(observations, PackedGraphs) and isinstance(self.policy, NeuralPolicyBundle):
                    result = self.policy.evaluate(
                        observations.select(flat, training=True),
                        actions[idx],
                        None if hidden is None else hidden[idx],
                        sequences=local,
                    )
                else:
                    result = self.policy.evaluate(
                        [observations[i] for i in flat],  # type: ignore[index]
                        actions[idx],
                        None if hidden is None else hidden[idx],
                        sequences=local,
                    )
                logratio = result.log_probs - old_log_probs[idx]
                ratio = logratio.exp()
                with torch.no_grad():
                    # The low-variance KL estimator (Schulman's k3) CleanRL reports.
                    approx_kl = float(((ratio - 1) - logratio).mean())
                    clip_fraction = float(((ratio - 1.0).abs() > cfg.clip_ratio).float().mean())

                mb_adv = advantages[idx]
                if cfg.normalize_advantages and idx.numel() > 1:
                    mb_adv = (mb_adv - mb_adv.mean()) / (mb_adv.std() + 1e-8)

                # Clipped surrogate: pessimistic of the unclipped and clipped objectives.
                pg_loss1 = -mb_adv * ratio
                pg_loss2 = -mb_adv * torch.clamp(ratio, 1 - cfg.clip_ratio, 1 + cfg.clip_ratio)
                pg_loss = torch.max(pg_loss1, pg_loss2).mean()

                new_values = result.values
                if cfg.clip_value:
                    v_clipped = old_values[idx] + torch.clamp(
                        new_values - old_values[idx], -cfg.clip_ratio, cfg.clip_ratio
                    )
                    v_loss_unclipped = (new_values - returns[idx]) ** 2
                    v_loss_clipped = (v_clipped - returns[idx]) ** 2
                    v_loss = 0.5 * torch.max(v_loss_unclipped, v_loss_clipped).mean()
                else:
                    v_loss = 0.5 * ((new_values - returns[idx]) ** 2).mean()

                entropy = result.entropy.mean()
                loss = pg_loss - cfg.entropy_coef * entropy + cfg.value_coef * v_loss
                extra = None if self.auxiliary is None else self.auxiliary(self.updates)
                if extra is not None:
                    loss = loss + extra
                check_finite("ppo loss", loss)

                totals["policy_loss"] += pg_loss.item()
                totals["value_loss"] += v_loss.item()
                totals["entropy"] += entropy.item()
                totals["clip_fraction"] += clip_fraction
                totals["minibatches"] += 1

                # Too far from the behaviour policy already: stop before making it worse.
                if cfg.target_kl is not None and approx_kl > 1.5 * cfg.target_kl:
                    return totals, approx_kl, epochs_run, steps, True

                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = clip_grad_norm(self.params, cfg.max_grad_norm)
                check_finite("ppo gradients", grad_norm)
                self.optimizer.step()
                totals["grad_norm"] += float(grad_norm)
                steps += 1
        return totals, approx_kl, epochs_run, steps, False

    # ------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Optimizer, LR scheduler, counters and shuffling RNG (tensors and plain values only:
        `torch.load(weights_only=True)` reads it back). The policy's weights are saved separately."""
        return {
            "algorithm": self.algorithm,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": {"steps": self.samples},  # the LR schedule follows the steps trained on
            "updates": self.updates,
            "samples": self.samples,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("algorithm", self.algorithm) != self.algorithm:
            raise ValueError(f"learner state is for {state['algorithm']!r}, not {self.algorithm!r}")
        self.optimizer.load_state_dict(state["optimizer"])
        if _fused(self.device):  # a state saved before the fused kernel would turn it off again
            _fuse(self.optimizer)
        self.updates = int(state["updates"])
        self.samples = int(state["samples"])
        self._set_lr(self.samples)
        if "generator" in state:
            self.generator.set_state(state["generator"])

    def _set_lr(self, steps: int) -> float:
        """Set the LR the schedule gives after `steps` environment steps; returns it."""
        warmup, total = self._schedule
        lr = self.config.lr * lr_factor(steps, warmup, total, self.config.final_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def reset_optimizer(self) -> None:
        """Forget the optimizer's moment estimates (after a rollback they describe bad updates);
        the LR schedule and counters are kept."""
        self.optimizer.state.clear()
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def lr(self) -> float:
        """The LR of the last update (before the first: the schedule at step 0); each update sets
        its own from the steps trained on with it."""
        return float(self.optimizer.param_groups[0]["lr"])
