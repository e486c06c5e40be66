"""The names the ledger accepts: Slurm account names and GPU type names."""

from __future__ import annotations

import re

from .errors import InvalidInput

_ACCOUNT_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
_GPU_TYPE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:+-]{0,63}$")


def check_account_name(name: str) -> str:
    if not isinstance(name, str) or not _ACCOUNT_NAME.match(name):
        raise InvalidInput(
            f"invalid account name {name!r} (lowercase letters, digits, . _ -; at most 64)"
        )
    return name


def check_gpu_type(name: str) -> str:
    if not isinstance(name, str) or not _GPU_TYPE.match(name):
        raise InvalidInput(f"invalid GPU type {name!r}")
    return name
