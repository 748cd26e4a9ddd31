"""The reference host's training loop with an in-memory link: commands, acks, packets, optimizer."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

from esperd_contracts import (
    AdaptationCommand,
    BlendAlgorithm,
    Blueprint,
    HealthBatch,
    HealthSignal,
    Op,
    SeedStage,
    SystemStatePacket,
    TopologyPacket,
)
from esperd_examples.host.__main__ import main as cli_main
from esperd_examples.host.train import HostConfig, HostRun
from tests.support.packets import command

torch.set_num_threads(1)


class MemoryLink:
    """A Link that records what the loop sends and serves queued commands."""

    def __init__(self, run_id: str = "r1") -> None:
        self.run_id = run_id
        self.dropped = 0
        self.commands: asyncio.Queue[AdaptationCommand] = asyncio.Queue()
        self.sent: list[object] = []
        self.acks: list[tuple[str, bool, str]] = []

    def send_topology(self, packet: TopologyPacket) -> None:
        self.sent.append(packet)

    def send_health(self, signals: list[HealthSignal] | HealthBatch) -> None:
        self.sent.append(signals)

    def send_state(self, packet: SystemStatePacket) -> None:
        self.sent.append(packet)
        for answer in self.after_epoch.pop(packet.epoch, []):  # esperd "answering" the state packet
            self.commands.put_nowait(answer)

    def ack(self, command: AdaptationCommand, applied: bool, reason: str = "") -> None:
        self.acks.append((command.command_id, applied, reason))

    async def flush(self, timeout: float = 5.0) -> None:
        return None

    after_epoch: dict[int, list[AdaptationCommand]]

    def of(self, kind: type) -> list:
        return [m for m in self.sent if isinstance(m, kind)]


def run_with(commands: dict[int, list[AdaptationCommand]], **config: object) -> tuple[HostRun, MemoryLink]:
    link = MemoryLink()
    link.after_epoch = commands
    run = HostRun(HostConfig(**{"epochs": 3, "health_every": 4, **config}), link=link)  # type: ignore[arg-type]
    asyncio.run(run.run())
    return run, link


@pytest.mark.slow
def test_a_seed_goes_through_its_lifecycle_driven_by_commands() -> None:
    run, link = run_with(
        {
            0: [command(Op.GERMINATE, 2, command_id="g")],
            1: [command(Op.ADVANCE, 2, command_id="a")],
            4: [command(Op.ADVANCE, 2, command_id="a2")],
            5: [command(Op.FOSSILIZE, 2, command_id="f")],
        },
        epochs=7,
        batch_size=128,
    )
    assert link.acks == [("g", True, ""), ("a", True, ""), ("a2", False, link.acks[2][2]), ("f", True, "")]
    assert "advance is illegal from probationary" in link.acks[2][2]  # the blend completed on its own
    slot_states = [next(s for s in report.seeds if s.layer_id == 2) for report in run.report.epochs]
    stages = [state.stage for state in slot_states]
    assert stages == [
        SeedStage.DORMANT,  # germinated after epoch 0's state ...
        SeedStage.TRAINING,  # ... trains from the next boundary (advanced after epoch 1)
        SeedStage.BLENDING,
        SeedStage.BLENDING,
        SeedStage.PROBATIONARY,  # FAST tempo: 3 epochs of steps
        SeedStage.PROBATIONARY,
        SeedStage.FOSSILIZED,
    ]
    alphas = [state.alpha for state in slot_states]
    assert 0.0 < alphas[2] < alphas[3] < 1.0 and alphas[4] == alphas[6] == 1.0


@pytest.mark.slow
def test_seed_parameters_enter_and_leave_the_optimizer() -> None:
    run = HostRun(HostConfig(epochs=1), link=MemoryLink())
    slot = run.model.layers[1].slot
    assert slot is not None

    def optimized() -> set[int]:
        return {id(p) for group in run.optimizer.param_groups for p in group["params"]}

    run.handle(command(Op.GERMINATE, 1, command_id="g", lr_multiplier=2.0))
    seed_ids = {id(p) for p in slot.seed_parameters()}
    assert seed_ids and not seed_ids & optimized()  # GERMINATED: not training yet
    slot.end_epoch(0.5)
    run._sync_optimizer()
    assert seed_ids <= optimized()
    group = next(g for g in run.optimizer.param_groups if id(g["params"][0]) in seed_ids)
    assert group["base_lr"] == pytest.approx(2.0 * run.config.lr)
    assert run.handle(command(Op.PRUNE, 1, command_id="p")) is None
    assert not seed_ids & optimized() and slot.seed is None


def test_several_seeds_train_and_leave_independently() -> None:
    run = HostRun(HostConfig(epochs=1, width=4), link=MemoryLink())
    for layer_id in (1, 2, 4):  # conv_light seeds: same number of parameters in blocks 1 and 2
        assert run.handle(command(Op.GERMINATE, layer_id, command_id=f"g{layer_id}")) is None
    for slot in run.model.slots:
        slot.end_epoch(0.5)
    run._sync_optimizer()
    assert len(run.optimizer.param_groups) == 4  # host + three seeds
    assert run.handle(command(Op.PRUNE, 2, command_id="p2")) is None  # the later of two look-alike groups
    remaining = {id(p) for group in run.optimizer.param_groups for p in group["params"]}
    slots = {slot.layer_id: slot for slot in run.model.slots}
    assert {id(p) for p in slots[1].seed_parameters()} <= remaining
    assert {id(p) for p in slots[4].seed_parameters()} <= remaining
    assert len(run.optimizer.param_groups) == 3
    run.train_step(run.data.x_train[:32], run.data.y_train[:32])


@pytest.mark.parametrize(
    ("sent", "needle"),
    [
        (command(Op.GERMINATE, 9, command_id="x"), "unknown layer 9"),
        (command(Op.GERMINATE, 3, command_id="x"), "layer 3 (pool) has no seed slot"),
        (command(Op.GERMINATE, 1, command_id="x", run_id="r2"), "command for run r2"),
        (command(Op.ADVANCE, 1, command_id="x"), "advance is illegal from dormant"),
        (command(Op.GERMINATE, 1, command_id="x", blueprint=Blueprint.MLP), "transformer-family"),
        (command(Op.GERMINATE, 5, command_id="x", blueprint=Blueprint.DEPTHWISE), "cnn-family"),
        (command(Op.GERMINATE, 1, command_id="x", blueprint=Blueprint.DILATED), "dilated is not implemented"),
        (
            command(Op.GERMINATE, 1, command_id="x", blueprint=Blueprint.CONV_LIGHT, max_seed_params=2303),
            "conv_light seed here has 2304 parameters, over the command's max_seed_params 2303",
        ),
    ],
)
def test_rejections_are_acked_with_a_reason(sent: AdaptationCommand, needle: str) -> None:
    link = MemoryLink()
    run = HostRun(HostConfig(epochs=1, blueprints=(Blueprint.CONV_LIGHT, Blueprint.MLP)), link=link)
    before = run.model.total_param_count()
    run.handle(sent)
    assert link.acks == [("x", False, link.acks[0][2])] and needle in link.acks[0][2]
    assert run.model.total_param_count() == before
    assert run.report.rejected == 1 and run.report.applied == 0


def test_a_seed_within_max_seed_params_is_applied_and_the_check_draws_no_random_numbers() -> None:
    limited, free = MemoryLink(), MemoryLink()
    runs = []
    for link, limit in ((limited, 2304), (free, 0)):
        run = HostRun(HostConfig(epochs=1), link=link)
        run.handle(
            command(Op.GERMINATE, 1, command_id="x", blueprint=Blueprint.CONV_LIGHT, max_seed_params=limit)
        )
        runs.append(run)
    assert limited.acks == free.acks == [("x", True, "")]
    a, b = (r.model.layer(1).slot.seed_parameters() for r in runs)  # the same init: no RNG drawn by the check
    assert sum(p.numel() for p in a) == 2304 and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_a_command_from_an_older_ownership_epoch_is_ignored_not_acked() -> None:
    link = MemoryLink()
    run = HostRun(HostConfig(epochs=1), link=link)
    assert run.handle(command(Op.GERMINATE, 1, command_id="new", epoch=12)) is None
    before = run.model.total_param_count()
    reason = run.handle(
        command(Op.GERMINATE, 2, command_id="stale", epoch=7)
    )  # the instance that lost the run
    assert reason is not None and "stale epoch 7 < 12" in reason
    assert link.acks == [("new", True, "")]  # nobody waits for an ack of the stale one
    assert run.report.stale_commands == 1 and run.report.rejected == 0
    assert run.model.total_param_count() == before
    run.handle(
        command(Op.PRUNE, 1, command_id="same", epoch=12)
    )  # the current epoch still counts: handled and acked
    assert [ack[0] for ack in link.acks] == ["new", "same"] and run.report.stale_commands == 1


@pytest.mark.slow
def test_packets_topology_first_health_every_k_steps_state_per_epoch_done_last() -> None:
    run, link = run_with({})
    assert isinstance(link.sent[0], TopologyPacket)
    states = link.of(SystemStatePacket)
    assert [s.epoch for s in states] == [0, 1, 2] and [s.done for s in states] == [False, False, True]
    assert all(0.0 < s.val_accuracy <= 1.0 and s.host_params == s.total_params > 0 for s in states)
    # The budget and the validation size esperd needs to judge timing and noise.
    assert all(s.total_epochs == 3 and s.val_samples == run.data.y_val.shape[0] > 0 for s in states)
    steps = sum(e.steps for e in run.report.epochs)
    assert len(link.of(HealthBatch)) == run.report.health_batches == -(-steps // 4)
    assert all(len(batch.signals) == len(run.model.layers) for batch in link.of(HealthBatch))


@pytest.mark.slow
def test_commands_after_the_end_are_rejected_not_left_hanging() -> None:
    _, link = run_with({2: [command(Op.GERMINATE, 1, command_id="late")]}, epochs=3)
    assert link.acks == [("late", False, "the run has finished")]


@pytest.mark.slow
def test_instrumentation_does_not_change_the_training() -> None:
    plain = asyncio.run(HostRun(HostConfig(epochs=2, telemetry=False)).run())
    probed = run_with({}, epochs=2, health_every=1)[0].report  # hooks on every step
    assert [e.train_loss for e in plain.epochs] == [e.train_loss for e in probed.epochs]
    assert [e.val_accuracy for e in plain.epochs] == [e.val_accuracy for e in probed.epochs]


@pytest.mark.slow
def test_order_seed_moves_the_batch_order_alone() -> None:
    base = HostRun(HostConfig(epochs=1, telemetry=False))
    same = HostRun(HostConfig(epochs=1, telemetry=False, order_seed=0))
    moved = HostRun(HostConfig(epochs=1, telemetry=False, order_seed=1000))
    init = [p.detach().clone() for p in base.model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(init, moved.model.parameters(), strict=True))  # same init
    plain, same_order, other_order = (asyncio.run(r.run()) for r in (base, same, moved))
    assert [e.train_loss for e in same_order.epochs] == [e.train_loss for e in plain.epochs]
    assert [e.train_loss for e in other_order.epochs] != [e.train_loss for e in plain.epochs]


@pytest.mark.slow
def test_transformer_task_trains_and_takes_transformer_seeds() -> None:
    gated = command(
        Op.GERMINATE, 2, command_id="g", blueprint=Blueprint.GATED_MLP, blend=BlendAlgorithm.GATED
    )
    run, link = run_with(
        {0: [gated]},
        task="sequence",
        epochs=2,
    )
    assert link.acks == [("g", True, "")]
    assert run.report.final.val_accuracy > 0.5
    assert next(s for s in run.report.final.seeds if s.layer_id == 2).stage is SeedStage.TRAINING


def test_cli_no_esperd_prints_a_summary(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["--no-esperd", "--epochs", "1", "--quiet", "--run", "solo"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["run"] == "solo" and summary["epochs"] == 1
    assert 0.0 < summary["val_accuracy"] <= 1.0 and summary["host_params"] == summary["total_params"]


def test_cli_defaults_are_the_configs() -> None:
    from esperd_examples.host.__main__ import config_from_args, parse_args

    assert config_from_args(parse_args(["--quiet"])) == HostConfig()
    config = config_from_args(parse_args(["--quiet", "--width", "4", "--blueprints", "mlp,conv_light"]))
    assert config.width == 4 and config.blueprints == (Blueprint.MLP, Blueprint.CONV_LIGHT)
