"""The ``gpuledger`` command: the ledger's commands, the reports' and the Slurm plugin's.

The root sits in the top layer so that no package imports one above it: ``ledger`` <
``reports`` < ``slurm_plugin`` (``tests/test_layers.py``). Each component's commands are
loaded on first use (``ledger.cli.root``), and one not part of this build is left out.
"""

from __future__ import annotations

from ledger.cli import LEDGER_COMMANDS, root

cli = root(LEDGER_COMMANDS + ("reports.cli:COMMANDS", "slurm_plugin.cli:COMMANDS"))


def main() -> None:
    cli(prog_name="gpuledger")
