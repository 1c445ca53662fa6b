"""The leaderboard as one self-contained HTML page.

:func:`to_html` renders a :class:`~dabench.leaderboard.Leaderboard` with
every table of the Markdown report (the same text, so the two never
disagree), plus two plots drawn with matplotlib (Agg backend, imported only
here) and embedded as base64 PNG:

- a heatmap of each method's gain over the pair's reference (percentage
  points; red = worse, blue = better), cells with significant negative
  transfer outlined and marked ``NT``;
- a critical-difference diagram of average ranks over pairs (Demšar, JMLR
  7, 2006: Nemenyi test, ``CD = q_alpha sqrt(k (k + 1) / (6 N))``; methods
  joined by a bar are not significantly different).

The page needs no network: CSS is inline, images are data URIs, and there is
no script.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from typing import Any, Sequence

import numpy as np

from .leaderboard import Leaderboard, LeaderboardError, to_markdown

__all__ = ["to_html", "critical_difference", "gain_matrix", "heatmap_figure", "health_marks", "NEMENYI_Q05"]

#: Nemenyi critical values q_0.05 for k = 2..10 methods (Demšar 2006, Table 5a).
NEMENYI_Q05 = {2: 1.960, 3: 2.343, 4: 2.569, 5: 2.728, 6: 2.850, 7: 2.949, 8: 3.031, 9: 3.102, 10: 3.164}

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1400px;
color:#1b1b1b;line-height:1.45;padding:0 1em}
h1{font-size:1.7em;border-bottom:2px solid #333;padding-bottom:.2em}
h2{font-size:1.3em;margin-top:1.8em;border-bottom:1px solid #bbb}
h3{font-size:1.1em}
table{border-collapse:collapse;margin:.8em 0;font-size:.88em}
th,td{border:1px solid #c8c8c8;padding:.3em .55em;vertical-align:top}
th{background:#eef1f5;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums}
td.nt{background:#f9d3d0;font-weight:600}
td.better{background:#d5ecd5}
td.warn{background:#fdebc8}
td.nf{background:repeating-linear-gradient(135deg,#ececec 0 6px,#dcdcdc 6px 12px);color:#555}
td.suspect{background:#e8d5f5;font-weight:600}
code{background:#f3f3f3;padding:0 .2em;border-radius:3px;font-size:.92em}
figure{margin:1em 0}
figcaption{font-size:.9em;color:#444;max-width:60em}
img{max-width:100%;height:auto;border:1px solid #ddd}
.warning{background:#fff4d6;border-left:4px solid #e0a000;padding:.4em .8em}
"""


# ---------------------------------------------------------------- markdown subset -> HTML


def _inline(text: str) -> str:
    """Escape, then render ``code``, **bold** and *italic* (the subset our Markdown uses)."""
    parts = re.split(r"(`[^`]*`)", text)
    out = []
    for p in parts:
        if p.startswith("`") and p.endswith("`") and len(p) >= 2:
            out.append(f"<code>{html.escape(p[1:-1])}</code>")
            continue
        e = html.escape(p.replace("\\|", "|").replace("\\*", "*"))
        e = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", e)
        out.append(e)
    return "".join(out)


def _split_row(line: str) -> list[str]:
    cells = re.split(r"(?<!\\)\|", line.strip())[1:-1]
    return [c.strip() for c in cells]


def _cell_class(text: str, right: bool) -> str:
    classes = []
    if right or re.fullmatch(r"[-+]?[\d.]+\*?|—", text):
        classes.append("num")
    if "**SUSPECT**" in text:
        classes.append("suspect")
    elif "**NT**" in text or "**negative transfer**" in text:
        classes.append("nt")
    elif re.search(r"\[(failed training|not engaged)\]$|(failed training|not engaged|reference failed)$", text):
        classes.append("nf")
    elif text.endswith(" better"):
        classes.append("better")
    elif text == "warning":
        classes.append("warn")
    return f' class="{" ".join(classes)}"' if classes else ""


def _table(lines: list[str]) -> str:
    head = _split_row(lines[0])
    align = [c.endswith(":") for c in _split_row(lines[1])]
    out = ["<table>", "<thead><tr>" + "".join(f"<th>{_inline(h)}</th>" for h in head) + "</tr></thead>", "<tbody>"]
    for line in lines[2:]:
        cells = _split_row(line)
        out.append("<tr>" + "".join(
            f"<td{_cell_class(c, align[i] if i < len(align) else False)}>{_inline(c)}</td>"
            for i, c in enumerate(cells)) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def markdown_to_html(md: str) -> str:
    """Our report Markdown (headings, paragraphs, pipe tables, lists) as HTML."""
    out: list[str] = []
    lines = md.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{_inline(line[level:].strip())}</h{level}>")
            i += 1
        elif line.startswith("|"):
            block = []
            while i < len(lines) and lines[i].startswith("|"):
                block.append(lines[i])
                i += 1
            out.append(_table(block))
        elif line.startswith("- "):
            out.append("<ul>")
            while i < len(lines) and lines[i].startswith("- "):
                out.append(f"<li>{_inline(lines[i][2:])}</li>")
                i += 1
            out.append("</ul>")
        else:
            para = []
            while i < len(lines) and lines[i].strip() and not lines[i].startswith(("#", "|", "- ")):
                para.append(lines[i])
                i += 1
            text = " ".join(para)
            cls = ' class="warning"' if text.startswith("**Warning**") else ""
            out.append(f"<p{cls}>{_inline(text)}</p>")
    return "\n".join(out)


# ---------------------------------------------------------------- plots


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:  # pragma: no cover - matplotlib is a dependency
        raise LeaderboardError(f"the HTML report needs matplotlib ({exc}); pip install matplotlib") from exc
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def gain_matrix(board: Leaderboard) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(methods, gains in percentage points, NT mask) for the heatmap: every
    ranked method (not the baseline, a pair's reference or a row that uses
    target labels) that is not the reference of all pairs."""
    methods = []
    for m in board.methods.to_dict("records"):
        if m["reference"] or not m.get("ranked", True):  # the baseline and the references: nothing to show
            continue
        cells = [board.cell(m["method"], p) for p in board.pairs]
        if all(c["nt_reference"] == m["method"] for c in cells):
            continue
        methods.append(m["method"])
    gain = np.full((len(methods), len(board.pairs)), np.nan)
    nt = np.zeros_like(gain, dtype=bool)
    for i, m in enumerate(methods):
        for j, p in enumerate(board.pairs):
            c = board.cell(m, p)
            if c["status"] == "ok" and c["nt_reference"] != m and not _nan(c["gap_mean"]):
                gain[i, j] = 100 * float(c["gap_mean"])
            nt[i, j] = c["nt_flag"] == "negative transfer"
    return methods, gain, nt


def health_marks(board: Leaderboard, methods: Sequence[str]) -> list[list[str]]:
    """Per heatmap cell, the mark of a cell that is not a finding:
    ``failed training``, ``not engaged``, ``reference failed`` or ``""``."""
    out = []
    for m in methods:
        row = []
        for p in board.pairs:
            c = board.cell(m, p)
            flag = str(c.get("nt_flag") or "")
            row.append(flag if flag in ("failed training", "not engaged", "reference failed") else "")
        out.append(row)
    return out


def _tick_label(label: str, width: int = 22) -> str:
    """A pair label on short lines for the heatmap's axis: a line break after
    the arrow and before a variant's brackets, then at spaces (never inside
    a word) so that lines stay within ``width`` characters where words allow."""
    import textwrap

    head, sep, variant = label.partition(" [")
    parts = head.replace("→", "→\n").split("\n") + ([f"[{variant}"] if sep else [])
    lines = []
    for part in parts:
        lines += textwrap.wrap(part, width=width, break_long_words=False, break_on_hyphens=False) or [part]
    return "\n".join(lines)


def _nan(x: Any) -> bool:
    try:
        return x is None or math.isnan(float(x))
    except (TypeError, ValueError):
        return True


def _heatmap(board: Leaderboard) -> str | None:
    fig = heatmap_figure(board)
    if fig is None:
        return None
    out = _png(fig)
    _pyplot().close(fig)
    return out


def heatmap_figure(board: Leaderboard):
    """The gain heatmap as a matplotlib figure (None when there is nothing to show)."""
    methods, gain, nt = gain_matrix(board)
    if not methods or np.isnan(gain).all():
        return None
    plt = _pyplot()
    from matplotlib.patches import Rectangle

    marks = health_marks(board, methods)
    short = {"failed training": "failed\ntraining", "not engaged": "not\nengaged", "reference failed": "ref.\nfailed"}
    lim = max(1.0, float(np.nanmax(np.abs(gain))))
    ticks = [_tick_label(lab) for lab in board.pair_labels]
    lines = max(t.count("\n") + 1 for t in ticks)
    fig, ax = plt.subplots(figsize=(2.2 + 1.45 * len(board.pairs), 1.0 + 0.14 * lines + 0.5 * len(methods)))
    im = ax.imshow(np.ma.masked_invalid(gain), cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto")
    ax.set_xticks(range(len(board.pairs)), ticks, fontsize=7.5)
    track = dict(zip(board.methods["method"], board.methods["track"])) if "track" in board.methods else {}
    labels = [m if track.get(m, "uda") == "uda" else f"{m} [{track[m]}]" for m in methods]
    ax.set_yticks(range(len(methods)), labels, fontsize=9)
    for i in range(len(methods)):
        for j in range(len(board.pairs)):
            if np.isnan(gain[i, j]):
                ax.text(j, i, "—", ha="center", va="center", fontsize=8, color="#666")
                continue
            mark = marks[i][j]
            label = f"{gain[i, j]:+.1f}" + ("\nNT" if nt[i, j] else "") + (f"\n{short[mark]}" if mark else "")
            dark = abs(gain[i, j]) > 0.6 * lim and not mark
            ax.text(j, i, label, ha="center", va="center", fontsize=7 if mark else 8, linespacing=1.0, zorder=4,
                    color="white" if dark else "black", fontweight="bold" if nt[i, j] else "normal")
            if mark:  # not a finding: hatched grey over the colour
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor="#dddddd", alpha=0.85, hatch="///",
                                       edgecolor="#999999", lw=0, zorder=2))
            if nt[i, j]:
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="black", lw=2.5, zorder=3))
    fig.colorbar(im, ax=ax, label="gain over reference (points)")
    ax.set_title("Target-accuracy gain over the pair's reference (NT: significant negative transfer;\n"
                 "hatched: not a finding, training failed or adaptation never engaged)", fontsize=9)
    _widen_until_labels_fit(fig, ax, len(board.pairs))
    return fig


def _widen_until_labels_fit(fig, ax, n_cols: int, gap_px: float = 8.0) -> None:
    """Widen ``fig`` until every column is wider than its widest tick label
    (plus a gap), so neighbouring pair labels never overlap, whatever the
    font's metrics; the y labels and colour bar keep their size."""
    for _ in range(4):
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        need = max(t.get_window_extent(renderer).width for t in ax.get_xticklabels()) + gap_px
        have = ax.get_window_extent(renderer).width / max(n_cols, 1)
        if have >= need:
            return
        w, h = fig.get_size_inches()
        extra = (need - have) * n_cols / fig.dpi
        fig.set_size_inches(w + extra * 1.15, h)


def critical_difference(avg_ranks: Sequence[float], n_datasets: int, alpha: float = 0.05) -> float:
    """Nemenyi critical difference of average ranks (Demšar 2006):
    ``q_alpha sqrt(k (k + 1) / (6 N))``; NaN outside the tabulated k = 2..10."""
    if alpha != 0.05:
        raise ValueError("only alpha = 0.05 is tabulated")
    k = len(avg_ranks)
    q = NEMENYI_Q05.get(k)
    if q is None or n_datasets < 1:
        return math.nan
    return q * math.sqrt(k * (k + 1) / (6.0 * n_datasets))


def _rank_plot(board: Leaderboard, track: str | None = None) -> tuple[str | None, str]:
    """The critical-difference diagram of the largest rank group (of
    ``track`` only, when given: ranks are computed within a track; ranks of
    different groups are not comparable)."""
    methods = board.methods if track is None else board.methods[board.methods["track"] == track]
    ranked = methods[methods["avg_rank"].notna()].sort_values("avg_rank")
    groups = [g for g in board.rank_groups if g.pairs and (track is None or g.track == track)]
    others = ""
    if groups:  # the largest group: ranks of different groups are not comparable
        first = groups[0]
        ranked = ranked[ranked["method"].isin(first.methods)]
        n_pairs = len(first.pairs)
        complete = True
        if len(groups) > 1:
            others = (" Methods applying to other pairs are ranked among themselves (see \"Ranking\"): "
                      + "; ".join(", ".join(g.methods) for g in groups[1:]) + ".")
    else:
        n_pairs = len(board.pairs)
        complete = bool(ranked["complete"].all())
    if ranked.empty:
        return None, ""
    names, ranks = list(ranked["method"]), [float(r) for r in ranked["avg_rank"]]
    cd = critical_difference(ranks, n_pairs) if complete and len(ranks) > 1 else math.nan
    plt = _pyplot()
    k = len(names)
    fig, ax = plt.subplots(figsize=(8, 1.4 + 0.35 * k))
    lo, hi = 1, max(2, k)
    ax.set_xlim(lo - 0.3, hi + 0.3)
    ax.set_ylim(-(k + 1.5), 1.8)
    ax.hlines(0, lo, hi, color="black", lw=1)
    for r in range(lo, hi + 1):
        ax.vlines(r, 0, 0.15, color="black", lw=1)
        ax.text(r, 0.3, str(r), ha="center", va="bottom", fontsize=9)
    for i, (n, r) in enumerate(zip(names, ranks)):
        y = -(i + 1) * 0.9
        left = i < (k + 1) // 2
        x_text = lo - 0.25 if left else hi + 0.25
        ax.plot([r, r, x_text], [0, y, y], color="#333", lw=0.9)
        ax.text(x_text, y, f"{n} ({r:.2f})", ha="right" if left else "left", va="center", fontsize=9)
        ax.plot(r, 0, "o", color="#333", ms=4)
    caption = (f"Average rank over the {n_pairs} pair(s) where every ranked method has a finding (1 = best); "
               f"the baseline and reference rows are not ranked.")
    if track is not None:
        caption = (f"Track {track}: average rank over the {n_pairs} pair(s) where every ranked method of this track "
                   f"has a finding (1 = best); methods of other tracks are ranked apart; reference rows are not "
                   f"ranked.")
    if not math.isnan(cd):
        ax.plot([lo, lo + cd], [1.2, 1.2], color="#b00", lw=2)
        ax.text(lo + cd / 2, 1.35, f"CD = {cd:.2f}", ha="center", va="bottom", fontsize=9, color="#b00")
        # cliques: maximal runs of methods whose ranks lie within CD of each other
        cliques = []
        for i in range(k):
            j = max(j for j in range(i, k) if ranks[j] - ranks[i] <= cd + 1e-12)
            if j > i and not any(a <= i and j <= b for a, b in cliques):
                cliques.append((i, j))
        for c, (i, j) in enumerate(cliques):
            y = -0.25 - 0.18 * c
            ax.plot([ranks[i] - 0.05, ranks[j] + 0.05], [y, y], color="#1f5fa8", lw=3)
        caption += (f" Critical difference (Nemenyi, alpha = 0.05, Demšar 2006) over {n_pairs} pairs: "
                    f"CD = {cd:.2f}; methods joined by a blue bar are not significantly different.")
    else:
        caption += (" No critical difference is drawn: it needs 2-10 methods ranked over the same pairs"
                    if not complete or k > 10 or k < 2 else "")
    ax.axis("off")
    out = _png(fig)
    plt.close(fig)
    return out, caption + others


# ---------------------------------------------------------------- page


def to_html(board: Leaderboard) -> str:
    """The whole report as one HTML page (no network needed to view it)."""
    body = markdown_to_html(to_markdown(board))
    title = f"Leaderboard: {board.suite}" if board.suite else "Leaderboard"
    figures = []
    _pyplot()
    import matplotlib

    # names are plain text: a '$' in a method name must not start math text
    with matplotlib.rc_context({"text.parse_math": False}):
        heat = _heatmap(board)
        tracks = [t for t in dict.fromkeys(board.methods["track"])] if "track" in board.methods else ["uda"]
        rank_plots = [(track, *_rank_plot(board, track if len(tracks) > 1 else None)) for track in tracks]
    if heat:
        figures.append(
            f'<figure id="gain-heatmap"><img alt="gain over reference heatmap" src="data:image/png;base64,{heat}">'
            f"<figcaption>Gain of each method over the pair's reference in percentage points (mean of per-seed "
            f"differences); outlined <strong>NT</strong> cells are significant negative transfer (one-sided paired "
            f"t-test per cell, see the negative-transfer section for each cell's minimum detectable effect); "
            f"hatched cells are not findings (training failed, adaptation never engaged, or the reference "
            f"failed).</figcaption></figure>"
        )
    for track, ranks, caption in rank_plots:
        if ranks:
            fid = "rank-plot" if len(tracks) == 1 else f"rank-plot-{track}"
            figures.append(
                f'<figure id="{fid}"><img alt="average rank diagram" src="data:image/png;base64,{ranks}">'
                f"<figcaption>{html.escape(caption)}</figcaption></figure>"
            )
    plots = ("<h2>Plots</h2>\n" + "\n".join(figures)) if figures else ""
    # the plots go right after the main table (before the first "##" section)
    split = body.find("<h2>")
    page_body = body[:split] + plots + "\n" + body[split:] if split >= 0 else body + plots
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f"{page_body}\n<p><small>Generated by dabench from the run store; self-contained (no network needed)."
        "</small></p>\n</body>\n</html>\n"
    )
