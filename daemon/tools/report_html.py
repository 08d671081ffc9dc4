"""The report as one self-contained HTML page: inline CSS and inline SVG charts drawn here,
nothing fetched (no CDN, fonts or scripts), so it can be mailed, archived or opened
offline. Every chart has a viewBox and scales to the page width, down to a phone's.
Everything that comes from the database is escaped."""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta

from daemon.tools.report import (
    REPLY_WITHIN,
    Bin,
    FollowUpStats,
    Point,
    Report,
    StageStats,
    format_target,
    format_value,
)

W, H = 480, 220  # the charts' coordinate space; the page scales it (narrow: legible on a phone)
LEFT, RIGHT, TOP, BOTTOM = 58, 14, 14, 36  # plot margins for the axis labels
BLUE, LIGHT, RED, GREEN, GREY = "#2563eb", "#93c5fd", "#dc2626", "#15803d", "#94a3b8"

CSS = """
*{box-sizing:border-box}
body{margin:0;font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#0f172a;background:#f8fafc}
main{max-width:960px;margin:0 auto;padding:16px}
h1{font-size:1.4rem;margin:0 0 4px}h2{font-size:1.1rem;margin:28px 0 8px}
.sub{color:#475569;margin:0 0 16px}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(150px,1fr));gap:10px}
.card{background:#fff;border:1px solid #e2e8f0;border-left:6px solid #94a3b8;border-radius:8px;padding:10px 12px}
.card.met{border-left-color:#15803d}.card.missed{border-left-color:#dc2626}
.card .label{color:#475569;font-size:.85rem}.card .value{font-size:1.35rem;font-weight:600}
.card .target{font-size:.8rem;color:#475569}
.badge{display:inline-block;border-radius:4px;padding:0 6px;font-size:.75rem;font-weight:600;color:#fff}
.badge.met{background:#15803d}.badge.missed{background:#dc2626}
.verdict{padding:10px 12px;border-radius:8px;margin:14px 0;font-weight:600}
.verdict.met{background:#dcfce7;color:#14532d}.verdict.missed{background:#fee2e2;color:#7f1d1d}
.charts{display:grid;grid-template-columns:repeat(auto-fit,minmax(min(100%,440px),1fr));gap:12px}
figure{margin:0;background:#fff;border:1px solid #e2e8f0;border-radius:8px;padding:10px}
figcaption{font-weight:600;margin-bottom:6px}
svg{width:100%;height:auto;display:block}
svg text{font:13px system-ui,sans-serif;fill:#334155}
.scroll{overflow-x:auto;background:#fff;border:1px solid #e2e8f0;border-radius:8px}
table{border-collapse:collapse;width:100%;font-size:.9rem}
th,td{padding:6px 10px;text-align:right;white-space:nowrap;border-bottom:1px solid #f1f5f9}
th:first-child,td:first-child,.l{text-align:left}
td.wrap{white-space:normal;min-width:16em}
th{background:#f1f5f9;font-weight:600}
.empty{background:#fff;border:1px solid #e2e8f0;border-radius:8px;padding:24px;font-size:1.1rem}
"""


def e(value: object) -> str:
    return html.escape(str(value), quote=True)


def render(report: Report) -> str:
    title = f"sdrctl report: {report.window.describe()}"
    head = (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{e(title)}</title><style>{CSS}</style></head><body><main>"
        f'<h1>SDR agent: KPIs against the SLOs</h1><p class="sub">turns finished between '
        f"{e(report.window.describe())} (UTC)</p>"
    )
    if report.empty:
        body = f'<p class="empty">Nothing to report between {e(report.window.describe())}: no turns finished in this window.</p>'
    else:
        body = "".join(
            (
                _cards(report),
                _charts(report),
                _stage_table(report.stages),
                _outcomes(report),
                _bursts(report),
                _slowest(report),
            )
        )
    # Follow-ups go out on their own schedule: shown even in a window without turns.
    if report.followups_total.active:
        body += _followups(report)
    return head + body + "</main></body></html>\n"


# --- sections ----------------------------------------------------------------------------


def _cards(report: Report) -> str:
    cards = []
    for k in report.kpis:
        state = {True: "met", False: "missed", None: "na"}[k.met]
        badge = f' <span class="badge {state}">{state}</span>' if k.met is not None else ""
        target = f"target {format_target(k)}" if k.target is not None else "no target"
        cards.append(
            f'<div class="card {state}"><div class="label">{e(k.label)}{badge}</div>'
            f'<div class="value">{e(k.text())}</div><div class="target">{e(target)}</div></div>'
        )
    missed = report.missed
    verdict = (
        '<p class="verdict met">Every SLO met.</p>'
        if not missed
        else f'<p class="verdict missed">SLO missed: {e(", ".join(k.label for k in missed))}.</p>'
    )
    return verdict + f'<div class="cards">{"".join(cards)}</div>'


def _charts(report: Report) -> str:
    target_ms = report.kpi("response_p95_ms").target
    hit_target = report.kpi("cache_hit_rate").target
    step = report.step
    figures = [
        ("Response time histogram (turns)", _histogram(report.histogram, target_ms)),
        (
            f"P95 response time per {_step_name(step)}",
            _timeline(report.timeline, lambda p: p.response_p95_ms, target_ms, _ms_label, step),
        ),
        ("P50 / P95 by stage", _stage_bars(report.stages)),
        (
            f"Cache hit rate per {_step_name(step)}",
            _timeline(report.timeline, lambda p: p.cache_hit_rate, hit_target, _pct_label, step, top=1.0),
        ),
    ]
    inner = "".join(f"<figure><figcaption>{e(t)}</figcaption>{svg}</figure>" for t, svg in figures)
    return f'<h2>Charts</h2><div class="charts">{inner}</div>'


def _stage_table(stages: Sequence[StageStats]) -> str:
    rows = "".join(
        f"<tr><td>{e(s.stage)}</td><td>{s.turns:,}</td><td>{e(format_value(s.p50_ms, 'ms'))}</td>"
        f"<td>{e(format_value(s.p95_ms, 'ms'))}</td><td>{e(format_value(s.p99_ms, 'ms'))}</td>"
        f"<td>{s.timeouts:,}</td><td>{s.failures:,}</td></tr>"
        for s in stages
    )
    head = "<tr><th>stage</th><th>turns</th><th>P50</th><th>P95</th><th>P99</th><th>timeouts</th><th>failures</th></tr>"
    return f'<h2>Stages</h2><div class="scroll"><table>{head}{rows}</table></div>'


def _outcomes(report: Report) -> str:
    rows = "".join(
        f"<tr><td>{e(name)}</td><td>{n:,}</td><td>{e(format_value(n / report.turns, 'percent'))}</td></tr>"
        for name, n in report.outcomes.items()
    )
    return f'<h2>Outcomes</h2><div class="scroll"><table><tr><th>outcome</th><th>turns</th><th>share</th></tr>{rows}</table></div>'


def _bursts(report: Report) -> str:
    b = report.bursts
    seconds = f"{b.interrupt_window.total_seconds():g}"
    rows = (
        (
            "interrupted replies (estimate)",
            f"{b.interrupted:,} of {b.replies:,} ({format_value(b.interrupted_rate, 'percent')})",
            f"the lead wrote within {seconds} s after the reply was delivered, a message the reply did not answer",
        ),
        (
            "discarded replies",
            f"{b.discarded:,}",
            "replies written and thrown away: a newer message of the lead overtook them",
        ),
        (
            "agent calls per turn",
            format_value(b.agent_calls_per_turn, "ratio"),
            f"(turns {b.turns:,} + discarded {b.discarded:,}) / turns {b.turns:,}",
        ),
    )
    body = "".join(f'<tr><td>{e(k)}</td><td>{e(v)}</td><td class="l wrap">{e(how)}</td></tr>' for k, v, how in rows)
    head = '<tr><th>figure</th><th>value</th><th class="l">how it is counted</th></tr>'
    return (
        f'<h2>Bursts</h2><p class="sub">replies sent while the lead was still typing, and replies '
        f'thrown away</p><div class="scroll"><table>{head}{body}</table></div>'
    )


def _slowest(report: Report) -> str:
    rows = "".join(
        f'<tr><td>{t.turn_id}</td><td class="l">{e(t.phone)}</td><td class="l">{e(t.name or "")}</td>'
        f'<td>{e(format_value(t.response_ms, "ms"))}</td><td class="l">{e(t.outcome)}</td>'
        f'<td class="l">{e(_stages_text(t.stages, t.timeouts))}</td></tr>'
        for t in report.slowest
    )
    head = '<tr><th>turn</th><th class="l">phone</th><th class="l">name</th><th>response</th><th class="l">outcome</th><th class="l">stages (ms)</th></tr>'
    return f'<h2>Slowest turns</h2><div class="scroll"><table>{head}{rows}</table></div>'


def _followups(report: Report) -> str:
    def row(s: FollowUpStats, tag: str = "td") -> str:
        cells = (s.sent, s.failed, s.cancelled, s.pending, s.replied)
        return (
            f'<tr><{tag} class="l">{e(s.kind)}</{tag}>'
            + "".join(f"<{tag}>{n:,}</{tag}>" for n in cells)
            + f"<{tag}>{e(format_value(s.reply_rate, 'percent'))}</{tag}></tr>"
        )

    hours = int(REPLY_WITHIN.total_seconds() // 3600)
    head = (
        '<tr><th class="l">kind</th><th>sent</th><th>failed</th><th>cancelled</th><th>pending now</th>'
        f"<th>replied ≤ {hours} h</th><th>reply rate</th></tr>"
    )
    rows = "".join(row(s) for s in report.followups) + row(report.followups_total, "th")
    return (
        f'<h2>Follow-ups</h2><p class="sub">sent, failed and cancelled in the window; pending now; '
        f"a reply is a message from the lead within {hours} h of the follow-up</p>"
        f'<div class="scroll"><table>{head}{rows}</table></div>'
    )


def _stages_text(stages: dict[str, float], timeouts: Sequence[str]) -> str:
    parts = [f"{k} {v:,.0f}" + (" (timed out)" if k in timeouts else "") for k, v in stages.items()]
    return ", ".join(parts)


# --- charts ------------------------------------------------------------------------------


def _svg(label: str, body: str) -> str:
    return f'<svg viewBox="0 0 {W} {H}" role="img" aria-label="{e(label)}">{body}</svg>'


def _nice_top(value: float) -> float:
    """A round figure (1, 2 or 5 times a power of ten) at or above `value`."""
    if value <= 0:
        return 1.0
    magnitude = 10 ** math.floor(math.log10(value))
    return float(next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= value))


def _y_axis(top: float, label: Callable[[float], str]) -> str:
    """Four gridlines with their labels; y grows downwards in SVG."""
    out = []
    for i in range(5):
        v = top * i / 4
        y = _y(v, top)
        out.append(
            f'<line x1="{LEFT}" y1="{y:.1f}" x2="{W - RIGHT}" y2="{y:.1f}" stroke="#e2e8f0"/>'
            f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{e(label(v))}</text>'
        )
    return "".join(out)


def _y(value: float, top: float) -> float:
    return H - BOTTOM - (H - TOP - BOTTOM) * min(value, top) / top


def _target_line(target: float | None, top: float) -> str:
    if target is None or target > top:
        return ""
    y = _y(target, top)
    return (
        f'<line x1="{LEFT}" y1="{y:.1f}" x2="{W - RIGHT}" y2="{y:.1f}" stroke="{RED}" '
        f'stroke-dasharray="6 4" stroke-width="1.5"/><text x="{W - RIGHT}" y="{y - 4:.1f}" '
        f'text-anchor="end" fill="{RED}">SLO</text>'
    )


def _ms_label(v: float) -> str:
    return f"{v / 1000:g} s" if v >= 1000 else f"{v:g} ms"


def _pct_label(v: float) -> str:
    return f"{v:.0%}"


def _histogram(bins: Sequence[Bin], target_ms: float | None) -> str:
    if not bins:
        return _svg("no replies sent", f'<text x="{W / 2}" y="{H / 2}" text-anchor="middle">no replies sent</text>')
    top = _nice_top(max(b.turns for b in bins))
    width = (W - LEFT - RIGHT) / len(bins)
    out = [_y_axis(top, lambda v: f"{v:,.0f}" if v >= 10 else f"{v:g}")]
    for i, b in enumerate(bins):
        x, y = LEFT + i * width, _y(b.turns, top)
        over = target_ms is not None and b.low_ms >= target_ms
        span = f"{_ms_label(b.low_ms)} – {_ms_label(b.high_ms)}" if b.high_ms else f"≥ {_ms_label(b.low_ms)}"
        out.append(
            f'<rect x="{x + 1:.1f}" y="{y:.1f}" width="{max(width - 2, 1):.1f}" '
            f'height="{H - BOTTOM - y:.1f}" fill="{RED if over else BLUE}">'
            f"<title>{e(span)}: {b.turns:,} turns</title></rect>"
        )
        if i % max(1, len(bins) // 5) == 0:
            out.append(f'<text x="{x:.1f}" y="{H - BOTTOM + 16}" text-anchor="middle">{e(_ms_label(b.low_ms))}</text>')
    step = bins[1].low_ms - bins[0].low_ms if len(bins) > 1 else 0
    if target_ms is not None and step and target_ms <= bins[-1].low_ms:  # the SLO as a vertical line
        x = LEFT + width * target_ms / step
        out.append(
            f'<line x1="{x:.1f}" y1="{TOP}" x2="{x:.1f}" y2="{H - BOTTOM}" stroke="{RED}" '
            f'stroke-dasharray="6 4" stroke-width="1.5"/><text x="{x + 4:.1f}" y="{TOP + 10}" '
            f'fill="{RED}">SLO</text>'
        )
    return _svg("response time histogram", "".join(out))


def _timeline(
    points: Sequence[Point],
    value: Callable[[Point], float | None],
    target: float | None,
    label: Callable[[float], str],
    step: timedelta,
    top: float | None = None,
) -> str:
    values = [value(p) for p in points]
    known = [v for v in values if v is not None]
    if not known:
        return _svg("no data", f'<text x="{W / 2}" y="{H / 2}" text-anchor="middle">no data</text>')
    top = top or _nice_top(max([*known, target or 0]))
    n = len(points)
    span = W - LEFT - RIGHT

    def x(i: int) -> float:
        return LEFT + (span * i / (n - 1) if n > 1 else span / 2)

    out = [_y_axis(top, label), _target_line(target, top)]
    segment: list[str] = []
    for i, v in enumerate([*values, None]):  # a bucket without data breaks the line
        if v is None:
            if len(segment) > 1:
                out.append(f'<polyline points="{" ".join(segment)}" fill="none" stroke="{BLUE}" stroke-width="2"/>')
            segment = []
            continue
        segment.append(f"{x(i):.1f},{_y(v, top):.1f}")
        out.append(
            f'<circle cx="{x(i):.1f}" cy="{_y(v, top):.1f}" r="2.5" fill="{BLUE}">'
            f"<title>{e(_when(points[i].at, step))}: {e(label(v))}</title></circle>"
        )
    for i, anchor in {0: "start", n // 2: "middle", n - 1: "end"}.items():  # first, middle, last
        out.append(
            f'<text x="{x(i):.1f}" y="{H - BOTTOM + 16}" text-anchor="{anchor}">{e(_when(points[i].at, step))}</text>'
        )
    return _svg("timeline", "".join(out))


def _stage_bars(stages: Sequence[StageStats]) -> str:
    """Per stage, a P50 bar over a P95 bar, each labelled with its value (the agent can be
    a thousand times the store, so the figures matter more than the lengths)."""
    rows = [s for s in stages if s.p95_ms is not None]
    if not rows:
        return _svg("no stage timings", f'<text x="{W / 2}" y="{H / 2}" text-anchor="middle">no stage timings</text>')
    height = TOP + 36 * len(rows) + 24
    top = max(s.p95_ms or 0 for s in rows)
    span = W - 100 - 90  # room for the value after the longest bar
    out = []
    for i, s in enumerate(rows):
        y = TOP + 36 * i
        out.append(f'<text x="94" y="{y + 18}" text-anchor="end">{e(s.stage)}</text>')
        for j, (v, colour) in enumerate(((s.p50_ms or 0, LIGHT), (s.p95_ms or 0, BLUE))):
            w = max(span * v / top, 1)
            out.append(
                f'<rect x="100" y="{y + j * 15:.1f}" width="{w:.1f}" height="14" fill="{colour}"/>'
                f'<text x="{104 + w:.1f}" y="{y + j * 15 + 12:.1f}">{e(format_value(v, "ms"))}</text>'
            )
    legend_y = height - 8
    out.append(
        f'<rect x="100" y="{legend_y - 10}" width="11" height="11" fill="{LIGHT}"/><text x="115" y="{legend_y}">P50</text>'
        f'<rect x="160" y="{legend_y - 10}" width="11" height="11" fill="{BLUE}"/><text x="175" y="{legend_y}">P95</text>'
    )
    return f'<svg viewBox="0 0 {W} {height}" role="img" aria-label="stage latency">{"".join(out)}</svg>'


def _step_name(step: timedelta) -> str:
    minutes = int(step.total_seconds() // 60)
    if minutes % 1440 == 0:
        return "day" if minutes == 1440 else f"{minutes // 1440} days"
    if minutes % 60 == 0:
        return "hour" if minutes == 60 else f"{minutes // 60} hours"
    return "minute" if minutes == 1 else f"{minutes} minutes"


def _when(at: datetime, step: timedelta) -> str:
    return f"{at:%m-%d}" if step >= timedelta(days=1) else f"{at:%m-%d %H:%M}"
