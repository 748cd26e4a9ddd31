"""Property tests across analyzer and policies: clusters vs networkx, masks never broken."""

from __future__ import annotations

import msgspec
import networkx as nx
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from esperd.analyzer import Analyzer, AnalyzerConfig
from esperd.decisions import to_command
from esperd.policy import HeuristicConfig, PolicyBundle, PolicyConfig, create_policy
from esperd.policy.base import ALL_LEVERS
from esperd_contracts import (
    LEGAL_OPS,
    AdaptationCommand,
    BlendAlgorithm,
    Blueprint,
    Codec,
    HealthSignal,
    Op,
    SeedSlotState,
    SeedStage,
    SystemStatePacket,
    TopologyNode,
    TopologyPacket,
    family_for_layer_type,
)
from tests.support.actions import legality_problem

LAYER_TYPES = ["conv", "conv2d", "linear", "attention", "mlp", "layernorm", "pool"]


@st.composite
def random_runs(draw: st.DrawFn) -> tuple[TopologyPacket, list[float], list[SeedStage]]:
    """A random DAG (edges only from lower to higher ids), health per layer, a stage per slot."""
    n = draw(st.integers(min_value=1, max_value=24))
    pairs = [(a, b) for a in range(n) for b in range(a + 1, n)]
    edges = draw(st.lists(st.sampled_from(pairs), unique=True, max_size=min(len(pairs), 40))) if pairs else []
    types = draw(st.lists(st.sampled_from(LAYER_TYPES), min_size=n, max_size=n))
    slots = draw(st.lists(st.integers(min_value=0, max_value=2), min_size=n, max_size=n))
    nodes = [
        TopologyNode(layer_id=i, name=f"l{i}", layer_type=t, seed_slots=s)
        for i, (t, s) in enumerate(zip(types, slots, strict=True))
    ]
    health = draw(st.lists(st.floats(min_value=0.0, max_value=1.0), min_size=n, max_size=n))
    stages = draw(st.lists(st.sampled_from(list(SeedStage)), min_size=n, max_size=n))
    return TopologyPacket(nodes=nodes, edges=edges), health, stages


def load_run(
    analyzer: Analyzer, run_id: str, topo: TopologyPacket, health: list[float], stages: list[SeedStage]
) -> None:
    analyzer.ingest_topology(run_id, topo, now=1.0)
    for layer, score in enumerate(health):
        analyzer.ingest_health(run_id, HealthSignal(layer_id=layer, health_score=score), now=1.0)
    analyzer.ingest_state(
        run_id,
        SystemStatePacket(
            epoch=10,
            val_accuracy=0.5,
            seeds=[SeedSlotState(layer_id=i, stage=s) for i, s in enumerate(stages)],
        ),
        now=1.0,
    )


@settings(max_examples=150, deadline=None)
@given(random_runs())
def test_clusters_equal_networkx_components(run: tuple[TopologyPacket, list[float], list[SeedStage]]) -> None:
    topo, health, stages = run
    analyzer = Analyzer(AnalyzerConfig())
    load_run(analyzer, "r", topo, health, stages)
    problematic = {i for i, h in enumerate(health) if h < analyzer.config.problematic_health}
    graph = nx.Graph()
    graph.add_nodes_from(problematic)
    graph.add_edges_from((a, b) for a, b in topo.edges if a in problematic and b in problematic)
    expected = sorted(sorted(c) for c in nx.connected_components(graph))
    assert sorted(sorted(c) for c in analyzer.clusters("r")) == expected


@pytest.fixture(scope="module")
def policies() -> dict[str, PolicyBundle]:
    torch.set_num_threads(1)
    # Thresholds at zero so the heuristic acts whenever its rules allow: more ops to check.
    config = PolicyConfig(
        heuristic=HeuristicConfig(min_epoch=0, confidence_threshold=0.0, urgency_threshold=0.0)
    )
    return {name: create_policy(name, config, "cpu") for name in ("heuristic", "gnn", "lstm")}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(runs=st.lists(random_runs(), min_size=1, max_size=4))
def test_no_policy_emits_an_illegal_op_or_a_foreign_blueprint(
    policies: dict[str, PolicyBundle], runs: list[tuple[TopologyPacket, list[float], list[SeedStage]]]
) -> None:
    analyzer = Analyzer(AnalyzerConfig())
    truth: dict[str, tuple[TopologyPacket, list[SeedStage]]] = {}
    for index, (topo, health, stages) in enumerate(runs):
        run_id = f"run{index}"
        load_run(analyzer, run_id, topo, health, stages)
        truth[run_id] = (topo, stages)
    observations = [analyzer.observe(run_id) for run_id in truth]
    seen_ops: set[Op] = set()
    for name, policy in policies.items():
        for _ in range(3):  # sampling policies: several draws
            for decision in policy.act(observations).decisions:
                seen_ops.add(decision.op)
                topo, stages = truth[decision.run_id]
                node = topo.nodes[decision.layer_id]
                assert decision.op in LEGAL_OPS[stages[decision.layer_id]], (name, decision)
                if decision.op is Op.GERMINATE:
                    assert node.seed_slots > 0, (name, decision)
                    assert isinstance(decision.blueprint, Blueprint)
                    assert decision.blueprint.family is family_for_layer_type(node.layer_type), (
                        name,
                        decision,
                    )
    OPS_SEEN.update(seen_ops)


OPS_SEEN: set[Op] = set()


def test_the_mask_property_saw_real_actions() -> None:
    # Runs after the property test (file order): it must have exercised more than WAIT.
    assert {Op.GERMINATE, Op.PRUNE} <= OPS_SEEN, OPS_SEEN


GERMINATE_FIELDS = ("blueprint", "blend", "tempo", "dwell_epochs", "isolation", "lr_multiplier", "steepness")
ALPHA_FIELDS = ("alpha_target", "alpha_speed", "alpha_curve")


@pytest.fixture(scope="module")
def lever_policies() -> dict[str, PolicyBundle]:
    torch.set_num_threads(1)
    config = PolicyConfig(
        heuristic=HeuristicConfig(min_epoch=0, confidence_threshold=0.0, urgency_threshold=0.0)
    )
    policies = {name: create_policy(name, config, "cpu") for name in ("heuristic", "random", "gnn", "lstm")}
    # A learned policy that leaves some levers to the host.
    policies["gnn-some-levers"] = create_policy(
        "gnn", PolicyConfig(name="gnn", levers=("dwell", "alpha_speed"))
    )
    return policies


def command_problem(command: AdaptationCommand, levers: frozenset[str]) -> str | None:
    """Why a published command carries a lever combination no host should see (None if it does not):
    GERMINATE levers only with GERMINATE (blueprint, blend, tempo always), steepness only with a
    sigmoid blend, alpha levers only with SET_ALPHA_TARGET (its target always), and an optional
    lever only when the policy sets it."""
    germinate, alpha = command.op is Op.GERMINATE, command.op is Op.SET_ALPHA_TARGET
    for name in GERMINATE_FIELDS:
        if getattr(command, name) is not None and not germinate:
            return f"{name} on {command.op.value}"
    for name in ALPHA_FIELDS:
        if getattr(command, name) is not None and not alpha:
            return f"{name} on {command.op.value}"
    if germinate and None in (command.blueprint, command.blend, command.tempo):
        return "germinate without blueprint, blend and tempo"
    if command.steepness is not None and command.blend is not BlendAlgorithm.SIGMOID:
        return f"steepness with a {command.blend} blend"
    if alpha and command.alpha_target is None:
        return "set_alpha_target without a target"
    optional = {
        "dwell": "dwell_epochs",
        "isolation": "isolation",
        "lr_multiplier": "lr_multiplier",
        "steepness": "steepness",
        "alpha_speed": "alpha_speed",
        "alpha_curve": "alpha_curve",
    }
    for lever, field in optional.items():
        if lever not in levers and getattr(command, field) is not None:
            return f"{field} from a policy that leaves {lever} to the host"
    return None


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(runs=st.lists(random_runs(), min_size=1, max_size=4), deterministic=st.booleans())
def test_no_policy_emits_an_illegal_lever_combination(
    lever_policies: dict[str, PolicyBundle],
    runs: list[tuple[TopologyPacket, list[float], list[SeedStage]]],
    deterministic: bool,
) -> None:
    analyzer = Analyzer(AnalyzerConfig())
    for index, (topo, health, stages) in enumerate(runs):
        load_run(analyzer, f"run{index}", topo, health, stages)
    observations = [analyzer.observe(f"run{index}") for index in range(len(runs))]
    codec = Codec()
    for name, policy in lever_policies.items():
        levers = frozenset(getattr(policy, "levers", ALL_LEVERS))
        for _ in range(3):
            result = policy.act(observations, deterministic=deterministic)
            for obs, action, decision in zip(
                observations, result.actions.tolist(), result.decisions, strict=True
            ):
                problem = legality_problem(obs, action)
                assert problem is None, (name, problem, action)
                if decision.op is Op.WAIT:
                    continue
                LEVER_OPS_SEEN.add(decision.op)
                command = to_command(decision)
                decoded = codec.decode_command(codec.encode(command))  # valid on the wire
                assert msgspec.structs.astuple(decoded) == msgspec.structs.astuple(command)
                problem = command_problem(command, levers)
                assert problem is None, (name, problem, command)
            if policy.is_learnable:  # the learner scores the same levers the sampler counted
                evaluated = policy.evaluate(observations, result.actions, result.hidden)
                torch.testing.assert_close(evaluated.log_probs.detach(), result.log_probs, atol=1e-4, rtol=0)


LEVER_OPS_SEEN: set[Op] = set()


def test_the_lever_property_saw_germinations_and_alpha_targets() -> None:
    assert {Op.GERMINATE, Op.SET_ALPHA_TARGET} <= LEVER_OPS_SEEN, LEVER_OPS_SEEN
