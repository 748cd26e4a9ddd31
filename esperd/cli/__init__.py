"""The `esperd` command line (the console script `esperd = "esperd.cli:main"`).

One module per job (the top layer, "command line", of docs/ARCHITECTURE.md):

    main         the parser and its commands: run, check-config, schema, train, sim calibrate,
                 record, watch, status; the exit codes
    cliconn      the NATS connection of the operator commands (`esperd watch`, `esperd status`)
    statusquery  asks every esperd instance on a NATS system for its status
    statusview   `esperd status` for one instance: fetch the status, render it for a person
    watch        `esperd watch`: the live lifecycle, decoded, one line per event
"""

from __future__ import annotations

from esperd.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
