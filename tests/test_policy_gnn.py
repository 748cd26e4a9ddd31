"""GNN policy: masks, batching, act/evaluate consistency, gradients, entropy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch_geometric.data import Batch, Data

from esperd.analyzer.observation import (
    ACTION_WIDTH,
    ALPHA_LEVERS,
    BLEND_INDEX,
    GERMINATE_LEVERS,
    LEVERS,
    OP_INDEX,
    OPS,
    SIGMOID_LEVERS,
)
from esperd.policy import GNNPolicy, PolicyBundle, PolicyConfig, create_policy
from esperd.policy.batch import collate
from esperd.policy.heads import FactoredDistribution, sample_actions
from esperd_contracts import BlendAlgorithm, BlueprintFamily, Op, SeedStage
from tests.support.actions import every_action, legality_problem, row
from tests.support.observations import chain_edges, make_observation, mixed_batch, random_stages

GERMINATE = OP_INDEX[Op.GERMINATE]
WAIT = OP_INDEX[Op.WAIT]


@pytest.fixture
def policy() -> GNNPolicy:
    return create_policy("gnn", PolicyConfig(name="gnn", hidden_size=64, dropout=0.2))


def assert_legal(observations, actions: torch.Tensor) -> None:
    for obs, action in zip(observations, actions.tolist(), strict=True):
        problem = legality_problem(obs, action, choosable=True)
        assert problem is None, problem


def test_is_a_policy_bundle(policy: GNNPolicy) -> None:
    assert isinstance(policy, PolicyBundle)
    assert policy.name == "gnn" and policy.is_learnable and not policy.is_recurrent


@pytest.mark.parametrize("repeat", [4, 8])  # 24 runs: the small-batch sampler; 48: the batched one
def test_sampled_actions_are_always_legal(policy: GNNPolicy, repeat: int) -> None:
    observations = mixed_batch([1, 2, 5, 9, 16, 30] * repeat, seed=3)
    torch.manual_seed(0)
    seen_ops: set[int] = set()
    for _ in range(60):
        result = policy.act(observations)
        assert_legal(observations, result.actions)
        seen_ops.update(result.actions[:, 1].tolist())
    assert len(seen_ops) == len(OPS), "sampling should explore every op somewhere"


@pytest.mark.parametrize("copies", [8, 40])  # the small-batch sampler, the batched one
def test_samplers_draw_from_the_distribution(policy: GNNPolicy, copies: int) -> None:
    """Both samplers (Python CDF inversion up to _SMALL_BATCH graphs, batched Gumbel-max
    beyond) draw (node, op) with the distribution's probabilities and score what they drew
    with its log_prob."""
    obs = make_observation(
        "r", 4, stages=[SeedStage.DORMANT, SeedStage.TRAINING, SeedStage.BLENDING, SeedStage.DORMANT]
    )
    observations = [obs] * copies
    batch = collate(observations, policy.device)
    dist = policy.distribution([obs])
    joint = dist.node_probs()[0, :, None] * dist.op_probs()  # p(node, op), [4, OPS]
    with torch.no_grad():
        node_out, _, _ = policy._forward(batch, None)
    torch.manual_seed(5)
    counts = torch.zeros_like(joint)
    draws = 0
    while draws < 6000:
        sampled = sample_actions(batch, node_out)
        actions = torch.tensor(sampled.actions)
        counts.index_put_((actions[:, 0], actions[:, 1]), torch.ones(copies), accumulate=True)
        expected = FactoredDistribution(batch, node_out).log_prob(actions)
        torch.testing.assert_close(torch.tensor(sampled.log_probs), expected, atol=1e-5, rtol=0)
        draws += copies
    assert torch.all(counts[joint == 0] == 0)  # masked choices never come out
    sigma = (joint * (1 - joint) / draws).sqrt()
    assert torch.all((counts / draws - joint).abs() <= 5 * sigma + 1e-3)


def test_illegal_actions_have_exactly_zero_probability(policy: GNNPolicy) -> None:
    observations = mixed_batch([4, 11, 7], seed=5)
    dist = policy.distribution(observations)
    batch = collate(observations, policy.device)
    op_probs = dist.op_probs()
    assert torch.all(op_probs[~batch.op_mask] == 0.0)
    assert torch.all(op_probs[batch.op_mask] > 0.0)
    assert torch.allclose(op_probs.sum(-1), torch.ones(op_probs.shape[0]))
    bp_probs = dist.blueprint_logp.exp()
    assert torch.all(bp_probs[~batch.blueprint_mask] == 0.0)
    node_probs = dist.node_probs()
    for b, obs in enumerate(observations):
        actionable = torch.from_numpy(obs.op_mask[:, 1:].any(axis=1))
        assert torch.all(node_probs[b, : obs.num_nodes][~actionable] == 0.0)
        assert torch.all(node_probs[b, obs.num_nodes :] == 0.0)  # padding
        assert node_probs[b].sum().item() == pytest.approx(1.0, abs=1e-6)


def test_germinate_masked_when_no_blueprint_fits(policy: GNNPolicy) -> None:
    obs = make_observation("r", 3, stages=[SeedStage.DORMANT] * 3)
    obs.blueprint_mask[1, :] = False  # layer 1 has no fitting blueprint
    dist = policy.distribution([obs])
    assert dist.op_probs()[1, GERMINATE].item() == 0.0
    assert dist.node_probs()[0, 1].item() == 0.0  # WAIT is all it could do


def test_nothing_legal_means_wait_on_node_zero(policy: GNNPolicy) -> None:
    obs = make_observation("r", 4, stages=[SeedStage.FOSSILIZED] * 4)
    result = policy.act([obs])
    assert result.actions[0].tolist() == row(0, WAIT)
    assert result.log_probs[0].item() == pytest.approx(0.0, abs=1e-6)
    assert result.confidences[0].item() == pytest.approx(1.0)
    assert result.decisions[0].op is Op.WAIT and result.decisions[0].layer_id == int(obs.layer_ids[0])


def test_batched_equals_one_by_one(policy: GNNPolicy) -> None:
    observations = mixed_batch([3, 12, 1, 7, 64], seed=11)
    batched = policy.act(observations, deterministic=True)
    for i, obs in enumerate(observations):
        single = policy.act([obs], deterministic=True)
        assert single.actions[0].tolist() == batched.actions[i].tolist()
        assert single.log_probs[0].item() == pytest.approx(batched.log_probs[i].item(), abs=1e-5)
        assert single.values[0].item() == pytest.approx(batched.values[i].item(), abs=1e-5)


def test_evaluate_matches_act_log_probs(policy: GNNPolicy) -> None:
    observations = mixed_batch([2, 6, 9, 13, 4, 20], seed=7)
    torch.manual_seed(1)
    for _ in range(5):
        acted = policy.act(observations)
        evaluated = policy.evaluate(observations, acted.actions)
        torch.testing.assert_close(evaluated.log_probs.detach(), acted.log_probs, atol=1e-5, rtol=0)
        torch.testing.assert_close(evaluated.values.detach(), acted.values, atol=1e-5, rtol=0)


def test_gradients_flow_through_evaluate(policy: GNNPolicy) -> None:
    observations = mixed_batch([5, 8, 3], seed=2)
    actions = policy.act(observations).actions
    policy.train()
    result = policy.evaluate(observations, actions)
    assert result.log_probs.requires_grad and result.entropy.requires_grad
    loss = -result.log_probs.mean() - 0.01 * result.entropy.mean() + result.values.pow(2).mean()
    loss.backward()
    grads = {name: p.grad for name, p in policy.base_network.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["convs.0.lin.weight"].abs().sum() > 0
    assert grads["value_head.2.weight"].abs().sum() > 0


def test_entropy_equals_brute_force_enumeration(policy: GNNPolicy) -> None:
    obs = make_observation("r", 3, stages=[SeedStage.DORMANT, SeedStage.BLENDING, SeedStage.FOSSILIZED])
    # Every row with nonzero probability: each legal op of each node, with every combination of
    # the levers that op samples (steepness only with a sigmoid blend, alpha levers with
    # SET_ALPHA_TARGET); its probabilities must sum to 1 and give the analytic entropy.
    actions = list(every_action(obs, range(3)))
    assert any(a[1] == OP_INDEX[Op.SET_ALPHA_TARGET] for a in actions)
    result = policy.evaluate([obs] * len(actions), torch.tensor(actions))
    log_p = result.log_probs.detach().double()
    p = log_p.exp()
    assert p.sum().item() == pytest.approx(1.0, abs=1e-5)
    brute = -(p * torch.where(p > 0, log_p, 0.0)).sum().item()
    assert result.entropy[0].item() == pytest.approx(brute, abs=1e-4)


@pytest.mark.parametrize("scale", [1.0, 60.0])  # 60: heads far apart (a shared shift would underflow)
def test_distribution_matches_a_log_softmax_per_head(scale: float) -> None:
    """The table and entropy, computed for all heads at once, against the per-head computation
    (one log_softmax per head, each head's entropy on its own) they replace."""
    import torch.nn.functional as F

    from esperd.policy.heads import HEAD_SIZES, NODE_HEAD_DIM

    batch = collate(mixed_batch([5, 12, 2, 30], seed=4), torch.device("cpu"))
    generator = torch.Generator().manual_seed(int(scale))
    node_out = (torch.randn(batch.x.shape[0], NODE_HEAD_DIM, generator=generator) * scale).requires_grad_()
    dist = FactoredDistribution(batch, node_out)
    minimum = torch.finfo(torch.float32).min
    _, *heads = node_out.masked_fill(batch.illegal_logits, minimum).split(HEAD_SIZES, dim=-1)
    per_head = [F.log_softmax(head, dim=-1) for head in heads]
    table = torch.cat(per_head, dim=-1)
    assert torch.equal(dist.table == minimum, batch.illegal_logits[:, 1:])  # masked: log p exactly the min
    torch.testing.assert_close(dist.table, table, rtol=1e-6, atol=1e-5)

    def entropy(lp: torch.Tensor) -> torch.Tensor:
        return -(lp.exp() * lp).sum(-1)

    lever_h = torch.stack([entropy(lp) for lp in per_head[1:]])
    names = [name for name, _ in LEVERS]
    sums = {
        group: lever_h[[names.index(n) for n in group]].sum(0)
        for group in (GERMINATE_LEVERS, SIGMOID_LEVERS, ALPHA_LEVERS)
    }
    op_p, blend_p = per_head[0].exp(), per_head[1 + names.index("blend")].exp()
    per_node = (
        entropy(per_head[0])
        + op_p[:, GERMINATE]
        * (sums[GERMINATE_LEVERS] + blend_p[:, BLEND_INDEX[BlendAlgorithm.SIGMOID]] * sums[SIGMOID_LEVERS])
        + op_p[:, OP_INDEX[Op.SET_ALPHA_TARGET]] * sums[ALPHA_LEVERS]
    )
    node_p = dist.node_logp.exp().view(-1)[batch.node_slot]
    expected = entropy(dist.node_logp) + torch.zeros(batch.num_graphs).index_add(
        0, batch.batch, node_p * per_node
    )
    ours = dist.entropy()
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    (ours_grad,) = torch.autograd.grad(ours.sum(), node_out, retain_graph=True)  # node_logp is shared
    (expected_grad,) = torch.autograd.grad(expected.sum(), node_out)
    torch.testing.assert_close(ours_grad, expected_grad, rtol=1e-4, atol=1e-5)


def test_decisions_carry_levers_only_for_germinate(policy: GNNPolicy) -> None:
    families = [BlueprintFamily.TRANSFORMER] * 4
    observations = [make_observation(f"r{i}", 4, seed=i, families=families) for i in range(16)]
    torch.manual_seed(3)
    result = policy.act(observations)
    for decision in result.decisions:
        assert 0.0 <= decision.confidence <= 1.0 and 0.0 <= decision.urgency <= 1.0
        assert decision.policy == "gnn" and decision.policy_version == policy.version
        if decision.op is Op.GERMINATE:
            assert decision.blueprint is not None and decision.blueprint.family is BlueprintFamily.TRANSFORMER
            assert decision.blend is not None and decision.tempo is not None
        else:
            assert decision.blueprint is None and decision.blend is None and decision.tempo is None
    assert any(d.op is Op.GERMINATE for d in result.decisions)


def test_act_serves_in_eval_mode_even_while_training(policy: GNNPolicy) -> None:
    observations = mixed_batch([6, 9], seed=4)
    first = policy.act(observations, deterministic=True)
    policy.train()
    second = policy.act(observations, deterministic=True)
    assert policy.base_network.training  # act restored the learner's mode
    torch.testing.assert_close(first.log_probs, second.log_probs)
    torch.testing.assert_close(first.values, second.values)


def test_load_state_dict_sets_version(policy: GNNPolicy) -> None:
    other = create_policy("gnn", PolicyConfig(name="gnn", hidden_size=64, init_seed=99))
    observations = mixed_batch([5, 5], seed=1)
    before = policy.act(observations, deterministic=True)
    policy.load_state_dict(other.state_dict(), version=7)
    after = policy.act(observations, deterministic=True)
    assert all(d.policy_version == 7 for d in after.decisions)
    torch.testing.assert_close(after.values, other.act(observations, deterministic=True).values)
    assert not torch.allclose(before.values, after.values)


@pytest.mark.parametrize(("hidden", "layers", "residual"), [(64, 1, False), (256, 4, True)])
def test_architecture_options(hidden: int, layers: int, residual: bool) -> None:
    policy = create_policy(
        "gnn", PolicyConfig(name="gnn", hidden_size=hidden, gnn_layers=layers, residual=residual)
    )
    assert len(policy.base_network.convs) == layers
    assert policy.base_network.encoder[0].out_features == hidden
    observations = mixed_batch([4, 9], seed=8)
    result = policy.act(observations)
    assert result.actions.shape == (2, ACTION_WIDTH) and torch.isfinite(result.values).all()


def test_collate_matches_torch_geometric_batch() -> None:
    observations = mixed_batch([3, 8, 5], seed=9)
    ours = collate(observations, torch.device("cpu"))
    data = [
        Data(
            x=torch.from_numpy(o.node_features),
            edge_index=torch.from_numpy(o.gcn_edge_index),
            edge_weight=torch.from_numpy(o.gcn_edge_weight),
        )
        for o in observations
    ]
    theirs = Batch.from_data_list(data)
    assert torch.equal(ours.x, theirs.x)
    assert torch.equal(ours.edge_index, theirs.edge_index)
    assert torch.equal(ours.edge_weight, theirs.edge_weight)
    assert torch.equal(ours.batch, theirs.batch)
    assert torch.equal(ours.ptr, theirs.ptr)


def test_empty_observation_is_refused(policy: GNNPolicy) -> None:
    obs = make_observation("empty", 1)
    empty = type(obs)(
        run_id="empty",
        topology_version=1,
        layer_ids=np.zeros(0, np.int64),
        node_features=obs.node_features[:0],
        edge_index=np.zeros((2, 0), np.int64),
        gcn_edge_index=np.zeros((2, 0), np.int64),
        gcn_edge_weight=np.zeros(0, np.float32),
        global_features=obs.global_features,
        op_mask=obs.op_mask[:0],
        blueprint_mask=obs.blueprint_mask[:0],
        stages=np.zeros(0, np.int64),
    )
    with pytest.raises(ValueError, match="no nodes"):
        policy.act([empty])


def test_random_stage_helper_covers_masks() -> None:
    # Guard for the helper itself: mixed stages give both legal and illegal ops.
    obs = make_observation("r", 40, stages=random_stages(40, 0))
    assert obs.op_mask.any() and not obs.op_mask.all()


def test_sparse_and_edge_index_message_passing_agree(policy: GNNPolicy) -> None:
    from esperd.policy.gnn import sparse_adjacency

    batch = collate(mixed_batch([5, 12, 2], seed=12), policy.device)
    net = policy.base_network
    with torch.no_grad():
        dense_nodes, dense_value = net(
            batch.x, batch.global_x, batch.edge_index, batch.edge_weight, batch.batch
        )
        sparse_nodes, sparse_value = net(batch.x, batch.global_x, sparse_adjacency(batch), None, batch.batch)
    torch.testing.assert_close(sparse_nodes, dense_nodes, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sparse_value, dense_value, atol=1e-5, rtol=1e-5)
    assert sparse_adjacency(batch).to_dense().sum().item() == pytest.approx(
        batch.edge_weight.sum().item(), rel=1e-5
    )


def _frozen_topology(obs):  # as the analyzer hands them out: topology arrays shared, read-only
    for array in (obs.gcn_edge_index, obs.gcn_edge_weight, obs.blueprint_mask):
        array.setflags(write=False)
    return obs


def _assert_same_batch(ours, expected) -> None:
    tensors = ("x", "global_x", "edge_index", "edge_weight", "batch", "position", "ptr", "op_mask")
    for field in (*tensors, "blueprint_mask", "illegal_logits", "node_slot"):
        assert torch.equal(getattr(ours, field), getattr(expected, field)), field
    assert torch.equal(ours.adjacency.to_dense(), expected.adjacency.to_dense())
    assert ours.adjacency.layout == expected.adjacency.layout
    assert (ours.num_graphs, ours.max_nodes) == (expected.num_graphs, expected.max_nodes)


@pytest.mark.parametrize("num_nodes", [5, 20, 60])  # dense adjacency up to 48 nodes, CSR beyond
def test_topology_cache_collates_like_collate(num_nodes: int) -> None:
    import msgspec

    from esperd.policy.batch import TopologyCache

    device = torch.device("cpu")
    cache = TopologyCache(device, adjacency=True)
    first = _frozen_topology(make_observation("r", num_nodes, seed=1, stages=random_stages(num_nodes, 1)))
    later = msgspec.structs.replace(  # same topology version, new features and stages
        first,
        node_features=first.node_features[::-1].copy(),
        global_features=first.global_features + 1.0,
        op_mask=make_observation("r", num_nodes, stages=random_stages(num_nodes, 2)).op_mask,
    )
    for obs in (first, later, first, later):  # first visit, new op mask pattern, then hits
        _assert_same_batch(cache.collate(obs), collate([obs], device))
    assert len(cache) == 1
    moved = _frozen_topology(make_observation("r", num_nodes, seed=1, edges=chain_edges(num_nodes)))
    _assert_same_batch(cache.collate(moved), collate([moved], device))  # a new topology version
    writable = make_observation("w", num_nodes)
    _assert_same_batch(cache.collate(writable), collate([writable], device))
    assert len(cache) == 1  # writable topology arrays may change under us: never cached


@pytest.mark.parametrize("sizes", [[5, 12, 2, 9], [60, 3, 7], [1, 4]])  # dense and CSR selections
def test_packed_selections_collate_like_collate(sizes: list[int]) -> None:
    """A learner's minibatch taken from the rollout collated once is the batch collate makes of
    the same observations: every tensor, the adjacency and its transpose."""
    from esperd.policy.batch import PackedGraphs, lever_logits_mask
    from esperd.policy.heads import logit_masks

    device = torch.device("cpu")
    lever_mask = lever_logits_mask(frozenset({"dwell", "steepness"}))  # the others held
    observations = mixed_batch(sizes, seed=21)
    packed = PackedGraphs(observations, device, adjacency=True, lever_mask=lever_mask)
    n = len(observations)
    for graphs in ([0], list(range(n)), list(reversed(range(n))), [n - 1, 0], [1, 1, 0]):
        ours = packed.select(np.array(graphs), training=True)
        expected = collate([observations[g] for g in graphs], device, lever_mask=lever_mask, training=True)
        _assert_same_batch(ours, expected)
        if expected.adjacency_t is None:  # dense: autograd transposes it as a view
            assert ours.adjacency_t is None and expected.adjacency.layout == torch.strided
        else:
            assert torch.equal(ours.adjacency_t.to_dense(), expected.adjacency.to_dense().t())
            assert torch.equal(expected.adjacency_t.to_dense(), expected.adjacency.to_dense().t())
        for ours_mask, expected_mask, reference in zip(
            ours.logit_masks, expected.logit_masks, logit_masks(expected.illegal_logits), strict=True
        ):
            assert torch.equal(ours_mask, expected_mask) and torch.equal(expected_mask, reference)
    assert packed.select([0]).adjacency_t is None and packed.select([0]).logit_masks is None  # training only


def test_inference_weights_follow_the_parameters(policy: GNNPolicy) -> None:
    """The forward without autograd uses prebuilt views of the parameters: an in-place update,
    a state-dict load and a copy of the network must all be seen by it."""
    import copy

    batch = collate(mixed_batch([5, 7], seed=6), policy.device)
    net = policy.base_network

    def both(module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.inference_mode():
            inference = module(batch.x, batch.global_x, batch.adjacency, None, batch.batch)[0]
        autograd = module(batch.x, batch.global_x, batch.adjacency, None, batch.batch)[0]  # fresh views
        return inference, autograd.detach()

    with torch.no_grad():
        net.convs[0].lin.weight.mul_(1.5)  # as an optimizer step does
    torch.testing.assert_close(*both(net))
    other = create_policy("gnn", PolicyConfig(name="gnn", hidden_size=64, init_seed=5))
    policy.load_state_dict(other.state_dict())
    torch.testing.assert_close(*both(net))
    duplicate = copy.deepcopy(net)
    with torch.no_grad():
        duplicate.node_head[0].weight.mul_(-1.0)
    torch.testing.assert_close(*both(duplicate))
    assert "_inference_weights" not in net.state_dict() and not any(
        "inference" in k for k in net.state_dict()
    )
