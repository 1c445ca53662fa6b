"""Tracks: uda, source-free and test-time, enforced by the contract, the host
and the conformance kit, and kept apart in the leaderboard's ranks."""

from __future__ import annotations

import copy
import pickle
import re

import numpy as np
import pytest

from conftest import make_task, write
from dabench import ContractError, Method
from dabench.contract import validate_method_class
from dabench.leaderboard import compute_leaderboard, to_markdown
from dabench.plugins import get_registry
from dabench.runner import Runner
from dabench.store import RunStore, canonical_json
from dabench.suite import parse_suite
from dabench.testing import run_checks
from dabench.tracks import TrackViolation, Withheld, run_stream, stream_order, task_for_track

# ---------------------------------------------------------------- the contract


def _method(**attrs):
    base = dict(name="m", hyperparameters={}, fit=lambda self, task: None)
    base.update(attrs)
    return type("M", (Method,), base)


def test_a_track_method_must_start_from_the_source_model_and_declare_contract_1_2():
    validate_method_class(_method(track="source-free", requires=frozenset({"source_model"}), requires_contract="1.3"))
    with pytest.raises(ContractError, match="add \"source_model\" to its requires"):
        validate_method_class(_method(track="test-time", requires_contract="1.3"))
    with pytest.raises(ContractError, match="requires_contract = \"1.3\""):
        validate_method_class(_method(track="source-free", requires=frozenset({"source_model"}),
                                      requires_contract="1.1"))
    with pytest.raises(ContractError, match="known tracks"):
        validate_method_class(_method(track="online", requires=frozenset({"source_model"}), requires_contract="1.3"))


def test_the_source_free_view_holds_no_source_data(registry):
    task, split = make_task(registry, steps=20, source_lr=0.05, k_target=2)
    view, log = task_for_track(task, "source-free")
    assert view.track == "source-free" and view.target_labeled is None and view.source_model is task.source_model
    assert np.array_equal(view.target_train.X, task.target_train.X)
    with pytest.raises(TrackViolation, match="source-free track withholds task.source_train"):
        view.source_train.X
    for use in (len, bool, iter, np.asarray, lambda w: w[0], lambda w: w.y):
        with pytest.raises(TrackViolation):
            use(view.source_val)
    assert len(log) == 7 and log[0] == "task.source_train.X"
    assert "withheld" in repr(view)  # a task still prints
    for clone in (copy.deepcopy(view.source_train), pickle.loads(pickle.dumps(view.source_train))):
        assert isinstance(clone, Withheld)


def test_the_test_time_view_holds_neither_source_data_nor_target_train(registry):
    task, _ = make_task(registry, steps=20, source_lr=0.05)
    view, log = task_for_track(task, "test-time")
    with pytest.raises(TrackViolation, match="test-time track withholds task.target_train"):
        view.target_train.X
    with pytest.raises(TrackViolation):
        view.source_train.y
    assert task_for_track(task, "uda")[0] is task


def test_the_stream_is_seeded_batched_and_each_point_delivered_once():
    seen = []

    class Recorder:
        def predict_batch(self, X):
            assert not X.flags.writeable
            seen.append(X.copy())
            return np.tile([0.25, 0.75], (len(X), 1))

    X = np.arange(70, dtype=np.float32).reshape(35, 2)
    proba, order = run_stream(Recorder(), X, seed=3, batch_size=8, n_classes=2)
    assert [len(b) for b in seen] == [8, 8, 8, 8, 3]
    assert np.array_equal(np.concatenate(seen), X[order])
    assert np.array_equal(order, stream_order(35, 3)) and not np.array_equal(order, stream_order(35, 4))
    assert sorted(order) == list(range(35)) and proba.shape == (35, 2)


# ---------------------------------------------------------------- the host enforces it

CHEATERS = '''
import sys

import numpy as np
from dabench import Method, hookimpl
from dabench.training import TorchPredictor


class Cheater(Method):
    """Source-free, but peeks at the source labels."""
    name = "cheat-sf"
    track = "source-free"
    requires = frozenset({"source_model"})
    requires_contract = "1.3"
    hyperparameters = {}

    def fit(self, task):
        counts = np.bincount(task.source_train.y)
        return task.source_model.predictor(task.device)


class Sneaky(Cheater):
    """Catches the error and carries on."""
    name = "sneaky-sf"

    def fit(self, task):
        try:
            len(task.source_val)
        except Exception:
            pass
        return task.source_model.predictor(task.device)


class Constant:
    def __init__(self, k, c, width=None):
        self.k, self.c, self.width = k, c, width or k
    def predict_batch(self, X):
        p = np.zeros((len(X), self.width))
        p[:, self.c] = 1.0
        return p


class Zero(Method):
    """Test-time: always class 0."""
    name = "tt-zero"
    track = "test-time"
    requires = frozenset({"source_model"})
    requires_contract = "1.3"
    hyperparameters = {}

    def fit(self, task):
        return Constant(task.n_classes, 0)


class BadShape(Zero):
    name = "tt-bad-shape"

    def fit(self, task):
        return Constant(task.n_classes, 0, width=task.n_classes + 1)


class TrainPeek(Zero):
    """Test-time, but precomputes from the target train split."""
    name = "tt-train-peek"

    def fit(self, task):
        task.target_train.X.mean(0)
        return Constant(task.n_classes, 0)


class Future(Zero):
    """Test-time, but reads the whole stream from the host's frame: non-causal."""
    name = "tt-future"

    def fit(self, task):
        k = task.n_classes

        class Peek:
            def predict_batch(self, X):
                f = sys._getframe(1)
                while "X" not in f.f_locals or "order" not in f.f_locals:
                    f = f.f_back
                everything = np.asarray(f.f_locals["X"], dtype=np.float64)
                p = np.full((len(X), k), 1.0)
                p[:, 0] += 0.5 + 0.4 * np.sin(everything.sum())  # depends on batches not yet delivered
                return p / p.sum(1, keepdims=True)
        return Peek()


@hookimpl
def dabench_methods(register):
    for m in (Cheater, Sneaky, Zero, BadShape, TrainPeek, Future):
        register(m)
'''

SUITE = """
name = "tracks"
seeds = 2
backbone = "{backbone}"
pairs = ["moons:moons-rot35"]

[protocol]
max_source = 300
max_target = 300

[budget]
steps = 30
batch_size = 32

[source_model]
lr = 0.05

{methods}
"""


def _sweep(tmp_path, methods, backbone="default", pdir=None):
    reg = get_registry(plugins_dir=pdir)
    path = write(tmp_path / "s.toml", SUITE.format(backbone=backbone, methods="\n".join(f"[methods.{m}]" for m in methods)))
    suite = parse_suite(path, reg)
    store = RunStore(tmp_path / "res")
    summary = Runner(reg, store, device="cpu").run(suite)
    rows = store.rows()
    store.close()
    return summary, {(r["method"], r["seed"]): r for r in rows}, suite, reg


@pytest.fixture(scope="module")
def cheaters(tmp_path_factory):
    d = tmp_path_factory.mktemp("cheaters")
    write(d / "cheaters.py", CHEATERS)
    return d


def test_a_source_free_method_reaching_for_source_data_fails_its_run(tmp_path, cheaters):
    summary, rows, _, _ = _sweep(tmp_path, ["source-only", "cheat-sf", "sneaky-sf"], pdir=cheaters)
    assert summary.failed == 4 and summary.ok == 2
    for seed in (0, 1):
        r = rows[("cheat-sf", seed)]
        assert r["status"] == "failed" and r["track"] == "source-free"
        assert "source-free track withholds task.source_train" in r["reason"]
        s = rows[("sneaky-sf", seed)]
        assert s["status"] == "failed"
        assert "reached for data the source-free track withholds (task.source_val (len)) and went on" in s["reason"]
        assert rows[("source-only", seed)]["track"] == "uda"


def test_the_host_scores_what_a_test_time_adapter_returned(tmp_path, cheaters):
    summary, rows, suite, reg = _sweep(tmp_path, ["tt-zero", "tt-bad-shape", "tt-train-peek"], pdir=cheaters)
    runner = Runner(reg, None)
    for seed in (0, 1):
        split = runner.split(next(s for s in suite.expand(reg) if s.seed == seed))
        r = rows[("tt-zero", seed)]
        assert r["status"] == "ok" and r["track"] == "test-time"
        assert r["target_acc"] == pytest.approx(float((split.target_test.y == 0).mean()))
        assert r["source_acc"] is None  # the adapter has no predict_proba: no forgetting figure
        assert r["x_prior_pred_0"] == pytest.approx(1.0)
        assert r["val_entropy"] == pytest.approx(0.0, abs=1e-9) and r["val_source-val"] is None
        assert "expected (16, 2)" in rows[("tt-bad-shape", seed)]["reason"] or "expected" in rows[("tt-bad-shape", seed)]["reason"]
        assert "test-time track withholds task.target_train" in rows[("tt-train-peek", seed)]["reason"]
    keys = {s.key for s in suite.expand(reg)}
    assert len(keys) == 6


def test_the_kit_catches_track_violations(cheaters):
    reg = get_registry(plugins_dir=cheaters)
    res = {r.check: r for r in run_checks(reg.methods["cheat-sf"], checks=["check_track"])}
    assert res["check_track"].status == "FAIL" and "task.source_train.y" in res["check_track"].message
    res = {r.check: r for r in run_checks(reg.methods["sneaky-sf"], checks=["check_track"])}
    assert res["check_track"].status == "FAIL" and "source_val" in res["check_track"].message
    res = {r.check: r for r in run_checks(reg.methods["tt-train-peek"], checks=["check_track"])}
    assert res["check_track"].status == "FAIL" and "task.target_train.X" in res["check_track"].message
    res = {r.check: r for r in run_checks(reg.methods["tt-future"], checks=["check_track"])}
    assert res["check_track"].status == "FAIL" and "first half of the test stream changed" in res["check_track"].message
    ok = run_checks(reg.methods["tt-zero"], checks=["check_track", "check_fit_predict", "check_determinism",
                                                    "check_no_target_labels"])
    assert all(r.status == "PASS" for r in ok), ok


# ---------------------------------------------------------------- the built-in methods on a sweep


def test_a_sweep_runs_every_track_from_one_source_model_per_pair_and_seed(tmp_path):
    methods = ["source-only", "shot", "adabn", "tent", "bn-adapt"]
    summary, rows, _, _ = _sweep(tmp_path, methods, backbone="mlp-bn")
    assert summary.ok == 10, [(k, r["reason"]) for k, r in rows.items() if r["status"] != "ok"]
    assert len(summary.source_models_trained) == 2  # one per (pair, seed, backbone), whatever the track
    assert {rows[(m, 0)]["track"] for m in methods} == {"uda", "source-free", "test-time"}
    for m in ("tent", "bn-adapt"):
        assert rows[(m, 0)]["x_diag_engaged"] == 1.0 and rows[(m, 0)]["source_acc"] is not None
    assert rows[("shot", 0)]["val_source-val"] is None and rows[("shot", 0)]["val_entropy"] is not None
    # a rerun trains nothing
    summary2, _, _, _ = _sweep(tmp_path, methods, backbone="mlp-bn")
    assert summary2.ran == 0


def test_normalisation_methods_skip_a_backbone_without_normalisation(tmp_path):
    summary, rows, _, _ = _sweep(tmp_path, ["source-only", "tent", "bn-adapt", "adabn"])
    for m in ("tent", "bn-adapt", "adabn"):
        r = rows[(m, 0)]
        assert r["status"] == "skipped" and "has none: use a -bn backbone" in r["reason"]


# ---------------------------------------------------------------- the leaderboard


def _row(method, seed, acc, track="uda", pair="p:q", source_acc=0.9):
    return {"key": f"{method}-{pair}-{seed}", "suite": "s", "pair": pair, "method": method, "point": 0, "seed": seed,
            "status": "ok", "params": "{}", "family": "x", "reference": 0, "track": track,
            "protocol": canonical_json({"k_target": 0}), "budget": "{}", "backbone": "b",
            "target_acc": acc, "source_acc": source_acc}


def test_the_leaderboard_ranks_within_a_track_and_keeps_the_verdict_for_every_track():
    rows = []
    for seed, noise in enumerate((0.0, 0.01, -0.01, 0.005)):
        for pair, shift in (("p:q", 0.0), ("r:s", 0.05)):
            rows += [_row("source-only", seed, 0.60 + shift + noise, pair=pair),
                     _row("dann", seed, 0.70 + shift + noise, pair=pair),
                     _row("shot", seed, 0.80 + shift + noise, "source-free", pair=pair),
                     _row("adabn", seed, 0.65 + shift + noise, "source-free", pair=pair),
                     _row("tent", seed, 0.50 + shift + noise * 2, "test-time", pair=pair)]
    board = compute_leaderboard(rows)
    m = board.methods.set_index("method")
    assert list(board.methods["method"]) == ["dann", "source-only", "shot", "adabn", "tent"]
    assert m.loc["shot", "avg_rank"] == 1.0 and m.loc["adabn", "avg_rank"] == 2.0  # not 1 and 3 across tracks
    assert m.loc["tent", "avg_rank"] == 1.0 and m.loc["dann", "avg_rank"] == 1.0
    assert board.cell("shot", "p:q")["nt_flag"] == "better" and board.cell("tent", "p:q")["nt_flag"] == "negative transfer"
    assert board.cell("tent", "p:q")["nt_reference"] == "source-only"
    md = to_markdown(board)
    assert "| Method                 | Track" in md and "Ranks are within a track" in md
    assert "| shot                   | source-free" in md and "uda (reference of all)" in md
    nt = md.split("## Negative transfer")[1]
    assert re.search(r"\| tent +\| test-time +\| -9\.9 \(p<0\.001, MDE [0-9.]+\) \*\*negative transfer\*\*", nt)


def test_a_store_from_before_tracks_reads_as_uda(tmp_path):
    import sqlite3

    from dabench.store import STORE_NAME

    RunStore(tmp_path).close()
    con = sqlite3.connect(tmp_path / STORE_NAME)
    con.execute("ALTER TABLE runs DROP COLUMN track")
    con.commit()
    con.close()
    with RunStore(tmp_path) as st:  # opening adds the column back
        cols = {r[1] for r in st._con.execute("PRAGMA table_info(runs)")}
    assert "track" in cols
    board = compute_leaderboard([{k: v for k, v in _row("dann", s, 0.7).items() if k != "track"} for s in (0, 1)])
    assert list(board.methods["track"]) == ["uda"] and "Track: every method ran under `uda`" in to_markdown(board)


STREAMED_SUITE = """
name = "imgs"
seeds = 1
backbone = "small-cnn-bn"
pairs = ["src:tgt"]

[budget]
steps = 10
batch_size = 8

[domains.src]
path = "src"
format = "imagefolder"
label_space = "animals"
size = [16, 16]

[domains.tgt]
path = "tgt"
format = "imagefolder"
label_space = "animals"
size = [16, 16]

[methods.source-only]
[methods.shot]
[methods.adabn]
[methods.tent]
[methods.bn-adapt]
"""


def test_every_track_runs_on_streamed_image_folders(tmp_path, monkeypatch):
    from conftest import write_image_folder
    from dabench.data.stream import WORKERS_VAR

    monkeypatch.setenv(WORKERS_VAR, "0")  # decode in the test's process: the same batches, no worker start-up
    write_image_folder(tmp_path / "src", per_class=8, seed=0)
    write_image_folder(tmp_path / "tgt", per_class=8, seed=1, shift=1.0)
    reg = get_registry()
    suite = parse_suite(write(tmp_path / "s.toml", STREAMED_SUITE), reg)
    with RunStore(tmp_path / "res") as store:
        summary = Runner(reg, store, device="cpu").run(suite)
        rows = {r["method"]: r for r in store.rows()}
    assert summary.ok == 5, {m: r["reason"] for m, r in rows.items()}
    assert rows["tent"]["track"] == "test-time" and rows["tent"]["source_acc"] is not None
    assert rows["bn-adapt"]["val_entropy"] is not None  # validators scored the streamed predictions
    assert rows["shot"]["x_diag_engaged"] is not None and rows["adabn"]["x_diag_n_norm_layers"] == 3.0
