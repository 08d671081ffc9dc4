"""`sdrctl bench --soak`: the bench workload for a long while, watching the daemon for leaks.

One real `sdrctl serve` (as in `run_bench`) runs the simulated leads for a wall-clock
duration while this process scrapes its /metrics every few seconds over HTTP: resident
memory, asyncio tasks alive, open file descriptors. After a warm-up (pools, caches and
allocator arenas fill), a leak shows as a level that keeps rising, so we compare the level
right after the warm-up with the level at the end of the run.

Flatness, per series, on the samples taken under load after the warm-up:
- `warm` = the median of the first quarter of them, `end` = the median of the last quarter
  (a median, so one scrape during a burst of turns or a GC pause does not decide);
- the noise comes from the run itself, not a guess: the samples are cut into 8 blocks, and
  `noise` is the standard deviation of a block's median, estimated from the differences
  between consecutive blocks (so a trend does not count as noise, and load that swings for
  tens of seconds does: samples a second apart are not independent);
- the allowance is NOISE_SIGMAS x noise (the sd of the warm-to-end difference is about
  one block's), and at least a floor: RSS 2 MiB (it moves in allocator steps, with no noise
  at all between steps), tasks and fds 2;
- `climbing` = every block's median above the one before: a steady climb is a leak even
  when the run was too short to pass the allowance;
- flat = `end - warm` within the allowance, and not (climbing and more than half of it).
All three series are in the verdict. Tasks also go back to the level before the load once
the leads stop (`idle_after`)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from daemon.config import load_profile
from daemon.durations import parse_duration
from daemon.errors import ConfigError, SdrError, UnavailableError
from daemon.tasks import cancel_and_wait
from daemon.testing.fake_evolution import run_fake_evolution
from daemon.tools.bench import ProfileResult, drive
from daemon.tools.daemons import start_daemon
from daemon.tools.workload import Tally, Workload

SERIES = {"rss_bytes": "process_resident_memory_bytes", "tasks": "sdr_asyncio_tasks", "fds": "process_open_fds"}
NOISE_SIGMAS = 4.0  # standard deviations of the warm-to-end difference a series may move by
BLOCKS = 8
# RSS moves in allocator steps, not noise (its sigma is 0 within a quarter): the 2-minute
# runs measured +0.07 and +0.49 MB after the warm-up. 2 MiB there catches ~80 MB an hour.
FLOORS = {"rss_bytes": float(2 * 2**20), "tasks": 2.0, "fds": 2.0}
MIN_SOAK, MAX_SOAK = 60.0, 24 * 3600.0


def soak_seconds(text: str) -> float:
    """--soak: how long the soak runs, a duration (daemon/durations.py) from 1m to 24h."""
    allowed = "a duration from 1m to 24h, such as 90s, 30m, 2h"
    try:
        seconds = parse_duration(text)
    except ValueError:
        seconds = math.nan
    if not MIN_SOAK <= seconds <= MAX_SOAK:
        raise ConfigError(f"--soak {text!r}: need {allowed}")
    return seconds


def warmup_for(seconds: float) -> float:
    """The first 25 % of the run or 30 s, whichever is smaller."""
    return min(0.25 * seconds, 30.0)


def sample_every(seconds: float) -> float:
    """About 120 samples per run (more samples, steadier quarter medians), every 1-10 s."""
    return min(10.0, max(1.0, seconds / 120))


@dataclass(frozen=True)
class Sample:
    t: float  # seconds since the load started
    rss_bytes: float
    tasks: float
    fds: float


@dataclass(frozen=True)
class Trend:
    """One series after the warm-up; see the module docstring for `flat`."""

    start: float  # before any load
    warm: float  # median of the first quarter after the warm-up
    end: float  # median of the last quarter
    growth_pct: float
    per_minute: float
    noise: float  # the standard deviation of a block's median (see the module docstring)
    allowance: float
    climbing: bool
    flat: bool


def judge(samples: list[Sample], name: str, warmup: float, floor: float) -> Trend:
    post = [s for s in samples if s.t >= warmup]
    if len(post) < BLOCKS:
        raise SdrError(f"soak: only {len(post)} samples after the warm-up; need {BLOCKS} (a longer run)")
    n = len(post)
    values = [getattr(s, name) for s in post]
    warm, end = statistics.median(values[: n // 4]), statistics.median(values[3 * n // 4 :])
    blocks = [statistics.median(values[i * n // BLOCKS : (i + 1) * n // BLOCKS]) for i in range(BLOCKS)]
    noise = statistics.pstdev(b - a for a, b in itertools.pairwise(blocks)) / math.sqrt(2)
    minutes = (statistics.median(s.t for s in post[3 * n // 4 :]) - statistics.median(s.t for s in post[: n // 4])) / 60
    allowed = max(floor, NOISE_SIGMAS * noise)
    climbing = all(a < b for a, b in itertools.pairwise(blocks))
    growth = end - warm
    flat = growth <= allowed and not (climbing and growth > allowed / 2)
    return Trend(
        start=getattr(samples[0], name),
        warm=warm,
        end=end,
        growth_pct=100 * growth / warm if warm else 0.0,
        per_minute=growth / minutes if minutes > 0 else 0.0,
        noise=noise,
        allowance=allowed,
        climbing=climbing,
        flat=flat,
    )


def trends(samples: list[Sample], warmup: float) -> dict[str, Trend]:
    return {name: judge(samples, name, warmup, FLOORS[name]) for name in SERIES}


@dataclass
class SoakResult:
    seconds: float
    warmup: float
    every: float
    samples: list[Sample]
    idle_after: Sample  # once the leads stopped and their last replies came
    bench: ProfileResult
    trends: dict[str, Trend]

    @property
    def flat(self) -> bool:
        """The verdict: RSS, tasks and fds all flat."""
        return all(t.flat for t in self.trends.values())

    def summary(self) -> dict[str, Any]:
        return {
            "seconds": self.seconds,
            "warmup_s": self.warmup,
            "sample_every_s": self.every,
            "flat": self.flat,
            "trends": {k: dataclasses.asdict(v) for k, v in self.trends.items()},
            "idle_after": dataclasses.asdict(self.idle_after),
            "bench": self.bench.summary(),
            "samples": [dataclasses.asdict(s) for s in self.samples],
        }


# --- a run ------------------------------------------------------------------------------


async def scrape(http: httpx.AsyncClient, t: float) -> Sample:
    try:
        response = await http.get("/metrics")
        response.raise_for_status()
    except httpx.HTTPError as exc:
        raise UnavailableError(f"soak: cannot read the daemon's /metrics at {t:.0f}s: {exc}") from None
    text = response.text
    values = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    missing = [m for m in SERIES.values() if m not in values or math.isnan(values[m])]
    if missing:
        raise SdrError(f"soak: the daemon's /metrics has no {', '.join(missing)} (needs Linux /proc)")
    return Sample(t, **{k: values[m] for k, m in SERIES.items()})


SoakProgress = Callable[[dict[str, Tally], list[Sample], float], None]


async def run_soak(
    profile: str,
    workload: Workload,
    seconds: float,
    *,
    config_path: str | None = None,
    progress: SoakProgress | None = None,
) -> SoakResult:
    """The workload for `seconds` of wall-clock time (whatever the time scale) against one
    daemon, its /metrics sampled all along."""
    p = load_profile(profile)
    # The workload's duration is in unscaled seconds; the soak's is on the wall clock.
    w = dataclasses.replace(workload, duration=seconds / workload.time_scale).validated()
    every, warmup = sample_every(seconds), warmup_for(seconds)
    samples: list[Sample] = []
    async with run_fake_evolution(keep_bodies=False) as fake:
        async with start_daemon(p, fake.url, w, config_path, p.timeouts.embedded_start * 4) as daemon:
            async with httpx.AsyncClient(base_url=daemon.url, timeout=p.timeouts.webhook) as http:
                start = time.monotonic()
                samples.append(await scrape(http, 0.0))  # idle, before the first lead

                async def sample() -> None:
                    # Only under load: the leads' last replies after `seconds` would pull
                    # the last quarter down and hide a leak.
                    while (due := samples[-1].t + every) < seconds:
                        await asyncio.sleep(max(0.0, start + due - time.monotonic()))
                        samples.append(await scrape(http, time.monotonic() - start))

                def tick(tallies: dict[str, Tally], elapsed: float) -> None:
                    if sampler.done() and not sampler.cancelled():
                        sampler.result()  # a failing scrape ends the run, not a silent gap
                    if progress is not None:
                        progress(tallies, samples, elapsed)

                sampler = asyncio.create_task(sample())
                try:
                    [result] = await drive([daemon], fake, w, progress=tick)
                finally:
                    await cancel_and_wait(sampler)
                with contextlib.suppress(asyncio.CancelledError):
                    sampler.result()
                idle = await scrape(http, time.monotonic() - start)
    return SoakResult(seconds, warmup, every, samples, idle, result, trends(samples, warmup))
