"""Latency distributions for the `simulated` agent (and benches), from a short spec:
`fixed:1.5`, `uniform:min=0.5,max=2`, `lognormal:median=1.5,p95=4`."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

SPEC_HELP = "fixed:SECONDS, uniform:min=A,max=B or lognormal:median=M,p95=P (seconds)"
Z95 = 1.6448536269514722  # the standard normal's 95th percentile


@dataclass(frozen=True)
class Latency:
    kind: str
    a: float
    b: float = 0.0

    def sample(self, rng: random.Random) -> float:
        if self.kind == "fixed":
            return self.a
        if self.kind == "uniform":
            return rng.uniform(self.a, self.b)
        # lognormal: median = e^mu, p95 = e^(mu + 1.645 sigma)
        mu, sigma = math.log(self.a), (math.log(self.b) - math.log(self.a)) / Z95
        return rng.lognormvariate(mu, sigma)

    def scaled(self, factor: float) -> Latency:
        return Latency(self.kind, self.a * factor, self.b * factor)


def parse_latency(spec: str) -> Latency:
    """Raises ValueError with what is allowed."""
    kind, _, rest = spec.strip().partition(":")
    try:
        if kind == "fixed":
            value = float(rest)
            if value < 0:
                raise ValueError
            return Latency("fixed", value)
        params = dict(part.split("=", 1) for part in rest.split(",") if part)
        if kind == "uniform" and set(params) == {"min", "max"}:
            lo, hi = float(params["min"]), float(params["max"])
            if 0 <= lo <= hi:
                return Latency("uniform", lo, hi)
        if kind == "lognormal" and set(params) == {"median", "p95"}:
            median, p95 = float(params["median"]), float(params["p95"])
            if 0 < median < p95:
                return Latency("lognormal", median, p95)
    except ValueError:
        pass
    raise ValueError(f"latency {spec!r} is not valid; use {SPEC_HELP}")
