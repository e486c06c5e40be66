"""Integer money: GPU-seconds at the reference rate, shown as GPU-hours; rates in ppm.

Every amount in the ledger is an ``int`` of GPU-seconds at the reference rate
(one H100-second when h100's rate is 1.0). Rates are integers in parts per
million so that cost = ceil(gpu_seconds * rate_ppm / 1e6) stays exact.
"""

from __future__ import annotations

import re
from decimal import Decimal

from .errors import InvalidInput

SECONDS_PER_HOUR = 3600
PPM = 1_000_000
# Largest amount accepted anywhere: fits a signed 64-bit column with room for sums.
MAX_AMOUNT = 2**53
# What people type for hours, rates and multipliers: a plain decimal (no 1e3, no inf).
_DECIMAL = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)$")


def parse_decimal(text: str | float | Decimal, what: str) -> Decimal:
    """A plain decimal number (``2``, ``2.5``, ``-1``), else InvalidInput naming ``what``."""
    s = str(text).strip()
    if not _DECIMAL.match(s) or len(s) > 40:
        raise InvalidInput(f"not a number of {what}: {text!r} (a decimal such as 2.5)")
    return Decimal(s)


def parse_hours(text: str | float | int | Decimal, *, allow_zero: bool = False) -> int:
    """``"2.5"`` GPU-hours → 9000 GPU-seconds; rejects non-positive, fractional seconds, huge."""
    value = parse_decimal(text, "hours")
    seconds = value * SECONDS_PER_HOUR
    if seconds != seconds.to_integral_value():
        raise InvalidInput(f"{text} hours is not a whole number of GPU-seconds")
    return check_amount(int(seconds), allow_zero=allow_zero, what="hours")


def check_amount(amount: int, *, allow_zero: bool = False, what: str = "amount") -> int:
    if isinstance(amount, bool) or not isinstance(amount, int):
        raise InvalidInput(f"{what} must be an integer, got {amount!r}")
    if amount < 0 or (amount == 0 and not allow_zero):
        raise InvalidInput(f"{what} must be positive, got {fmt_hours(amount) if amount else 0}")
    if amount > MAX_AMOUNT:
        raise InvalidInput(f"{what} is too large (max {fmt_hours(MAX_AMOUNT)} GPU-h)")
    return amount


def fmt_hours(amount: int) -> str:
    """GPU-seconds → GPU-hours with three decimals (rounded half up), e.g. ``2.500``."""
    sign = "-" if amount < 0 else ""
    milli = (abs(amount) * 1000 + SECONDS_PER_HOUR // 2) // SECONDS_PER_HOUR
    return f"{sign}{milli // 1000}.{milli % 1000:03d}"


def hours(amount: int) -> float:
    """GPU-seconds → GPU-hours as a float, for JSON (three decimals)."""
    return round(amount / SECONDS_PER_HOUR, 3)


def parse_rate(text: str | float | Decimal, what: str = "rate") -> int:
    """``"0.143"`` → 143000 ppm. Rates (and multipliers) are positive with at most six
    decimals."""
    try:
        value = parse_decimal(text, what)
    except InvalidInput:
        raise InvalidInput(f"not a {what}: {text!r} (a decimal such as 0.5)") from None
    if value <= 0:
        raise InvalidInput(f"{what} must be a positive number, got {text}")
    ppm = value * PPM
    if ppm != ppm.to_integral_value():
        raise InvalidInput(f"{what} {text} has more than six decimals")
    if ppm > 1000 * PPM:
        raise InvalidInput(f"{what} {text} is implausibly large (max 1000)")
    return int(ppm)


def fmt_rate(ppm: int) -> str:
    text = f"{Decimal(ppm) / PPM:f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def cost(gpu_seconds: int, rate_ppm: int) -> int:
    """Cost in reference GPU-seconds of ``gpu_seconds`` on a GPU of rate ``rate_ppm``."""
    return -((-gpu_seconds * rate_ppm) // PPM)


def fmt_duration(seconds: int) -> str:
    """Seconds → ``H:MM:SS`` (or ``D-HH:MM:SS``), as Slurm prints time limits."""
    days, rest = divmod(int(seconds), 86400)
    h, rest = divmod(rest, 3600)
    m, s = divmod(rest, 60)
    return f"{days}-{h:02d}:{m:02d}:{s:02d}" if days else f"{h}:{m:02d}:{s:02d}"
