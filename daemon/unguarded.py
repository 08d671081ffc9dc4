"""Test-only switches that turn one exactly-once guard off, so the test that proves the
guard can be seen failing without it (tests/test_races.py runs them).

`SDRCTL_TEST_UNGUARDED` is a comma-separated list of:
- `lock`: every turn gets the lead, as if no other daemon held it;
- `fence`: a turn's writes are accepted whatever its token, and for messages another turn
  already answered.
Never for production: `sdrctl serve` refuses any other value and warns when one is set."""

from __future__ import annotations

import os

GUARDS = ("lock", "fence")
VARIABLE = "SDRCTL_TEST_UNGUARDED"


def switched_off() -> frozenset[str]:
    return frozenset(g.strip() for g in os.environ.get(VARIABLE, "").split(",") if g.strip())


def off(guard: str) -> bool:
    # Read on each call (a dict lookup) so an in-process test can set it with monkeypatch.
    return VARIABLE in os.environ and guard in switched_off()
