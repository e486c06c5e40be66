"""An account's pool: what its revoked tokens (and the holds they still had) left behind.

The pool is value already issued, so it stays in the ledger until an admin decides: mint a
token from it (``TokenOps.mint(from_pool=True)``: pool → the new token), or burn it (here:
pool → ``system:issuance``, the reverse of a mint). Both are journaled movements; users'
balances never count it (it pays for no job until it is a token again).
"""

from __future__ import annotations

from .amounts import check_amount, fmt_hours
from .errors import InvalidInput
from .journal import Tx

BURN_KIND = "burn"


class PoolOps:
    """Mixin over LedgerBase and TokenOps."""

    def pool(self, account: str) -> int:
        """GPU-seconds in the account's pool."""
        with self._read() as conn:
            return self._balance(conn, self._account_row(conn, account).wallet_id)

    def burn_pool(self, account: str, amount: int | None, reason: str,
                  key: str | None = None) -> dict:
        """Return ``amount`` (None: all) of the account's pool to ``system:issuance``.
        {account, amount, pool (left)}; with ``key``, a replay returns the first result."""
        if not (reason or "").strip():
            raise InvalidInput("burning pool value needs a reason (--reason)")
        if amount is not None:
            check_amount(amount, what="hours")

        def run(tx: Tx) -> dict:
            acct = self._account_row(tx.conn, account)
            held = self._balance(tx.conn, acct.wallet_id)
            burn = held if amount is None else amount
            if burn == 0:
                raise InvalidInput(f"the pool of account {account} is empty; nothing to burn")
            if burn > held:
                raise InvalidInput(f"the pool of account {account} holds {fmt_hours(held)} "
                                   f"GPU-h; cannot burn {fmt_hours(burn)} GPU-h")
            tx.move(BURN_KIND, acct.wallet_id, tx.wallet_id("system:issuance"), burn,
                    account=account, reason=reason)
            tx.flush()
            return {"account": account, "amount": burn, "pool": held - burn}

        return self._idempotent("burn", key, {"account": account, "amount": amount,
                                              "reason": reason}, run)
