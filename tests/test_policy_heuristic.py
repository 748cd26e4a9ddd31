"""Heuristic policy: each rule, thresholds, memory (embargo, blueprint rotation), masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from esperd.analyzer.observation import ACTION_WIDTH, LAYER_KINDS, OP_INDEX, Observation
from esperd.policy import HeuristicConfig, HeuristicPolicy, PolicyBundle, PolicyConfig, create_policy
from esperd_contracts import BlendAlgorithm, Blueprint, BlueprintFamily, Op, SeedStage, Tempo
from tests.support.actions import legality_problem, row
from tests.support.observations import make_observation, mixed_batch

S = SeedStage
CNN, TF = BlueprintFamily.CNN, BlueprintFamily.TRANSFORMER
SICK = {"health": 0.2, "health_trend": -0.05, "is_problematic": 1.0}


def make_policy(selection: str = "pareto", **rules: object) -> HeuristicPolicy:
    config = PolicyConfig(heuristic=HeuristicConfig(**rules), selection=selection)  # type: ignore[arg-type]
    return create_policy("heuristic", config)


def scene(
    run_id: str = "run",
    *,
    stages: list[SeedStage] | None = None,
    families: list[BlueprintFamily] | None = None,
    sick: int | None = None,
    epoch: int = 10,
    node: dict[str, list[float]] | None = None,
    **globals_: float,
) -> Observation:
    """Four healthy layers (optionally one sick), a stabilized host at `epoch`."""
    stages = stages or [S.DORMANT] * 4
    n = len(stages)
    columns: dict[str, list[float]] = {
        "health": [0.9] * n,
        "health_trend": [0.0] * n,
        "is_problematic": [0.0] * n,
    }
    if sick is not None:
        for name, value in SICK.items():
            columns[name][sick] = value
    columns.update(node or {})
    return make_observation(
        run_id,
        n,
        random_features=False,
        stages=stages,
        families=families or [CNN] * n,
        node=columns,
        globals_=globals_,
        epoch=epoch,
    )


def stage_node(stage: SeedStage, eis: int, n: int = 4, at: int = 2, **features: float) -> dict:
    """Kwargs for `scene` with one seed at node `at` in `stage` for `eis` epochs."""
    stages = [S.DORMANT] * n
    stages[at] = stage
    node = {"epochs_in_stage": [0.0] * n}
    node["epochs_in_stage"][at] = eis / 12
    for name, value in features.items():
        node[name] = [0.0] * n
        node[name][at] = value
    return {"stages": stages, "node": node}


def decide(policy: HeuristicPolicy, obs: Observation):
    return policy.act([obs]).decisions[0]


def test_is_a_non_learnable_policy_bundle() -> None:
    policy = make_policy()
    assert isinstance(policy, PolicyBundle)
    assert not policy.is_learnable and policy.network is None and policy.state_dict() == {}
    result = policy.act([scene(sick=1)])
    assert torch.equal(result.log_probs, torch.zeros(1)) and torch.equal(result.values, torch.zeros(1))
    with pytest.raises(NotImplementedError):
        policy.evaluate([scene()], result.actions)


def test_germinates_declining_unhealthy_layer_with_fitting_family() -> None:
    policy = make_policy(blend=BlendAlgorithm.GATED, tempo=Tempo.SLOW)
    cnn = decide(policy, scene("a", sick=1, families=[TF, CNN, TF, TF]))
    assert (cnn.op, cnn.layer_id, cnn.blueprint) == (Op.GERMINATE, 101, Blueprint.CONV_LIGHT)
    assert (cnn.blend, cnn.tempo) == (BlendAlgorithm.GATED, Tempo.SLOW)
    assert cnn.confidence >= 0.7 and cnn.urgency >= 0.5
    tf = decide(policy, scene("b", sick=2, families=[CNN, CNN, TF, CNN]))
    assert (tf.op, tf.layer_id) == (Op.GERMINATE, 102)
    assert tf.blueprint is not None and tf.blueprint.family is TF


def test_healthy_or_improving_layers_are_left_alone() -> None:
    policy = make_policy()
    assert decide(policy, scene("a")).op is Op.WAIT
    improving = scene("b", sick=1, node={"health_trend": [0.0, 0.05, 0.0, 0.0]})
    assert decide(policy, improving).op is Op.WAIT


def test_no_germination_before_min_epoch() -> None:
    policy = make_policy(min_epoch=5)
    assert decide(policy, scene("a", sick=1, epoch=4)).op is Op.WAIT
    assert decide(policy, scene("b", sick=1, epoch=5)).op is Op.GERMINATE


def test_no_germination_while_host_is_still_improving_fast() -> None:
    policy = make_policy(stabilize_delta=0.01)
    assert decide(policy, scene("a", sick=1, val_accuracy_delta=0.05)).op is Op.WAIT
    assert decide(policy, scene("b", sick=1, val_accuracy_delta=0.005)).op is Op.GERMINATE
    # A validation plateau also counts as stabilized, whatever the last delta.
    plateau = scene("c", sick=1, val_accuracy_delta=0.05, plateau_epochs=0.3)
    assert decide(policy, plateau).op is Op.GERMINATE


def test_plateau_germinates_least_healthy_layer_when_gradients_tie() -> None:
    policy = make_policy(plateau_patience=3, plateau_health_max=0.9)
    health = {"health": [0.85, 0.95, 0.6, 0.8]}
    assert decide(policy, scene("a", node=health, plateau_epochs=0.2)).op is Op.WAIT  # 2 < patience
    decision = decide(policy, scene("b", node=health, plateau_epochs=0.3))
    assert (decision.op, decision.layer_id) == (Op.GERMINATE, 102)


def test_plateau_germinates_where_the_gradient_is_largest() -> None:
    policy = make_policy(plateau_patience=3, plateau_health_max=0.9)
    # Node 1 has the largest gradient but is healthy beyond plateau_health_max; of the rest node 3
    # has the largest gradient, although node 2 is the least healthy.
    node = {"health": [0.85, 0.95, 0.6, 0.8], "gradient_norm": [0.2, 0.9, 0.3, 0.5]}
    decision = decide(policy, scene("a", node=node, plateau_epochs=0.3))
    assert (decision.op, decision.layer_id) == (Op.GERMINATE, 103)


@pytest.mark.parametrize(
    ("train", "val", "grows"),
    [
        (0.60, 0.59, True),  # capacity-bound: train and val alike, far from perfect
        (0.60, 0.65, True),  # validation above training: not overfitting either
        (0.90, 0.70, False),  # a generalization gap: more capacity would not help
        (0.99, 0.985, False),  # nearly perfect on training data
        (0.00, 0.40, False),  # no training accuracy reported: unknown, so no
    ],
)
def test_a_capacity_bound_host_grows_without_waiting_for_a_plateau(
    train: float, val: float, grows: bool
) -> None:
    policy = make_policy(underfit_gap=0.03, underfit_max_train_accuracy=0.98, stabilize_delta=0.01)
    node = {"health": [0.85, 0.8, 0.8, 0.8], "gradient_norm": [0.1, 0.2, 0.6, 0.3]}
    # Still improving fast and no plateau: only the capacity rule can let it grow.
    obs = scene("a", node=node, val_accuracy_delta=0.05, train_accuracy=train, val_accuracy=val)
    decision = decide(policy, obs)
    if grows:
        assert (decision.op, decision.layer_id) == (Op.GERMINATE, 102)
    else:
        assert decision.op is Op.WAIT
    off = scene("b", node=node, val_accuracy_delta=0.05, train_accuracy=0.6, val_accuracy=0.59)
    assert decide(make_policy(underfit_gap=-1.0), off).op is Op.WAIT  # a negative gap turns the rule off


def test_at_most_max_active_seeds() -> None:
    policy = make_policy(max_active_seeds=1)
    busy = scene("a", sick=1, **stage_node(S.TRAINING, eis=0, at=3))
    assert decide(policy, busy).op is Op.WAIT
    policy2 = make_policy(max_active_seeds=2)
    assert decide(policy2, scene("b", sick=1, **stage_node(S.TRAINING, eis=0, at=3))).op is Op.GERMINATE


def test_unapplied_germination_counts_as_active_for_an_epoch() -> None:
    policy = make_policy(max_active_seeds=1)
    assert decide(policy, scene("a", sick=1, epoch=10)).layer_id == 101
    two_sick = {"health": [0.9, 0.2, 0.2, 0.9], "health_trend": [0, -0.05, -0.05, 0]}
    two_sick["is_problematic"] = [0, 1, 1, 0]
    # The host has not applied it yet (layer 101 still DORMANT): no second seed.
    assert decide(policy, scene("a", node=two_sick, epoch=10)).op is Op.WAIT
    assert decide(policy, scene("a", node=two_sick, epoch=11)).op is Op.WAIT
    # Two epochs on and still DORMANT: the command was lost or rejected; germinate again.
    assert decide(policy, scene("a", node=two_sick, epoch=12)).op is Op.GERMINATE


def test_advance_training_after_dwell() -> None:
    policy = make_policy(train_dwell_epochs=3)
    assert decide(policy, scene("a", **stage_node(S.TRAINING, eis=2))).op is Op.WAIT
    decision = decide(policy, scene("a", **stage_node(S.TRAINING, eis=3)))
    assert (decision.op, decision.layer_id) == (Op.ADVANCE, 102)


def test_advance_blending_after_the_seeds_tempo() -> None:
    policy = make_policy(tempo=Tempo.SLOW)  # 8 epochs
    assert decide(policy, scene("a", sick=2)).op is Op.GERMINATE  # remembers tempo SLOW for layer 102
    assert decide(policy, scene("a", **stage_node(S.BLENDING, eis=5))).op is Op.WAIT
    assert decide(policy, scene("a", **stage_node(S.BLENDING, eis=8))).op is Op.ADVANCE
    # A seed it did not germinate uses the configured tempo; alpha at 1 also ends blending.
    fast = make_policy(tempo=Tempo.FAST)
    assert decide(fast, scene("b", **stage_node(S.BLENDING, eis=2))).op is Op.WAIT
    assert decide(fast, scene("b", **stage_node(S.BLENDING, eis=3))).op is Op.ADVANCE
    assert decide(fast, scene("c", **stage_node(S.BLENDING, eis=1, alpha=1.0))).op is Op.ADVANCE


@pytest.mark.parametrize(
    ("counterfactual", "z", "improvement", "eis", "expected"),
    [
        (0.02, 3.0, 0.03, 1, Op.FOSSILIZE),  # more than noise, and the run improved
        (0.02, 3.0, -0.01, 1, Op.PRUNE),  # helped, but the run did not improve
        (-0.01, -2.5, 0.03, 1, Op.PRUNE),  # clearly harmful
        (0.003, 0.8, 0.03, 1, Op.WAIT),  # a few samples either way: keep measuring ...
        (0.003, 0.8, 0.03, 4, Op.PRUNE),  # ... until probation_max_epochs: unproven
        (-0.003, -0.8, 0.03, 2, Op.WAIT),
        (0.0, 0.0, 0.0, 4, Op.PRUNE),
    ],
)
def test_probation_fossilizes_only_seeds_that_helped_by_more_than_noise(
    counterfactual: float, z: float, improvement: float, eis: int, expected: Op
) -> None:
    policy = make_policy(probation_epochs=1, probation_max_epochs=4, fossilize_z=2.0)
    features = {"counterfactual": counterfactual, "total_improvement": improvement, "counterfactual_z": z / 4}
    assert decide(policy, scene("a", **stage_node(S.PROBATIONARY, eis=0, **features))).op is Op.WAIT
    decision = decide(policy, scene("a", **stage_node(S.PROBATIONARY, eis=eis, **features)))
    assert decision.op is expected
    if expected is not Op.WAIT:
        assert decision.layer_id == 102


def test_lifecycle_ops_come_before_new_germination() -> None:
    policy = make_policy(max_active_seeds=4)
    obs = scene("a", sick=0, **stage_node(S.TRAINING, eis=5))
    assert decide(policy, obs).op is Op.ADVANCE


def test_embargo_after_prune() -> None:
    policy = make_policy(embargo_epochs=5)
    prune = scene(
        "a",
        epoch=10,
        **stage_node(
            S.PROBATIONARY, eis=2, counterfactual=-0.1, total_improvement=-0.1, counterfactual_z=-1.0
        ),
    )
    assert decide(policy, prune).op is Op.PRUNE
    for epoch in range(11, 15):
        assert decide(policy, scene("a", sick=2, epoch=epoch)).op is Op.WAIT, epoch
    assert decide(policy, scene("a", sick=2, epoch=15)).op is Op.GERMINATE
    # The embargo is per run and per slot: other layers and other runs are free.
    assert decide(policy, scene("a2", sick=2, epoch=11)).op is Op.GERMINATE


def test_embargo_also_after_seeing_a_prune_it_did_not_make() -> None:
    policy = make_policy(embargo_epochs=3)
    pruned = scene("a", epoch=20, stages=[S.DORMANT, S.PRUNED, S.DORMANT, S.DORMANT])
    assert decide(policy, pruned).op is Op.WAIT
    assert decide(policy, scene("a", sick=1, epoch=22)).op is Op.WAIT
    assert decide(policy, scene("a", sick=1, epoch=23)).op is Op.GERMINATE


def test_blueprint_rotation_after_prune() -> None:
    policy = make_policy(embargo_epochs=0, blueprint_penalty_decay=0.8)
    first = decide(policy, scene("a", sick=1, epoch=10))
    assert first.blueprint is Blueprint.CONV_LIGHT
    bad = stage_node(
        S.PROBATIONARY, eis=3, at=1, counterfactual=-0.05, total_improvement=-0.05, counterfactual_z=-1.0
    )
    assert decide(policy, scene("a", epoch=14, **bad)).op is Op.PRUNE
    second = decide(policy, scene("a", sick=1, epoch=15))
    assert second.op is Op.GERMINATE and second.blueprint is Blueprint.BOTTLENECK  # next in the conv order


def test_blueprint_penalty_decays() -> None:
    policy = make_policy(embargo_epochs=0, blueprint_penalty_decay=0.5)
    decide(policy, scene("a", sick=1, epoch=10))
    bad = stage_node(
        S.PROBATIONARY, eis=3, at=1, counterfactual=-0.05, total_improvement=-0.05, counterfactual_z=-1.0
    )
    decide(policy, scene("a", epoch=14, **bad))
    # 0.5 ** 10 < 1e-3: after ten epochs the penalty has expired and CONV_LIGHT is first again
    # (its record, one prune against the prior's two pseudo-seeds, still leaves it ahead of the rest).
    policy = make_policy(embargo_epochs=0, blueprint_penalty_decay=0.5, blueprint_prior_strength=50.0)
    decide(policy, scene("a", sick=1, epoch=10))
    decide(policy, scene("a", epoch=14, **bad))
    assert decide(policy, scene("a", sick=1, epoch=15)).blueprint is not Blueprint.CONV_LIGHT
    assert decide(policy, scene("a", sick=1, epoch=24)).blueprint is Blueprint.CONV_LIGHT


def test_thresholds_block_low_confidence_or_urgency() -> None:
    assert decide(make_policy(confidence_threshold=0.99), scene("a", sick=1)).op is Op.WAIT
    mild = {"health": [0.9, 0.45, 0.9, 0.9], "health_trend": [0, -0.05, 0, 0], "is_problematic": [0, 1, 0, 0]}
    assert decide(make_policy(urgency_threshold=0.5), scene("b", node=mild)).op is Op.GERMINATE
    assert decide(make_policy(urgency_threshold=0.6), scene("c", node=mild)).op is Op.WAIT


def test_obeys_masks() -> None:
    policy = make_policy()
    obs = scene("a", sick=1)
    obs.op_mask[1, OP_INDEX[Op.GERMINATE]] = False  # e.g. the layer has no seed slot
    assert decide(policy, obs).op is Op.WAIT
    # Random telemetry and stages: every emitted action is legal.
    for seed in range(30):
        observations = mixed_batch([3, 6, 10], seed=seed)
        for ob in observations:
            ob.global_features[:] = 0.0  # stabilized host
        for ob, action in zip(observations, policy.act(observations).actions.tolist(), strict=True):
            problem = legality_problem(ob, action)
            assert problem is None, problem


def test_many_runs_at_once_equal_one_at_a_time() -> None:
    observations = [
        scene("a", sick=1),
        scene("b", **stage_node(S.TRAINING, eis=4)),
        scene("c"),
        scene(
            "d",
            **stage_node(
                S.PROBATIONARY, eis=2, counterfactual=0.1, total_improvement=0.1, counterfactual_z=1.0
            ),
        ),
    ]
    batched = make_policy().act(observations)
    single = make_policy()
    for obs, decision in zip(observations, batched.decisions, strict=True):
        assert single.act([obs]).decisions[0] == decision
    assert [d.op for d in batched.decisions] == [Op.GERMINATE, Op.ADVANCE, Op.WAIT, Op.FOSSILIZE]


def test_forget_drops_run_memory() -> None:
    policy = make_policy(embargo_epochs=50)
    decide(policy, scene("a", epoch=10, stages=[S.DORMANT, S.PRUNED, S.DORMANT, S.DORMANT]))
    assert decide(policy, scene("a", sick=1, epoch=11)).op is Op.WAIT
    policy.forget(["a"])
    assert policy.tracked_runs == 0
    assert decide(policy, scene("a", sick=1, epoch=11)).op is Op.GERMINATE


def test_run_memory_is_bounded() -> None:
    policy = make_policy(max_tracked_runs=2)
    policy.act([scene(f"r{i}") for i in range(5)])
    assert policy.tracked_runs == 2


def test_actions_tensor_matches_decisions() -> None:
    result = make_policy(tempo=Tempo.GLACIAL).act([scene("a", sick=1), scene("b")])
    assert result.actions.dtype == torch.int64 and result.actions.shape == (2, ACTION_WIDTH)
    germ, wait = result.decisions
    assert germ.action.as_list() == result.actions[0].tolist()
    assert result.actions[1].tolist() == row(0, OP_INDEX[Op.WAIT]) and wait.op is Op.WAIT
    assert np.isclose(result.confidences[0].item(), germ.confidence)


def kinds(*names: str) -> dict[str, list[float]]:
    """Node columns for `scene` giving each node a layer kind."""
    columns = {f"kind_{kind}": [0.0] * len(names) for kind in LAYER_KINDS}
    for i, name in enumerate(names):
        columns[f"kind_{name}"][i] = 1.0
    return columns


def test_blueprint_fits_the_layer_kind_not_declaration_order() -> None:
    policy = make_policy()
    dense = scene("a", sick=1, families=[TF] * 4, node=kinds("linear", "linear", "linear", "linear"))
    assert decide(policy, dense).blueprint is Blueprint.MLP  # not ATTENTION, the first declared
    mlp = scene("b", sick=1, families=[TF] * 4, node=kinds("mlp", "mlp", "mlp", "mlp"))
    assert decide(policy, mlp).blueprint is Blueprint.MLP
    conv = scene("c", sick=1, families=[CNN] * 4, node=kinds("conv", "conv", "conv", "conv"))
    assert decide(policy, conv).blueprint is Blueprint.CONV_LIGHT
    # A layer of unknown kind falls back to its family's order.
    assert decide(policy, scene("d", sick=1, families=[TF] * 4)).blueprint is Blueprint.MLP


@pytest.mark.parametrize("selection", ["argmax", "pareto"])
def test_what_worked_across_runs_reorders_the_blueprints_for_that_kind(selection: str) -> None:
    policy = make_policy(selection, embargo_epochs=0)
    linear = kinds("linear", "linear", "linear", "linear")
    sick = {"families": [TF] * 4, "node": linear}

    def settle(run: str, counterfactual: float) -> Op:
        z = 1.0 if counterfactual > 0 else -1.0
        seed = stage_node(
            S.PROBATIONARY,
            eis=3,
            at=1,
            counterfactual=counterfactual,
            total_improvement=0.05,
            counterfactual_z=z,
        )
        seed["node"].update(linear)
        return decide(policy, scene(run, epoch=20, families=[TF] * 4, **seed)).op

    assert decide(policy, scene("r0", sick=1, epoch=10, **sick)).blueprint is Blueprint.MLP
    assert settle("r0", -0.05) is Op.PRUNE
    assert policy.blueprint_record() == {("linear", Blueprint.MLP): (0, 1)}
    # The next run starts from the record: MLP was pruned, so the next in line goes first ...
    assert decide(policy, scene("r1", sick=1, epoch=10, **sick)).blueprint is Blueprint.MLP_SMALL
    assert settle("r1", 0.05) is Op.FOSSILIZE
    # ... and it worked, so it stays first.
    assert decide(policy, scene("r2", sick=1, **sick)).blueprint is Blueprint.MLP_SMALL
    assert policy.blueprint_record()[("linear", Blueprint.MLP_SMALL)] == (1, 0)
    mlp = scene("r3", sick=1, families=[TF] * 4, node=kinds("mlp", "mlp", "mlp", "mlp"))
    if selection == "argmax":  # a kind with no record keeps its own order (performance alone)
        assert decide(policy, mlp).blueprint is Blueprint.MLP
    else:
        # Pareto (002): on an mlp layer, with no record there, MLP's prior performance (0.6) beats
        # MLP_SMALL's, but MLP_SMALL's adaptability (fossilized on linear layers: (1 + 1) / 3)
        # beats MLP's (pruned there: 1 / 3), no risk on this kind for either: both are on the
        # front, and 0.5 p + 0.2 a favours MLP_SMALL.
        assert decide(policy, mlp).blueprint is Blueprint.MLP_SMALL


def test_no_germination_a_run_has_no_time_left_to_finish() -> None:
    policy = make_policy(train_dwell_epochs=3, tempo=Tempo.STANDARD, probation_epochs=1)
    assert policy.lifecycle_epochs() == 10
    unknown = scene("a", sick=1, epoch=45)  # the host does not say how long it trains
    assert decide(policy, unknown).op is Op.GERMINATE
    enough = scene("b", sick=1, epoch=37, budget_known=1.0, epochs_remaining=10 / 50)
    assert decide(policy, enough).op is Op.GERMINATE
    late = scene("c", sick=1, epoch=38, budget_known=1.0, epochs_remaining=9 / 50)
    assert decide(policy, late).op is Op.WAIT
    # Seeds already in flight are still taken through their lifecycle.
    busy = scene("d", epoch=46, budget_known=1.0, epochs_remaining=1 / 50, **stage_node(S.TRAINING, eis=3))
    assert decide(policy, busy).op is Op.ADVANCE


def blend_through(policy: HeuristicPolicy, run: str, *, before: float, low: float) -> None:
    """Take the seed germinated at node 2 of `run` through training, its blend and into probation,
    with the run's validation accuracy at `before`, then `low` while blending."""
    decide(policy, scene(run, val_accuracy=before, **stage_node(S.TRAINING, eis=1)))
    decide(policy, scene(run, val_accuracy=low, **stage_node(S.BLENDING, eis=1)))
    decide(policy, scene(run, val_accuracy=before, **stage_node(S.PROBATIONARY, eis=0)))


@pytest.mark.parametrize("selection", ["argmax", "pareto"])
def test_blend_shocks_slow_the_next_blend_down(selection: str) -> None:
    policy = make_policy(selection, tempo=Tempo.STANDARD)
    first = decide(policy, scene("r0", sick=2))
    assert (first.op, first.tempo) == (Op.GERMINATE, Tempo.STANDARD)  # no shocks on record
    blend_through(policy, "r0", before=0.80, low=0.76)  # a 4-point drop while blending
    second = decide(policy, scene("r1", sick=2))
    if selection == "argmax":
        assert second.tempo is Tempo.STANDARD  # the configured tempo, whatever happened
        return
    # Pareto (002), by hand, 50 epochs of horizon (the host does not say), lifecycle 1 + 3 + blend
    # + 1. The shock per alpha step, 0.04 x 5 = 0.2, is the kind's only record, so every tempo's
    # estimate is 0.2 / its epochs; risk = that / 0.05, at most 1. Weighted 0.5 / 0.3 / 0.2:
    #   standard 0.5 x 0.60 - 0.3 x 0.80 + 0.2 x 40/50 = 0.220
    #   slow     0.5 x 0.45 - 0.3 x 0.50 + 0.2 x 37/50 = 0.223
    #   glacial  0.5 x 0.45 - 0.3 x 0.33 + 0.2 x 33/50 = 0.257
    #   fast     0.5 x 0.45 - 0.3 x 1.00 + 0.2 x 42/50 = 0.093
    assert (second.op, second.tempo) == (Op.GERMINATE, Tempo.GLACIAL)
    # The seed is held to its own tempo: 12 epochs of blending before ADVANCE.
    assert decide(policy, scene("r1", **stage_node(S.BLENDING, eis=8))).op is Op.WAIT
    assert decide(policy, scene("r1", **stage_node(S.BLENDING, eis=12))).op is Op.ADVANCE


def test_a_blend_without_a_drop_keeps_the_configured_tempo() -> None:
    policy = make_policy(tempo=Tempo.STANDARD)
    assert decide(policy, scene("r0", sick=2)).tempo is Tempo.STANDARD
    blend_through(policy, "r0", before=0.80, low=0.82)  # accuracy rose while blending: no shock
    assert decide(policy, scene("r1", sick=2)).tempo is Tempo.STANDARD


def test_blends_on_a_host_that_reports_no_accuracy_are_no_evidence_of_safe_blends() -> None:
    """val_accuracy is optional (0 when a host leaves it out): such a host's blends cannot show a
    shock, so they are not recorded, and one real shock still slows the next blend down."""
    policy = make_policy(tempo=Tempo.STANDARD)
    for run in ("lm0", "lm1", "lm2"):
        assert decide(policy, scene(run, sick=2)).op is Op.GERMINATE
        blend_through(policy, run, before=0.0, low=0.0)
    decide(policy, scene("r0", sick=2))
    blend_through(policy, "r0", before=0.80, low=0.76)
    assert decide(policy, scene("r1", sick=2)).tempo is Tempo.GLACIAL  # as with the shock alone


def test_a_tempo_that_cannot_finish_in_time_is_not_chosen() -> None:
    policy = make_policy(tempo=Tempo.STANDARD)
    decide(policy, scene("r0", sick=2))
    blend_through(policy, "r0", before=0.80, low=0.76)
    # 12 epochs left: standard (lifecycle 10) and fast (8) fit, slow (13) and glacial (17) do not,
    # though glacial would win with time to spare (above). Of the two:
    #   standard 0.5 x 0.60 - 0.3 x 0.8 + 0.2 x 2/12 = 0.093
    #   fast     0.5 x 0.45 - 0.3 x 1.0 + 0.2 x 4/12 = -0.008
    late = scene("r1", sick=2, budget_known=1.0, epochs_remaining=12 / 50)
    assert decide(policy, late).tempo is Tempo.STANDARD
