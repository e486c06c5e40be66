"""Caps on what one admin command may set ([limits] in the config): a face value or a rate
with a digit too many is refused before it reaches the ledger, naming the cap to raise."""

from __future__ import annotations

from dataclasses import dataclass

from .amounts import PPM, SECONDS_PER_HOUR, fmt_hours, fmt_rate
from .errors import InvalidInput

DEFAULT_MAX_TOKEN_HOURS = 1_000_000
DEFAULT_MAX_RATE = "100"
DEFAULT_MAX_MULTIPLIER = "10"


@dataclass(frozen=True)
class Limits:
    max_token: int = DEFAULT_MAX_TOKEN_HOURS * SECONDS_PER_HOUR  # GPU-seconds
    max_rate_ppm: int = int(DEFAULT_MAX_RATE) * PPM
    max_multiplier_ppm: int = int(DEFAULT_MAX_MULTIPLIER) * PPM

    def check_token(self, amount: int) -> None:
        if amount > self.max_token:
            raise InvalidInput(
                f"{fmt_hours(amount)} GPU-h is above the largest token value, "
                f"{fmt_hours(self.max_token)} GPU-h ([limits] max_token_hours); mint several "
                "tokens, or raise the cap in the config if this is meant")

    def check_rate(self, ppm: int) -> None:
        if ppm > self.max_rate_ppm:
            raise InvalidInput(f"rate {fmt_rate(ppm)} is above the largest rate, "
                               f"{fmt_rate(self.max_rate_ppm)} ([limits] max_rate)")

    def check_multiplier(self, ppm: int) -> None:
        if ppm > self.max_multiplier_ppm:
            raise InvalidInput(f"multiplier {fmt_rate(ppm)} is above the largest multiplier, "
                               f"{fmt_rate(self.max_multiplier_ppm)} ([limits] "
                               "max_multiplier)")
