"""Where an account's balance goes at its current rate, token by token, and the decision a
PI takes from it: does the money last until the main token expires, or how much is short?

Only what jobs can spend counts: the remaining balance of each active token, each up to
its own expiry (a token that expires in two weeks adds nothing after them; what is left on
it then is lost). Jobs are assumed to draw on the token that expires first (the order
that makes the money last longest), at the month's net charge rate:

- the **run-out** date is when the last token is spent (none when the last one expires
  with money left: the balance outlasts the tokens);
- the **main token** is the one with the most left (ties: the later expiry); its expiry
  is the horizon the PI plans to;
- **short**: what it would take, at the same rate, to run from the run-out date to the
  horizon; **spare**: what would expire unused up to the horizon;
- **lost**: remainders that expire unused, token by token, before the balance runs out
  (or by the horizon) — an admin can move them to a longer-lived token in time.

A token whose validity starts later counts from now (the ledger refuses it until then).
Amounts are integer GPU-seconds; times are aware UTC datetimes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

DAY_S = 86_400


@dataclass(frozen=True)
class Spendable:
    """An active token's remaining balance at the report's end."""

    id: str
    users: tuple[str, ...]  # its owners; empty: any user of the account
    remaining: int
    expires: datetime


@dataclass(frozen=True)
class Loss:
    token: Spendable
    amount: int  # what would expire unused on token.expires


@dataclass
class Projection:
    as_of: datetime
    rate_per_day: int  # net GPU-seconds charged per day in the month
    spendable: int  # on active tokens at as_of
    unspendable: int  # in the balance but on no active token (account pool, expired tokens)
    main: Spendable | None
    run_out: datetime | None  # None: not at the current rate (nothing charged)
    short: int = 0
    spare: int = 0
    losses: list[Loss] = field(default_factory=list)
    # the projected spendable balance: (time, GPU-s), with a drop at each loss
    path: list[tuple[datetime, int]] = field(default_factory=list)

    @property
    def horizon(self) -> datetime | None:
        return self.main.expires if self.main else None

    @property
    def exhausted(self) -> bool:
        """Nothing left that a job could spend."""
        return self.spendable <= 0

    @property
    def exhaustion(self):
        """The run-out date (a date), None when the balance does not run out at this rate."""
        return self.run_out.date() if self.run_out else None

    @property
    def runs_short(self) -> bool:
        return self.short > 0

    @property
    def gap_days(self) -> int:
        """Whole days between the run-out and the horizon (0 when it lasts)."""
        if not self.runs_short or self.horizon is None or self.run_out is None:
            return 0
        return max(0, (self.horizon - self.run_out).days)

    def lost_by(self, when: datetime | None) -> int:
        return sum(x.amount for x in self.losses if when is None or x.token.expires <= when)


def main_token(tokens: list[Spendable]) -> Spendable | None:
    """The token with the most left; ties go to the later expiry, then the id."""
    if not tokens:
        return None
    return max(tokens, key=lambda t: (t.remaining, t.expires, t.id))


def project(tokens: list[Spendable], rate_per_day: int, as_of: datetime,
            unspendable: int = 0) -> Projection:
    """Spend ``tokens`` (remaining > 0, expiring after ``as_of``) at ``rate_per_day``,
    soonest expiry first, each only until it expires."""
    live = sorted((t for t in tokens if t.remaining > 0 and t.expires > as_of),
                  key=lambda t: (t.expires, t.id))
    total = sum(t.remaining for t in live)
    main = main_token(live)
    p = Projection(as_of, max(0, rate_per_day), total, max(0, unspendable), main, None)
    balance, now = total, as_of
    p.path.append((now, balance))
    spent_out = False  # whether the last token was spent (not expired with money left)
    for tok in live:
        if p.rate_per_day > 0:
            lasts = timedelta(seconds=tok.remaining * DAY_S / p.rate_per_day)
            if now + lasts <= tok.expires:  # spent before it expires
                now += lasts
                balance -= tok.remaining
                p.path.append((now, balance))
                spent_out = True
                continue
            used = int(p.rate_per_day * (tok.expires - now).total_seconds() / DAY_S)
        else:
            used = 0
        used = min(used, tok.remaining)
        balance -= used
        now = tok.expires
        p.path.append((now, balance))
        lost = tok.remaining - used
        spent_out = not lost
        if lost:
            p.losses.append(Loss(tok, lost))
            balance -= lost
            p.path.append((now, balance))
    if p.rate_per_day > 0 and spent_out:
        p.run_out = now
    if main is None:
        return p
    if p.run_out is not None and p.run_out < main.expires:
        gap = (main.expires - p.run_out).total_seconds()
        p.short = -(-p.rate_per_day * int(gap) // DAY_S)  # rounded up: never understated
    else:
        p.spare = p.lost_by(main.expires)
    return p
