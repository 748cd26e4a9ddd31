"""What `esperd.status` answers: one model, one JSON Schema (contracts/schema/status.json).

Each part of esperd reports its own section (the scheduler a SchedulerStatus, the learner a
LearnerStatus with its breaker's state, ...) and the service only assembles them; the Prometheus
metrics read the same model. The reply is keyed JSON. Like the messages, the model only grows:
new fields are appended with defaults; nothing is renamed, removed or retyped.
"""

from __future__ import annotations

import msgspec


class PolicyStatus(msgspec.Struct):
    """The serving policy."""

    name: str
    version: int
    fallback_reason: str = ""  # why the configured policy is not the one serving


class DecisionStats(msgspec.Struct):
    """What the decision loop has done. Percentiles cover the last 1024 samples."""

    batches: int = 0
    decisions: int = 0
    waits: int = 0
    commands: int = 0
    commands_by_op: dict[str, int] = msgspec.field(default_factory=dict)
    failures: int = 0
    fenced: int = 0  # decided, not sent: ownership of the run was lost before the command went out
    dropped: int = 0  # decided, not sent: the run was dropped while its batch was decided (or published)
    late: int = 0  # published later than `decision_deadline_ms` after the run became due
    last_batch_size: int = 0
    batch_size_mean: float = 0.0
    batch_size_max: int = 0
    forward_ms_p50: float = 0.0
    forward_ms_p99: float = 0.0
    latency_ms_p50: float = 0.0  # run due (signal in) -> command published
    latency_ms_p99: float = 0.0


class SchedulerStatus(msgspec.Struct):
    """Due runs and the commands awaiting an answer."""

    queued: int  # runs due and waiting for a decision
    overflow: int  # due runs dropped: the queue was full
    pending_commands: int  # published, not yet acked
    expired_commands: int  # never acked within ack_timeout_s
    unknown_acks: int  # acks for no pending command (late, duplicated, or never ours)


class NatsStatus(msgspec.Struct):
    """The broker connection."""

    connected: bool
    reconnects: int
    disconnects: int
    errors: int
    dropped_publishes: int
    slow_consumer_drops: int = 0  # inbound messages dropped: esperd fell behind by nats.max_pending_bytes
    max_payload: int = 0  # the broker's max_payload (from its INFO), headers included
    max_payload_warning: str = ""  # set when that is below limits.max_payload_bytes


class RunTableStatus(msgspec.Struct, kw_only=True):
    """The runs esperd tracks."""

    tracked: int  # runs holding a slot (finishing ones included)
    finishing: int  # said `done`, kept for done_grace_s for late acks
    max_runs: int
    admitted: int  # admissions since start (a reused id counts again)
    reused: int  # run ids that started a new episode after `done`
    dropped_by_reason: dict[str, int]
    nodes: int  # across every tracked run
    edges: int
    memory_budget_bytes: int
    memory_used_bytes: int  # estimated (see esperd.runs.estimated_bytes)


class RecorderStats(msgspec.Struct, kw_only=True):
    """The experience recorder (decisions turned into transitions for the learner)."""

    runs: int
    open_steps: int
    decisions: int  # steps opened (WAIT included)
    transitions_closed: int
    terminal: int  # closed by a done packet
    truncated: int  # closed by eviction (idle, max_runs, shutdown)
    episodes_closed: int  # episodes that ended with at least one transition
    rejections: int
    runs_dropped: int  # pushed out by max_runs
    unattributed_reward: float  # reward earned while no step was open (before the first decision)
    sink_errors: int
    version_mismatches: int  # decisions whose stamped version differed from the hook's policy version
    mean_episode_return: float  # over the last `returns_window` episodes


class LearnerStatus(msgspec.Struct):
    """The learner, when one runs."""

    algorithm: str
    updates: int = 0
    samples: int = 0
    samples_per_s: float = 0.0
    serving_version: int = 0
    buffered: int = 0
    last: dict[str, float] = {}
    breaker: str = "closed"  # closed | open (learning paused until recovery) | half_open (one probe)
    trips: int = 0  # times the breaker opened
    last_trip: str = ""  # why it last opened
    swaps: int = 0
    swap_pause_us_max: float = 0.0  # the longest hand-over of a new bundle to the decision loop
    bundles_reused: int = 0  # swaps that loaded a retired serving bundle instead of building one
    checkpoints: int = 0
    worker: str = "process"  # process | thread
    worker_pid: int = 0
    worker_deaths: int = 0  # times the worker process died and was restarted
    last_worker_error: str = ""
    checkpoint_failures: int = 0  # periodic checkpoints that failed (each retried with backoff)
    last_checkpoint_error: str = ""
    last_checkpoint_error_at: str = ""  # UTC, ISO 8601
    checkpoint_retry_in_s: float = 0.0  # after a failure: when the next attempt is due (0: none failing)
    # The breaker (002): `breaker` is closed | open | half_open (one probe update allowed).
    failures: int = 0  # failed updates (non-finite, KL, reward drop), each rolled back at once
    failures_in_window: int = 0  # of those, within the breaker's window_s
    last_failure: str = ""
    breaker_transitions: dict[str, int] = {}  # "closed->open", "open->half_open", "half_open->closed", ...
    last_transition: str = ""  # the last change of state and why
    breaker_reopens_in_s: float = 0.0  # while open: seconds until the half-open probe
    # 002's timing budgets (processing 20 ms, batch 50 ms, step 100 ms): times each was exceeded,
    # and the worst timing seen over it.
    budget_violations: dict[str, int] = {}
    budget_worst_ms: dict[str, float] = {}
    update_ms_p95: float = 0.0  # learner steps (batch taken -> result judged), last 1024


class MemberView(msgspec.Struct):
    """One member, as the instance answering sees it."""

    instance: str
    partitions: list[int]
    epochs: dict[int, int]
    runs: int
    age_s: float  # since its record last changed, by this instance's clock
    stale: bool  # no renewal seen for more than 2.5 heartbeats: frozen, cut off, or dying
    host: str = ""
    pid: int = 0


class ClusterView(msgspec.Struct):
    """Members, what each owns, who is stale, and which partitions nobody holds."""

    members: list[MemberView]
    gone: list[str]  # members whose record expired in the last minute: died, froze, or were cut off
    left: list[str]  # members that stopped cleanly (removed their record) in the last minute
    unowned_partitions: list[int]  # no live member claims them: their runs are not served now
    age_s: float  # how old this view is (refreshed every heartbeat)


class ClusterStatus(msgspec.Struct):
    """Several instances sharing the runs (present with `[cluster] enabled`)."""

    instance: str
    members: list[str]
    foreign_messages: int  # messages for runs this instance does not own now (not processed here)
    handovers: int  # runs given up: their partition went to another member, or its lease lapsed
    partitions: dict[int, int]  # partition -> epoch (the fencing token its commands carry), held now
    lease_lapses: int  # partitions given up because this instance missed its own lease deadline
    acquisitions: int  # partitions taken (at start, on a peer's death or departure, on handover)
    errors: int  # lease or membership renewals that failed (broker away or slow)
    view: ClusterView  # every member, what it owns, who is stale; unowned partitions
    subscribed: list[int] = []  # partitions subscribed to (with mapped_prefix; otherwise every message comes)


class TaskStatus(msgspec.Struct):
    """One supervised background task."""

    running: bool = False
    restarts: int = 0  # times it was started again after ending unexpectedly
    last_error: str = ""  # why it last ended ("" if it never did)
    last_error_at: str = ""  # when (UTC, ISO 8601)
    gave_up: bool = False  # it ended too often: the daemon is stopping with a non-zero exit


class ReloadStatus(msgspec.Struct):
    """SIGHUP reloads."""

    reloads: int = 0  # SIGHUPs that applied a config
    refused: int = 0  # SIGHUPs whose config (or checkpoint) was unusable: nothing changed
    last_at: str = ""  # UTC, ISO 8601, of the last attempt
    last_error: str = ""  # why the last attempt was refused ("" if it was applied)
    applied: list[str] = []  # the keys the last applied reload changed
    needs_restart: list[str] = []  # keys the config file changes that only a restart applies


class RailsStatus(msgspec.Struct, kw_only=True):
    """The rails every policy's commands stay within (`[rails]`, esperd.rails)."""

    enabled: bool = True
    blocked_total: int = 0  # decisions not sent: a rail blocked them (each became a WAIT)
    # by esperd.rails.Rail: confidence, urgency, command_rate, param_budget, active_seeds,
    # late_germination, seed_pool
    blocked_by_rail: dict[str, int] = {}
    masked_by_rail: dict[str, int] = {}  # decisions where a rail masked ops out before the policy chose
    seed_pool: int = 0  # [rails] max_seeds_total: live seeds all runs may share (0: no pool, or rails off)
    seed_pool_live: int = 0  # live seeds and germinations in flight across runs, as last observed


#: How much of the analysis the status lists (the counts always cover everything).
MAX_LISTED_RUNS = 32
MAX_LISTED_LAYERS = 32
MAX_LISTED_CLUSTERS = 8


class RunAnalysis(msgspec.Struct, kw_only=True):
    """One run's analysis summary (the seed documents' analysis summary; issue 16 item 5):
    its problematic layers, those that need attention, and the problem clusters."""

    run_id: str
    layers: int
    overall_health: float  # seed-count-weighted mean health of the layers that reported
    problematic: int  # layers flagged problematic (health, trend or errors)
    needs_attention: int  # layers with low and falling health
    clusters: int  # connected groups of problematic layers
    problematic_layers: list[int] = []  # their layer ids, the first MAX_LISTED_LAYERS
    attention_layers: list[int] = []  # likewise
    cluster_layers: list[list[int]] = []  # the largest MAX_LISTED_CLUSTERS clusters' layer ids
    epoch: int = 0
    done: bool = False


class AnalysisStatus(msgspec.Struct, kw_only=True):
    """The analyzer's view of every run it tracks."""

    runs: int
    runs_with_problems: int  # runs with at least one problematic layer
    problematic_layers: int  # over every run
    attention_layers: int
    clusters: int
    # The runs with the most problematic layers first (then the least healthy), at most
    # MAX_LISTED_RUNS; runs without a problematic or attention layer are left out.
    per_run: list[RunAnalysis] = []


class Status(msgspec.Struct):
    """What `esperd.status` answers."""

    version: str
    uptime_s: float
    runs: int
    accepted_total: int
    rejected_total: int
    rejected_by_reason: dict[str, int]
    accepted_by_kind: dict[str, int]
    commands_total: int
    acks_by_status: dict[str, int]  # applied, rejected, timed_out (a key appears with its first count)
    policy: PolicyStatus
    decisions: DecisionStats
    scheduler: SchedulerStatus
    nats: NatsStatus
    evicted_runs: int  # runs dropped for any reason (run_table.dropped_by_reason has the split)
    experience: RecorderStats
    stopping: bool
    learner: LearnerStatus | None = None
    cluster: ClusterStatus | None = None
    run_table: RunTableStatus | None = None
    tasks: dict[str, TaskStatus] = {}  # every supervised background task
    reload: ReloadStatus = msgspec.field(default_factory=ReloadStatus)  # SIGHUP reloads
    instance: str = ""  # also answers on esperd.status.<instance>
    rails: RailsStatus | None = None  # what the rails blocked (None: no decision loop reports them)
    analysis: AnalysisStatus | None = None  # per-run analysis summaries (issue 16)
