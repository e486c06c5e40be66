"""gpuledger's ledger: signed GPU-hour tokens, two-phase holds, a hash-chained journal."""

__version__ = "0.1.0"
