"""Charts drawn on the server as SVG: stacked columns of counts per time bucket and category.

Inline SVG with presentation attributes only (no style attribute, no script), so the page's
Content-Security-Policy has nothing to allow; every text is escaped here, as Markup is trusted.
"""

from __future__ import annotations

from html import escape

from markupsafe import Markup

from gateway.console.queries import Series

# Colours told apart by people with the common colour blindnesses (Okabe and Ito's palette).
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")
OTHER = "other"
_WIDTH, _HEIGHT = 640, 220
_LEFT, _BOTTOM, _TOP = 36, 28, 10


def stacked_columns(series: Series, *, chart_id: str) -> Markup:
    """`series` as an SVG of stacked columns with a legend; the most frequent categories get a
    colour each and the rest are summed as `other`."""
    counts = _top(series.counts, len(PALETTE) - 1)
    size = len(series.buckets)
    totals = [sum(values[index] for values in counts.values()) for index in range(size)]
    peak = max([*totals, 1])
    plot_w, plot_h = _WIDTH - _LEFT - 4, _HEIGHT - _BOTTOM - _TOP
    slot = plot_w / max(size, 1)
    bar = max(slot * 0.7, 1)
    hourly = size > 1 and (series.buckets[1] - series.buckets[0]).total_seconds() < 86400
    parts = [
        f'<svg class="chart" viewBox="0 0 {_WIDTH} {_HEIGHT}" role="img" aria-labelledby="{chart_id}-t {chart_id}-d"'
        ' xmlns="http://www.w3.org/2000/svg">',
        f'<title id="{chart_id}-t">{escape(series.title)}</title>',
        f'<desc id="{chart_id}-d">{series.total} in all; {escape(_summary(counts))}</desc>',
    ]
    for tick in (0, peak // 2, peak) if peak > 1 else (0, 1):
        y = _TOP + plot_h - plot_h * tick / peak
        parts.append(f'<line x1="{_LEFT}" x2="{_WIDTH - 4}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ccc"/>')
        parts.append(f'<text x="{_LEFT - 4}" y="{y + 4:.1f}" text-anchor="end" font-size="11">{tick}</text>')
    for index, bucket in enumerate(series.buckets):
        x = _LEFT + slot * index + (slot - bar) / 2
        base = float(_TOP + plot_h)
        for colour, (category, values) in zip(PALETTE, counts.items(), strict=False):
            value = values[index]
            if not value:
                continue
            height = plot_h * value / peak
            base -= height
            label = f"{bucket:%Y-%m-%d %H:00}" if hourly else f"{bucket:%Y-%m-%d}"
            parts.append(
                f'<rect x="{x:.1f}" y="{base:.1f}" width="{bar:.1f}" height="{height:.1f}" fill="{colour}">'
                f"<title>{escape(label)} UTC: {escape(category)} {value}</title></rect>"
            )
        step = 3 if hourly else 1
        if index % step == 0:
            label = f"{bucket:%H}h" if hourly else f"{bucket:%a %d}"
            parts.append(
                f'<text x="{x + bar / 2:.1f}" y="{_HEIGHT - 10}" text-anchor="middle" font-size="11">{label}</text>'
            )
    parts.append("</svg>")
    legend = "".join(
        f'<li><svg width="12" height="12" aria-hidden="true"><rect width="12" height="12" fill="{colour}"/></svg> '
        f"{escape(category)} ({sum(values)})</li>"
        for colour, (category, values) in zip(PALETTE, counts.items(), strict=False)
    )
    if not counts:
        legend = "<li>nothing recorded</li>"
    return Markup(f'{"".join(parts)}<ul class="legend">{legend}</ul>')  # noqa: S704 (escaped above)


def _top(counts: dict[str, list[int]], keep: int) -> dict[str, list[int]]:
    ranked = sorted(counts.items(), key=lambda item: (-sum(item[1]), item[0]))
    top = dict(ranked[:keep])
    rest = ranked[keep:]
    if rest:
        top[OTHER] = [sum(values) for values in zip(*(values for _, values in rest), strict=True)]
    return top


def _summary(counts: dict[str, list[int]]) -> str:
    return ", ".join(f"{category} {sum(values)}" for category, values in counts.items()) or "nothing recorded"
