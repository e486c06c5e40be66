"""The names the ledger accepts, one rule per kind of name, checked where a name enters the
ledger: the daemon's request fields, the library's hold requests and token scopes (mint,
split), account creation. What is stored was checked on the way in; readers (reports, mail)
still treat a stored name as text that may predate these rules.

- User names are POSIX-style login names: letters, digits, ``_ . -`` (not first: ``.``,
  ``-``), optionally one ``@domain`` for sites whose users are domain users
  (``alice@ad.example``); at most 64 characters. Never ``:``, ``<``, ``>``, ``,``, ``+``,
  quotes, blanks or control characters: a user name ends up in mail addresses, journal
  data and Slurm's own lists.
- Account names are Slurm account names, which Slurm lowercases: lowercase letters,
  digits, ``_ . -``.
- Partition and cluster names (token scopes): letters, digits, ``_ . -``.
- GPU types: letters, digits, ``_ . : + -`` (``a100:3g.20gb``-style MIG profiles).
- Identifiers on the daemon's wire and in signed claims (hold and job ids, key ids, node
  names): :func:`is_identifier`, the structural rule of everything else.
"""

from __future__ import annotations

import re

from .errors import InvalidInput

MAX_NAME = 64
_USER_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*(?:@[A-Za-z0-9][A-Za-z0-9.-]*)?$")
_ACCOUNT_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
_SLURM_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
_GPU_TYPE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:+-]{0,63}$")
_IDENTIFIER = re.compile(r"^[A-Za-z0-9_.@:+-]{1,64}$")


def is_user_name(name: object) -> bool:
    return isinstance(name, str) and len(name) <= MAX_NAME and bool(_USER_NAME.fullmatch(name))


def check_user_name(name: str) -> str:
    if not is_user_name(name):
        raise InvalidInput(
            f"invalid user name {name!r} (letters, digits, . _ - and one @domain; "
            f"at most {MAX_NAME})"
        )
    return name


def is_account_name(name: object) -> bool:
    return isinstance(name, str) and bool(_ACCOUNT_NAME.fullmatch(name))


def check_account_name(name: str) -> str:
    if not is_account_name(name):
        raise InvalidInput(
            f"invalid account name {name!r} (lowercase letters, digits, . _ -; at most 64)"
        )
    return name


def check_slurm_name(name: str, what: str = "name") -> str:
    """A partition or cluster name."""
    if not isinstance(name, str) or not _SLURM_NAME.fullmatch(name):
        raise InvalidInput(f"invalid {what} {name!r} (letters, digits, . _ -; at most 64)")
    return name


def check_gpu_type(name: str) -> str:
    if not isinstance(name, str) or not _GPU_TYPE.fullmatch(name):
        raise InvalidInput(f"invalid GPU type {name!r}")
    return name


def is_identifier(text: object) -> bool:
    """The structural rule of ids on the daemon's wire and names in signed claims."""
    return isinstance(text, str) and bool(_IDENTIFIER.fullmatch(text))
