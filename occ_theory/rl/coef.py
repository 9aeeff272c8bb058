"""The MTP coefficient λ applied at each optimizer step, by regime (THEORY.md sections 3, 4).

* ``off``: 0, and no MTP loss at all.
* ``detach`` / ``detach_encoder`` / ``ce`` / ``policy``: the fixed ``mtp_coef``.
* ``occ``: the chosen proxy (which already carries the base coefficient ``c = mtp_coef /
  num_depths``), then an optional EMA and clip. A non-finite proxy is applied as 0 and counted.

The trainer computes the proxies from globally summed ``(num, den)`` terms
(``occ_theory.theory.proxies``), so a multi-process run applies the same λ as one process with the
whole batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class CoefficientRule:
    regime: str
    mtp_coef: float
    proxy: str = "reference"
    ema: float = 0.0
    clip: tuple[float, float] | None = None
    _state: float | None = None
    non_finite: int = 0

    @property
    def adaptive(self) -> bool:
        return self.regime == "occ"

    def __call__(self, proxy_coefs: dict[str, float] | None = None) -> float:
        if self.regime == "off":
            return 0.0
        if not self.adaptive:
            return float(self.mtp_coef)
        if proxy_coefs is None or self.proxy not in proxy_coefs:
            raise ValueError(f"occ needs the {self.proxy!r} proxy value")
        raw = float(proxy_coefs[self.proxy])
        if not math.isfinite(raw):
            self.non_finite += 1
            raw = 0.0
        value = raw if self._state is None or self.ema == 0 else self.ema * self._state + (1 - self.ema) * raw
        self._state = value
        if self.clip is not None:
            value = min(max(value, self.clip[0]), self.clip[1])
        return value

    def state_dict(self) -> dict:
        return {"state": self._state, "non_finite": self.non_finite}

    def load_state_dict(self, sd: dict) -> None:
        self._state, self.non_finite = sd["state"], sd["non_finite"]
