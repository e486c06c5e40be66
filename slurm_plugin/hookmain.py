"""Console entry points of the prolog/epilog: leave at once (no imports) for foreign jobs.

slurmd runs them for every job; a job with no GPU-token, no GPUs and no gpuledger mark
cannot have a hold, so it costs a bare interpreter start and nothing more.
"""

import os
import sys


def _may_be_ours() -> bool:
    env = os.environ
    return bool(env.get("SLURM_JOB_ID") and (
        env.get("SPANK_GPULEDGER_TOKEN") or env.get("SLURM_JOB_GPUS")
        or env.get("SLURM_JOB_COMMENT", "").startswith("gpuledger:")))


def prolog_main() -> None:
    if not _may_be_ours():
        sys.exit(0)
    from .prolog import main
    main()


def epilog_main() -> None:
    if not _may_be_ours():
        sys.exit(0)
    from .epilog import main
    main()
