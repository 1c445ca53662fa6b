"""The host's shared source model: trained once per (pair, seed, backbone,
recipe), cached with a checksum, handed as a fresh copy to methods that start
from it; source-only is that model evaluated."""

from __future__ import annotations

import multiprocessing as mp
import sqlite3

import numpy as np
import pytest
import torch

from conftest import make_task, run_cli, write
from dabench.source_model import (SourceRecipe, attach_source_model, cache_identity, cache_key,
                                  with_source_model)
from dabench.suite import parse_suite

SUITE = """
name = "sm"
seeds = 2
pairs = ["moons:moons-rot35"]

[budget]
steps = 40
batch_size = 32

[source_model]
lr = 0.05

[methods.source-only]
{more}
"""


def _ident(task, **over):
    kw = dict(pair="p", protocol={}, fingerprints=None, seed=task.seed, backbone="default",
              shape=task.source_shape, n_classes=task.n_classes,
              recipe=SourceRecipe().resolved(30, 32), device="cpu")
    kw.update(over)
    return cache_identity(**kw)


def test_build_gives_fresh_copies_with_the_trained_weights(registry):
    task, split = make_task(registry, steps=30, source_lr=0.05)
    sm = task.source_model
    enc, clf = sm.build("cpu")
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(1.0)
    enc2, _ = sm.build("cpu")
    assert not all(torch.equal(a, b) for a, b in zip(enc.parameters(), enc2.parameters()))
    a = registry.methods["source-only"]().fit(task).predict_proba(split.target_test.X)
    b = registry.methods["source-only"]().fit(task).predict_proba(split.target_test.X)
    assert np.array_equal(a, b)
    assert sm.source_val_acc is not None and sm.source_val_acc > 0.8


def test_building_does_not_move_the_callers_rng(registry):
    task, _ = make_task(registry, steps=10, source_lr=0.05)
    torch.manual_seed(3)
    task.source_model.build("cpu")
    after = torch.rand(1)
    torch.manual_seed(3)
    assert torch.equal(after, torch.rand(1))


def test_cache_reuses_and_rebuilds_a_corrupt_entry(registry, tmp_path, caplog):
    task, _ = make_task(registry, steps=30)
    rec = SourceRecipe().resolved(30, 32)
    ident = _ident(task)
    t1, i1 = attach_source_model(task, recipe=rec, identity=ident, cache_dir=tmp_path)
    t2, i2 = attach_source_model(task, recipe=rec, identity=ident, cache_dir=tmp_path)
    assert i1.trained and not i2.trained and i1.key == i2.key == cache_key(ident)
    w1 = t1.source_model.build("cpu")[1].weight
    assert torch.equal(w1, t2.source_model.build("cpu")[1].weight)
    pt = tmp_path / f"{i1.key}.pt"
    pt.write_bytes(pt.read_bytes()[:100])  # truncated
    t3, i3 = attach_source_model(task, recipe=rec, identity=ident, cache_dir=tmp_path)
    assert i3.trained and "damaged" in caplog.text
    assert torch.equal(w1, t3.source_model.build("cpu")[1].weight)  # deterministic retraining
    # another recipe or seed is another model
    _, i4 = attach_source_model(task, recipe=rec, identity=_ident(task, seed=5), cache_dir=tmp_path)
    assert i4.trained and i4.key != i1.key


def _attach_in_child(args):
    cache, steps = args
    from conftest import make_task as mk
    from dabench.plugins import get_registry

    task, _ = mk(get_registry(), steps=steps)
    rec = SourceRecipe().resolved(steps, 32)
    return attach_source_model(task, recipe=rec, identity=_ident(task, recipe=rec), cache_dir=cache)[1].trained


def test_concurrent_workers_train_one_model(tmp_path):
    ctx = mp.get_context("spawn")
    with ctx.Pool(3) as pool:
        trained = pool.map(_attach_in_child, [(str(tmp_path), 300)] * 3)
    assert sorted(trained) == [False, False, True]
    assert len(list(tmp_path.glob("*.pt"))) == 1 and not list(tmp_path.glob("*.tmp"))


def test_recipe_enters_the_key_of_source_model_methods_only(registry, tmp_path):
    p1 = write(tmp_path / "a.toml", SUITE.format(more="[methods.dann]"))
    p2 = write(tmp_path / "b.toml", SUITE.format(more="[methods.dann]").replace("lr = 0.05", "lr = 0.02"))
    k1 = {(s.method, s.seed): s.key for s in parse_suite(p1, registry).expand(registry)}
    k2 = {(s.method, s.seed): s.key for s in parse_suite(p2, registry).expand(registry)}
    assert k1[("source-only", 0)] != k2[("source-only", 0)]
    assert k1[("dann", 0)] == k2[("dann", 0)]


PROBE = """
from dabench import Int, Method, hookimpl

class Probe(Method):
    name = "sm-probe"
    requires = frozenset({"source_model"})
    requires_contract = "1.1"
    hyperparameters = {"k": Int(1, 1, 9)}

    def fit(self, task):
        return task.source_model.predictor(task.device)

@hookimpl
def dabench_methods(register):
    register(Probe)
"""


def test_sweep_trains_each_source_model_once_and_a_rerun_none(tmp_path):
    res = tmp_path / "res"
    plugins = tmp_path / "plugins"
    write(plugins / "probe.py", PROBE)
    p = write(tmp_path / "s.toml", SUITE.format(more="[methods.sm-probe]\nparams = { k = 2 }"))
    # (cache entries are per CPU thread count, which changes CPU results in the last bits)
    r = run_cli("run", str(p), "--results", str(res), "--plugins-dir", str(plugins), "--threads", "1")
    assert r.returncode == 0, r.stderr
    assert "shared source models: 2 trained, 0 reused" in r.stderr
    with sqlite3.connect(res / "runs.sqlite") as con:
        assert con.execute("SELECT COUNT(*) FROM source_models").fetchone()[0] == 2
        used = con.execute("SELECT COUNT(DISTINCT text) FROM extras WHERE name = 'source_model'").fetchone()[0]
    assert used == 2
    # a new method on the same pairs and seeds reuses the cached models
    p2 = write(tmp_path / "s.toml", SUITE.format(more="[methods.sm-probe]\nparams = { k = 3 }"))
    r = run_cli("run", str(p2), "--results", str(res), "--plugins-dir", str(plugins), "--jobs", "2",
                "--threads", "1")
    assert r.returncode == 0, r.stderr
    assert "shared source models: 0 trained, 2 reused" in r.stderr
    with sqlite3.connect(res / "runs.sqlite") as con:
        assert con.execute("SELECT COUNT(*) FROM source_models").fetchone()[0] == 2


def test_source_only_equals_the_source_model(registry):
    task, split = make_task(registry, steps=30, source_lr=0.05)
    p = registry.methods["source-only"]().fit(task).predict_proba(split.target_test.X)
    q = task.source_model.predictor("cpu").predict_proba(split.target_test.X)
    assert np.array_equal(p, q)


def test_with_source_model_is_seeded(registry):
    task, _ = make_task(registry, steps=20)
    a = with_source_model(task).source_model.build("cpu")[1].weight
    b = with_source_model(task).source_model.build("cpu")[1].weight
    assert torch.equal(a, b)


@pytest.mark.parametrize("bad, key", [("lr = -1.0", "source_model.lr"), ("steps = 0", "source_model.steps"),
                                      ("momentum = 0.5", "source_model.momentum")])
def test_malformed_source_model_table(registry, tmp_path, bad, key):
    from dabench.suite import SuiteError

    p = write(tmp_path / "s.toml", SUITE.format(more="").replace("lr = 0.05", bad))
    with pytest.raises(SuiteError) as ei:
        parse_suite(p, registry)
    assert ei.value.key == key
