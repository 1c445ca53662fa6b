"""Streamed image domains: lazily decoded image files behind the same
TensorBatches / TorchPredictor interface as in-memory arrays, the split
protocol on indices, per-batch augmentation, and the published recipe's
backbone learning-rate multiplier."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch

from conftest import write, write_image_folder
from dabench.contract import Budget
from dabench.data.core import DataError, DomainSpec, Protocol, make_split
from dabench.data.stream import ImageStream, random_resized_crop_box
from dabench.suite import SuiteError, parse_suite
from dabench.training import TensorBatches, TorchPredictor, backbone_param_groups, make_sgd, set_lr

PAIR_SUITE = """
name = "imgs"
seeds = 1
pairs = ["src:tgt"]
{protocol}
[budget]
steps = {steps}
batch_size = 8

[domains.src]
path = "src"
format = "imagefolder"
label_space = "animals"
size = [16, 16]
{src_extra}

[domains.tgt]
path = "tgt"
format = "imagefolder"
label_space = "animals"
size = [16, 16]

[methods.source-only]
{methods}
"""


def _folders(tmp_path, per_class=10, **kw):
    write_image_folder(tmp_path / "src", per_class=per_class, seed=0, **kw)
    write_image_folder(tmp_path / "tgt", per_class=per_class, seed=1, shift=1.0)


def _suite(tmp_path, protocol="", steps=20, src_extra="", methods=""):
    return write(tmp_path / "s.toml", PAIR_SUITE.format(protocol=protocol, steps=steps, src_extra=src_extra,
                                                         methods=methods))


def _split(registry, suite, seed=0):
    (pair,) = suite.pairs
    s, t = pair.domain(pair.source, registry), pair.domain(pair.target, registry)
    return make_split(pair.name, s, t, s.load(None), t.load(None), seed, pair.protocol)


def _in_memory_twin(spec: DomainSpec) -> DomainSpec:
    """The same images, decoded once with the test transform, as an in-memory domain."""
    X, y = spec.load(None)
    arrays = (X.materialize().reshape(len(X), *spec.shape), y)
    return dataclasses.replace(spec, load=lambda root=None: arrays, streamed=False, fingerprint=None)


# ----------------------------------------------------------------- the stream object


def test_stream_is_indexed_like_an_array_and_never_converted_silently(registry, tmp_path):
    _folders(tmp_path)
    s = parse_suite(_suite(tmp_path), registry)
    X, y = s.pairs[0].domain("src", registry).load(None)
    assert isinstance(X, ImageStream) and len(X) == 30 and X.shape == (30, 3 * 16 * 16) and X.item_shape == (3, 16, 16)
    assert y.tolist() == [0] * 10 + [1] * 10 + [2] * 10  # classes are the sorted folder names
    sub = X[np.array([3, 15, 29])]
    assert isinstance(sub, ImageStream) and [os.path.basename(p) for p in sub.paths] == ["003.jpg", "005.jpg", "009.jpg"]
    assert len(X[5:9]) == 4 and len(X[y == 1]) == 10 and len(X[torch.tensor([0, 1])]) == 2
    row = X[3]
    assert row.shape == (3 * 16 * 16,) and row.dtype == np.float32 and 0.0 <= row.min() and row.max() <= 1.0
    np.testing.assert_array_equal(row, X.materialize()[3])
    with pytest.raises(TypeError, match="streamed from 30 image files.*TensorBatches"):
        np.asarray(X)
    import pickle

    assert pickle.loads(pickle.dumps(sub)).paths == sub.paths


def test_split_protocol_works_on_indices(registry, tmp_path):
    _folders(tmp_path)
    split = _split(registry, parse_suite(_suite(tmp_path), registry))
    parts = {k: getattr(split, k) for k in ("source_train", "source_val", "source_test", "target_train", "target_test")}
    assert all(isinstance(p.X, ImageStream) for p in parts.values())
    src = [set(parts[k].X.paths) for k in ("source_train", "source_val", "source_test")]
    assert sum(map(len, src)) == 30 and len(set.union(*src)) == 30  # disjoint, complete
    assert len(parts["target_train"]) + len(parts["target_test"]) == 30
    assert not set(parts["target_train"].X.paths) & set(parts["target_test"].X.paths)
    # labels follow their files: the class folder of every path is its label's name
    for p in parts.values():
        assert [os.path.basename(os.path.dirname(f)) for f in p.X.paths] == [("cat", "dog", "owl")[c] for c in p.y]


def test_random_resized_crop_box_stays_inside_and_samples_scale_and_ratio():
    rng = np.random.default_rng(0)
    areas, ratios = [], []
    for _ in range(2000):
        left, top, w, h = random_resized_crop_box(rng, 256, 256)
        assert 0 <= left and 0 <= top and left + w <= 256 and top + h <= 256 and w > 0 and h > 0
        areas.append(w * h / 256**2)
        ratios.append(w / h)
    assert 0.07 < min(areas) < 0.15 and max(areas) > 0.9  # scale (0.08, 1)
    assert 0.7 < min(ratios) and max(ratios) < 1.4  # ratio (3/4, 4/3), rounded
    # an image too elongated for any try falls back to the centre crop of the allowed ratio
    assert random_resized_crop_box(np.random.default_rng(1), 1000, 10, scale=(0.99, 1.0)) == (493, 0, 13, 10)


# ----------------------------------------------------------------- batches


def test_streamed_batches_equal_in_memory_batches_without_augmentation(registry, tmp_path):
    _folders(tmp_path)
    split = _split(registry, parse_suite(_suite(tmp_path), registry))
    X, y = split.source_train.X, split.source_train.y
    arrays = X.materialize()
    a = TensorBatches(arrays, y, batch_size=8, seed=5)
    b = TensorBatches(X, y, batch_size=8, seed=5)
    for _ in range(5):  # more than one epoch (18 rows, 2 batches per epoch)
        ba, bb = a.next(), b.next()
        assert torch.equal(ba.x, bb.x) and torch.equal(ba.y, bb.y) and torch.equal(ba.index, bb.index)
    b.close()
    # epoch() alone also matches (a stream prefetches next()'s permutations, so a method
    # that interleaves epoch() with next() sees other, equally seeded, orders than on arrays)
    a = TensorBatches(arrays, y, batch_size=8, seed=5)
    b = TensorBatches(X, y, batch_size=8, seed=5)
    ea, eb = list(a.epoch()), list(b.epoch())
    assert [len(e.x) for e in eb] == [8, 8, 2]
    assert all(torch.equal(p.x, q.x) for p, q in zip(ea, eb))
    b.close()


def test_augmentation_is_per_batch_seeded_and_independent_of_the_worker_count(registry, tmp_path, monkeypatch):
    _folders(tmp_path)
    split = _split(registry, parse_suite(_suite(tmp_path, protocol='[protocol]\naugment = "crop-flip"'), registry))
    X, y = split.source_train.X, split.source_train.y
    assert X.augment == "crop-flip"

    def batches(workers: str, augment: bool = True, n: int = 4):
        monkeypatch.setenv("DABENCH_LOADER_WORKERS", workers)
        tb = TensorBatches(X, y, batch_size=6, seed=3, augment=augment)
        out = [tb.next() for _ in range(n)]
        tb.close()
        return out

    one, none = batches("1"), batches("0")
    assert all(torch.equal(p.x, q.x) and torch.equal(p.index, q.index) for p, q in zip(one, none))
    plain = batches("1", augment=False)
    test_pixels = torch.from_numpy(X.materialize())
    for aug, det in zip(one, plain):
        assert torch.equal(aug.index, det.index)  # same rows, same order
        assert torch.equal(det.x, test_pixels[det.index])  # augment=False: the test transform
        assert not torch.equal(aug.x, det.x)  # augmented: random crops and flips
    # a row seen in two epochs gets two different crops
    seen: dict[int, torch.Tensor] = {}
    differ = 0
    for b in one + batches("1", n=8)[4:]:
        for i, row in zip(b.index.tolist(), b.x):
            if i in seen:
                differ += not torch.equal(seen[i], row)
            seen[i] = row
    assert differ > 0


def test_a_method_runs_the_same_on_a_streamed_and_an_in_memory_domain(registry, tmp_path):
    """source-only and DANN get identical batches from a stream and from the
    decoded arrays, so they train to the same predictions bit for bit."""
    _folders(tmp_path)
    suite = parse_suite(_suite(tmp_path), registry)
    (pair,) = suite.pairs
    s, t = pair.domain("src", registry), pair.domain("tgt", registry)
    streamed = make_split(pair.name, s, t, s.load(None), t.load(None), 0, Protocol())
    ms, mt = _in_memory_twin(s), _in_memory_twin(t)
    memory = make_split(pair.name, ms, mt, ms.load(None), mt.load(None), 0, Protocol())
    assert isinstance(streamed.target_test.X, ImageStream) and isinstance(memory.target_test.X, np.ndarray)
    np.testing.assert_array_equal(streamed.target_test.X.materialize(), memory.target_test.X)
    from dabench.source_model import with_source_model
    from dabench.training import seed_everything

    for name in ("source-only", "dann"):
        preds = []
        for split in (streamed, memory):
            task = split.task(seed=0, device="cpu", budget=Budget(12, 8), backbone=registry.backbones["default"])
            if "source_model" in registry.methods[name].requires:  # the host's source model, trained on the stream
                task = with_source_model(task)
            seed_everything(0)
            predictor = registry.methods[name]().fit(task)
            preds.append(predictor.predict_proba(split.target_test.X))
        np.testing.assert_array_equal(preds[0], preds[1])


def test_predictor_on_a_stream_equals_on_its_arrays(registry, tmp_path):
    _folders(tmp_path)
    split = _split(registry, parse_suite(_suite(tmp_path), registry))
    torch.manual_seed(0)
    enc, dim = registry.backbones["default"]((3, 16, 16))
    pred = TorchPredictor(enc, torch.nn.Linear(dim, 3), batch_size=7)
    X = split.target_test.X
    p, z = pred.predict_proba_and_embed(X)
    p2, z2 = pred.predict_proba_and_embed(X.materialize())
    np.testing.assert_array_equal(p, p2)
    np.testing.assert_array_equal(z, z2)


def test_unreadable_image_is_refused_naming_the_file_and_nothing_is_stored(tmp_path):
    from conftest import run_cli

    _folders(tmp_path)
    (tmp_path / "src" / "dog" / "broken.jpg").write_bytes(b"not a jpeg at all")
    suite = _suite(tmp_path, steps=5)
    res = run_cli("run", str(suite), "--results", str(tmp_path / "res"), "--device", "cpu")
    assert res.returncode == 1, res.stdout + res.stderr
    out = res.stdout + res.stderr
    assert "broken.jpg" in out and "1 of 31 images cannot be read" in out
    import sqlite3

    with sqlite3.connect(tmp_path / "res" / "runs.sqlite") as db:
        assert db.execute("select count(*) from runs").fetchone()[0] == 0


def test_image_that_fails_to_decode_mid_run_is_a_data_error(registry, tmp_path):
    _folders(tmp_path)
    split = _split(registry, parse_suite(_suite(tmp_path), registry))
    X = split.source_train.X
    victim = X.paths[0]
    with open(victim, "r+b") as f:  # a valid header, truncated pixel data
        data = f.read()
        f.seek(0)
        f.truncate()
        f.write(data[: len(data) // 3])
    tb = TensorBatches(X, split.source_train.y, batch_size=len(X), seed=0)
    with pytest.raises(DataError, match=os.path.basename(victim)):
        tb.next()


# ----------------------------------------------------------------- suites


def test_methods_that_read_whole_arrays_are_skipped_on_streamed_pairs(registry, tmp_path):
    _folders(tmp_path)
    suite = parse_suite(_suite(tmp_path, methods="[methods.cbst]\n[methods.dann]"), registry)
    split = _split(registry, suite)
    task = split.task(seed=0, device="cpu", budget=Budget(5, 8), backbone=registry.backbones["default"])
    assert task.streamed
    assert "in-memory arrays" in registry.methods["cbst"].skip(task)
    assert registry.methods["dann"].skip(task) is None


def test_streamed_and_in_memory_domains_do_not_mix_and_arrays_are_not_augmented(registry, tmp_path):
    _folders(tmp_path)
    mixed = _suite(tmp_path).read_text().replace('pairs = ["src:tgt"]', 'pairs = ["src:tgt", "digits:mnist"]')
    s = write(tmp_path / "m.toml", mixed.replace('label_space = "animals"', 'label_space = "digits10"'))
    s.write_text(s.read_text().replace('"digits:mnist"', '"src:mnist"'))
    with pytest.raises(SuiteError, match="mixes.*streamed image files"):
        parse_suite(s, registry)
    arrays = write(tmp_path / "a.toml", """
        name = "a"
        pairs = ["digits:mnist"]
        [protocol]
        augment = "crop-flip"
        [methods.source-only]
        """)
    with pytest.raises(SuiteError, match='pairs\\[0\\].*applies to streamed image domains'):
        parse_suite(arrays, registry)
    bad = write(tmp_path / "b.toml", arrays.read_text().replace('"crop-flip"', '"rotate"'))
    with pytest.raises(SuiteError, match="protocol.augment.*crop-flip"):
        parse_suite(bad, registry)


def test_protocol_keys_enter_the_run_key_only_when_set(registry, tmp_path):
    _folders(tmp_path)
    plain = parse_suite(_suite(tmp_path), registry)
    aug = parse_suite(_suite(tmp_path, protocol='[protocol]\naugment = "crop-flip"\namp = true'), registry)
    assert "augment" not in Protocol().as_dict() and "amp" not in Protocol().as_dict()
    assert aug.pairs[0].protocol.as_dict()["augment"] == "crop-flip" and aug.pairs[0].protocol.amp
    assert plain.expand(registry)[0].key != aug.expand(registry)[0].key


def test_amp_changes_nothing_on_cpu(registry, tmp_path):
    """amp = true is bf16 autocast on CUDA only: a CPU run is bit-identical."""
    from dabench.runner import Runner

    _folders(tmp_path)
    plain = parse_suite(_suite(tmp_path, steps=6), registry).expand(registry)[0]
    amp = parse_suite(_suite(tmp_path, steps=6, protocol="[protocol]\namp = true"), registry).expand(registry)[0]
    a, b = Runner(registry, None).run_one(plain), Runner(registry, None).run_one(amp)
    assert a.status == b.status == "ok" and a.target_acc == b.target_acc and a.scores == b.scores


# ----------------------------------------------------------------- the backbone multiplier


def test_backbone_multiplier_applies_to_pretrained_backbones_only(registry):
    from dabench.backbones import is_pretrained, mark_pretrained

    torch.manual_seed(0)
    scratch, dim = registry.backbones["default"]((3, 16, 16))
    head = torch.nn.Linear(dim, 3)
    groups = backbone_param_groups(scratch, head, 0.1)
    assert [g["lr_mult"] for g in groups] == [1.0, 1.0]  # from scratch: TLlib's --scratch
    pre = mark_pretrained(registry.backbones["default"]((3, 16, 16))[0], "test weights")
    assert is_pretrained(pre) and not is_pretrained(scratch)
    opt = make_sgd(backbone_param_groups(pre, head, 0.1), lr=0.01)
    set_lr(opt, 0.004)
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs == pytest.approx({"backbone": 0.0004, "heads": 0.004})
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(pre.parameters())) + 2


def test_methods_that_fine_tune_a_backbone_declare_the_multiplier(registry):
    from dabench.source_model import SourceRecipe

    assert SourceRecipe().backbone_lr_mult == 0.1  # the host's source model (source-only) follows the recipe too
    assert "backbone_lr_mult" not in SourceRecipe().resolved(10, 8)  # run keys of the default recipe unchanged
    assert SourceRecipe(backbone_lr_mult=0.5).resolved(10, 8)["backbone_lr_mult"] == 0.5
    fine_tuners = {"target-oracle", "target-only-k", "dann", "cdan", "cbst", "can",
                   "self-ensembling", "iw-discriminative", "iw-kliep"}
    fine_tuners |= {m for m in registry.methods if m.startswith("pa-")}
    for name in fine_tuners & set(registry.methods):
        hp = registry.methods[name].hyperparameters["backbone_lr_mult"]
        assert hp.default == 0.1, name
