"""The self-contained HTML leaderboard, checked in a real headless Chromium."""

from __future__ import annotations

import math
import re
import shutil
import subprocess

import numpy as np
import pytest

from conftest import run_cli
from test_leaderboard import _nt_rows

from dabench.leaderboard import compute_leaderboard, to_markdown, write_reports
from dabench.report_html import critical_difference, gain_matrix, markdown_to_html, to_html
from dabench.store import RunStore


@pytest.fixture(scope="module")
def board():
    rows, _ = _nt_rows()
    return compute_leaderboard(rows)


@pytest.fixture(scope="module")
def page(board):
    return to_html(board)


def test_page_is_self_contained_with_tables_and_plots(board, page):
    assert page.startswith("<!DOCTYPE html>")
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)  # nothing fetched from a network
    assert "<script" not in page and "<link" not in page
    # every Markdown table is an HTML table
    n_md_tables = sum(1 for line in to_markdown(board).splitlines() if re.match(r"\| -+", line))
    assert page.count("<table>") == n_md_tables >= 5
    imgs = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(imgs) == 2 and 'id="gain-heatmap"' in page and 'id="rank-plot"' in page
    import base64

    assert all(base64.b64decode(i).startswith(b"\x89PNG") for i in imgs)
    # the negative-transfer cells are marked
    assert '<td class="nt">' in page and "<strong>negative transfer</strong>" in page


def test_heatmap_data_marks_negative_transfer(board):
    methods, gain, nt = gain_matrix(board)
    assert methods == ["aligner"]  # source-only is every pair's reference: nothing to show
    j = list(board.pairs).index("moons:moons-rot35")
    assert nt[0, j] and gain[0, j] == pytest.approx(100 * board.cell("aligner", "moons:moons-rot35")["gap_mean"])
    assert nt.sum() == 1


def test_critical_difference_known_value():
    # Demsar 2006: q_0.05 = 2.343 for k = 3; N = 6 data sets
    assert critical_difference([1.0, 2.0, 3.0], 6) == pytest.approx(2.343 * math.sqrt(3 * 4 / 36))
    assert math.isnan(critical_difference([1.0] * 11, 6))


def test_markdown_subset_to_html_escapes():
    out = markdown_to_html("# T <x>\n\nA `a|b` and **b**.\n\n| h | n |\n| - | -: |\n| <i> | 1.0 |\n\n- item\n")
    assert "<h1>T &lt;x&gt;</h1>" in out and "<code>a|b</code>" in out and "<strong>b</strong>" in out
    assert "<td>&lt;i&gt;</td>" in out and '<td class="num">1.0</td>' in out and "<li>item</li>" in out


def test_cli_and_write_reports_html(tmp_path):
    rows, _ = _nt_rows()
    with RunStore(tmp_path / "res") as st:
        for r in rows:
            rec = {k: v for k, v in r.items() if not k.startswith(("val_", "x_"))}
            st.write(rec, {"source-val": r["val_source-val"]})
    paths = write_reports(tmp_path / "res", tmp_path / "out", formats=("md", "html"))
    assert paths["html"].read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    r = run_cli("leaderboard", str(tmp_path / "res"), "--format", "html", "--out", str(tmp_path / "p.html"))
    assert r.returncode == 0, r.stderr
    assert "<table>" in (tmp_path / "p.html").read_text(encoding="utf-8")
    r = run_cli("leaderboard", str(tmp_path / "res"), "--format", "json")
    assert r.returncode == 0 and '"negative_transfer_test"' in r.stdout


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="Debian's `chromium` is not installed (apt-get install -y chromium); "
                                                "the headless-browser check of the HTML report needs it")
def test_page_in_headless_chromium(page, tmp_path):
    html_file = tmp_path / "leaderboard.html"
    html_file.write_text(page, encoding="utf-8")
    flags = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}"]
    url = html_file.as_uri()
    dom = subprocess.run(flags + ["--dump-dom", url], capture_output=True, text=True, timeout=240)
    assert dom.returncode == 0, dom.stderr[-2000:]
    # the browser parsed the page: its tables and plots are in the DOM
    assert dom.stdout.count("<table>") == page.count("<table>")
    assert "Negative transfer</h2>" in dom.stdout and 'id="rank-plot"' in dom.stdout
    shot = tmp_path / "shot.png"
    res = subprocess.run(flags + [f"--screenshot={shot}", "--window-size=1400,2000", url],
                         capture_output=True, text=True, timeout=240)
    assert res.returncode == 0 and shot.exists(), res.stderr[-2000:]
    from PIL import Image

    img = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float64)
    assert img.shape[:2] == (2000, 1400)
    # not blank: text, table borders and plot colours
    assert img.std() > 10 and len(np.unique(img.reshape(-1, 3), axis=0)) > 50
    assert (img.min(axis=2) < 60).mean() > 0.005  # dark text pixels are present


def _quick_like_board():
    """A board with the quick suite's seven column labels (long names, protocol variants) and
    13 methods, one cell never engaged and one training failed."""
    from dabench.store import canonical_json

    shared = canonical_json({"k_target": 0, "feature_space": "shared"})
    native = canonical_json({"k_target": 3, "feature_space": "native"})
    pairs = [("condshift-source:condshift-target", shared), ("covshift-source:covshift-target", shared),
             ("digits:mnist", native), ("digits:mnist", shared), ("labelshift-source:labelshift-target", shared),
             ("mnist:mnistm", shared), ("moons:moons-rot35", shared)]
    methods = ["dann", "cdan", "cbst", "self-ensembling", "can", "iw-discriminative", "iw-kliep", "fine-tuning",
               "frozen-features", "a-method-with-a-long-name"]
    rows = []
    rng = np.random.default_rng(0)
    for (pair, proto) in pairs:
        is_native = proto == native
        ms = (["target-only-k", "stn", "gw-hda"] if is_native else ["source-only", *methods])
        for seed in range(3):
            for m in ms + ["target-oracle"]:
                r = {"key": f"{pair}{proto}{m}{seed}", "suite": "quick", "pair": pair, "method": m, "params": "{}",
                     "point": 0, "seed": seed, "status": "ok", "protocol": proto, "budget": "{}",
                     "reference": int(m == "target-oracle"), "target_acc": float(rng.uniform(0.2, 0.95)),
                     "source_acc": None if is_native else 0.95, "x_source_chance": 0.5, "x_source_n": 400.0}
                if m == "self-ensembling" and pair == "mnist:mnistm":
                    r["x_diag_mask_rate"] = 0.0
                if m == "can" and pair == "moons:moons-rot35" and seed == 1:
                    r["source_acc"] = 0.5
                rows.append(r)
    return compute_leaderboard(rows)


def test_heatmap_labels_do_not_overlap():
    """Part of issue 11: the tick labels of the gain heatmap (long pair names, protocol variants)
    and the text in its cells stay apart when drawn."""
    from dabench.report_html import heatmap_figure, health_marks

    b = _quick_like_board()
    fig = heatmap_figure(b)
    fig.canvas.draw()
    ax = fig.axes[0]
    r = fig.canvas.get_renderer()
    ticks = [t.get_window_extent(r) for t in ax.get_xticklabels()]
    assert len(ticks) == 7
    for i in range(len(ticks) - 1):  # neighbouring labels leave a gap
        assert ticks[i].x1 < ticks[i + 1].x0, (i, ticks[i], ticks[i + 1])
    ylabels = [t.get_window_extent(r) for t in ax.get_yticklabels()]
    for i in range(len(ylabels) - 1):
        assert not ylabels[i].overlaps(ylabels[i + 1])
    # every cell's text stays inside its cell
    cells = [t for t in ax.texts]
    cell_w = (ax.get_window_extent(r).width) / 7
    cell_h = (ax.get_window_extent(r).height) / len(ylabels)
    for t in cells:
        bb = t.get_window_extent(r)
        assert bb.width < cell_w and bb.height < cell_h, t.get_text()
    methods = [t.get_text() for t in ax.get_yticklabels()]
    assert "source-only" not in methods and "target-only-k" not in methods and "target-oracle" not in methods
    marks = health_marks(b, methods)
    assert marks[methods.index("self-ensembling")][5] == "not engaged"
    assert marks[methods.index("can")][6] == "failed training"
    import matplotlib.pyplot as plt

    plt.close(fig)
