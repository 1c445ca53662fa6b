"""Behaviour tests of the embedded domains and the split protocol on them."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pluggy
import pytest

from dabench import hookspecs
from dabench.data import embedded
from dabench.data.core import DataError, Protocol, make_split

EXPECTED = {
    # name: (shape, n_classes, label_space, is_unit_range)
    "moons": ((2,), 2, "moons2", False),
    "moons-rot35": ((2,), 2, "moons2", False),
    "digits": ((1, 8, 8), 10, "digits10", True),
    "mnist": ((1, 28, 28), 10, "digits10", True),
    "mnistm": ((3, 28, 28), 10, "digits10", True),
    "covshift-source": ((10,), 3, "covshift3", False),
    "covshift-target": ((10,), 3, "covshift3", False),
    "condshift-source": ((10,), 2, "condshift2", False),
    "condshift-target": ((10,), 2, "condshift2", False),
    "labelshift-source": ((10,), 2, "labelshift2", False),
    "labelshift-target": ((10,), 2, "labelshift2", False),
}


def _registered() -> dict:
    pm = pluggy.PluginManager("dabench")
    pm.add_hookspecs(hookspecs)
    pm.register(embedded, name="embedded-data")
    specs: list = []
    pm.hook.dabench_datasets(register=specs.append)
    names = [s.name for s in specs]
    assert len(names) == len(set(names)), names
    return {s.name: s for s in specs}


SPECS = _registered()


def load(name: str) -> tuple[np.ndarray, np.ndarray]:
    return SPECS[name].load(None)


def test_hook_registers_every_domain_with_provenance():
    assert set(EXPECTED) <= set(SPECS)
    for spec in SPECS.values():
        assert spec.description and spec.source, spec.name
    assert SPECS["mnistm"].base == "mnist"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_domain_loads_with_declared_shape_dtype_range(name):
    shape, n_classes, label_space, unit = EXPECTED[name]
    spec = SPECS[name]
    assert (tuple(spec.shape), spec.n_classes, spec.label_space) == (shape, n_classes, label_space)
    X, y = spec.load(None)
    assert X.dtype == np.float32 and y.dtype == np.int64
    assert X.shape == (len(y), *shape) and len(y) >= 1000
    assert np.isfinite(X).all()
    if unit:
        assert X.min() >= 0.0 and X.max() <= 1.0 and X.max() > 0.9
    assert set(np.unique(y)) == set(range(n_classes))
    # deterministic, and callers get their own arrays
    X2, y2 = spec.load(None)
    assert np.array_equal(X, X2) and np.array_equal(y, y2)
    X[...] = -1
    X3, _ = spec.load(None)
    assert np.array_equal(X3, X2)


def _rotate(X, degrees, centre):
    t = np.deg2rad(degrees)
    R = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    return (X - centre) @ R.T + centre


def test_moons_rot35_is_moons_rotated_35_degrees():
    Xs, ys = load("moons")
    Xt, yt = load("moons-rot35")
    assert not np.allclose(Xs, Xt)  # an independent draw, not the same points
    centre = np.array([0.5, 0.25])
    ms = np.stack([Xs[ys == c].mean(0) for c in (0, 1)])
    mt = np.stack([Xt[yt == c].mean(0) for c in (0, 1)])
    # the class-mean axis turns by +35 degrees ...
    ds, dt = ms[1] - ms[0], mt[1] - mt[0]
    angle = np.rad2deg(np.arctan2(dt[1], dt[0]) - np.arctan2(ds[1], ds[0]))
    assert angle == pytest.approx(35.0, abs=2.0)
    # ... about the data centre: rotating the target back recovers the source
    back = _rotate(Xt, -35.0, centre)
    for c in (0, 1):
        assert np.allclose(back[yt == c].mean(0), ms[c], atol=0.05)
        assert np.allclose(np.cov(back[yt == c].T), np.cov(Xs[ys == c].T), atol=0.03)


def test_mnistm_is_digit_blended_with_a_photo_patch():
    from numpy.lib.stride_tricks import sliding_window_view
    from sklearn.datasets import load_sample_images

    photos = [np.asarray(im) for im in load_sample_images().images]
    digits, yd = load("mnist")
    Xm, ym = load("mnistm")
    assert np.array_equal(yd, ym)  # sample i of MNIST-M derives from MNIST sample i
    rng = np.random.default_rng(0)
    for i in rng.choice(len(ym), size=4, replace=False):
        d = np.round(digits[i, 0] * 255).astype(np.int16)  # (28, 28)
        out = np.round(Xm[i] * 255).astype(np.int16)  # (3, 28, 28)
        assert (d[0] == 0).all()  # the top row is background: there out == patch
        found = False
        for photo in photos:
            rows = sliding_window_view(photo, 28, axis=1)  # (H, W-27, 3, 28)
            for r, c in zip(*np.nonzero((rows == out[:, 0, :]).all(axis=(2, 3)))):
                if r + 28 <= photo.shape[0]:
                    patch = photo[r : r + 28, c : c + 28].astype(np.int16).transpose(2, 0, 1)
                    found |= bool(np.array_equal(out, np.abs(patch - d)))
        assert found, f"MNIST-M sample {i} is not |patch - digit| for any 28x28 patch"


def _corrupt_copy(tmp_path: Path, how: str) -> Path:
    bad = tmp_path / f"mnist10k-{how}.npz"
    shutil.copyfile(embedded.MNIST_NPZ, bad)
    data = bytearray(bad.read_bytes())
    if how == "flipped":
        for k in range(1000, len(data) - 1000, 997):
            data[k] ^= 0xFF
    elif how == "truncated":
        data = data[: len(data) // 2]
    bad.write_bytes(bytes(data))
    return bad


@pytest.mark.parametrize("how", ["flipped", "truncated", "missing"])
def test_corrupt_or_missing_npz_raises_data_error_naming_the_file(tmp_path, monkeypatch, how):
    bad = tmp_path / "absent.npz" if how == "missing" else _corrupt_copy(tmp_path, how)
    monkeypatch.setattr(embedded, "MNIST_NPZ", bad)
    for name in ("mnist", "mnistm"):
        with pytest.raises(DataError) as exc:
            SPECS[name].load(None)
        assert str(bad) in str(exc.value)
        assert "scripts/build_mnist_npz.py" in str(exc.value)


def test_valid_npz_with_other_content_fails_the_sha256_check(tmp_path, monkeypatch):
    with np.load(embedded.MNIST_NPZ) as npz:
        x, y = npz["x"].copy(), npz["y"].copy()
    x[0, 14, 14] ^= 1
    other = tmp_path / "other.npz"
    np.savez_compressed(other, x=x, y=y)
    monkeypatch.setattr(embedded, "MNIST_NPZ", other)
    with pytest.raises(DataError, match="sha256") as exc:
        SPECS["mnist"].load(None)
    assert str(other) in str(exc.value)


def test_rebuilt_npz_with_same_arrays_is_accepted(tmp_path, monkeypatch):
    with np.load(embedded.MNIST_NPZ) as npz:
        x, y = npz["x"], npz["y"]
        rebuilt = tmp_path / "rebuilt.npz"
        np.savez(rebuilt, x=x, y=y)  # other bytes (uncompressed), same arrays
    monkeypatch.setattr(embedded, "MNIST_NPZ", rebuilt)
    X, _ = SPECS["mnist"].load(None)
    assert np.array_equal(X, load("mnist")[0])


def _row_index(X: np.ndarray) -> dict[bytes, int]:
    return {row.tobytes(): i for i, row in enumerate(X.reshape(len(X), -1))}


def test_mnist_mnistm_split_uses_disjoint_base_images():
    src, tgt = SPECS["mnist"], SPECS["mnistm"]
    Xs, ys = src.load(None)
    Xt, yt = tgt.load(None)
    split = make_split("mnist:mnistm", src, tgt, (Xs, ys), (Xt, yt), seed=3, protocol=Protocol())
    assert split.source_shape == split.target_shape == (3, 28, 28)
    grey = _row_index(Xs)
    colour = _row_index(Xt)
    src_ids = set()
    for part in (split.source_train, split.source_val, split.source_test):
        X = np.asarray(part.X).reshape(-1, 3, 28, 28)
        assert np.array_equal(X[:, 0], X[:, 2])  # grey repeated to 3 channels
        src_ids |= {grey[row.tobytes()] for row in X[:, :1].reshape(len(X), -1)}
    tgt_ids = set()
    for part in (split.target_train, split.target_test):
        tgt_ids |= {colour[row.tobytes()] for row in np.asarray(part.X)}
    assert src_ids and tgt_ids
    assert not src_ids & tgt_ids
    assert len(src_ids) + len(tgt_ids) == len(ys)


def test_digits_resized_to_mnist_and_k_target_per_class():
    src, tgt = SPECS["digits"], SPECS["mnist"]
    split = make_split(
        "digits:mnist", src, tgt, src.load(None), tgt.load(None), seed=0,
        protocol=Protocol(k_target=5, max_target=2000),
    )
    assert split.source_shape == split.target_shape == (1, 28, 28)
    assert np.asarray(split.source_train.X).shape[1] == 28 * 28
    Xs = np.asarray(split.source_train.X)
    assert Xs.min() >= 0 and Xs.max() <= 1
    kl = split.target_labeled
    assert kl is not None
    assert np.array_equal(np.bincount(np.asarray(kl.y), minlength=10), np.full(10, 5))
    train_rows = _row_index(np.asarray(split.target_train.X))
    assert all(row.tobytes() in train_rows for row in np.asarray(kl.X))  # drawn from target train


def test_digits_mnist_native_space_keeps_each_shape():
    src, tgt = SPECS["digits"], SPECS["mnist"]
    split = make_split(
        "digits:mnist", src, tgt, src.load(None), tgt.load(None), seed=0,
        protocol=Protocol(feature_space="native", max_target=1000),
    )
    assert not split.same_feature_space
    assert np.asarray(split.source_train.X).shape[1] == 64
    assert np.asarray(split.target_train.X).shape[1] == 784


def _knn_transfer(src: str, tgt: str) -> float:
    from sklearn.neighbors import KNeighborsClassifier

    Xs, ys = load(src)
    Xt, yt = load(tgt)
    return KNeighborsClassifier(15).fit(Xs, ys).score(Xt, yt)


def test_covshift_moves_p_x_but_keeps_the_labelling_rule():
    Xs, ys = load("covshift-source")
    Xt, yt = load("covshift-target")
    assert np.linalg.norm(Xs.mean(0) - Xt.mean(0)) > 3.0  # p(x) shifts
    assert np.array_equal(embedded.covshift_labels(Xs), ys)  # one rule for both
    assert np.array_equal(embedded.covshift_labels(Xt), yt)
    assert _knn_transfer("covshift-source", "covshift-target") < 0.85  # source-only extrapolates badly


def test_condshift_moves_clusters_and_flips_priors_so_alignment_must_hurt():
    from sklearn.linear_model import LogisticRegression

    Xs, ys = load("condshift-source")
    Xt, yt = load("condshift-target")
    assert np.bincount(ys)[1] / len(ys) == pytest.approx(0.2)  # priors flip 80/20 -> 20/80
    assert np.bincount(yt)[1] / len(yt) == pytest.approx(0.8)
    assert np.linalg.norm(Xs.mean(0) - Xt.mean(0)) > 2.5  # p(x) moves
    for c in (0, 1):  # and so do the class conditionals
        assert np.linalg.norm(Xs[ys == c].mean(0) - Xt[yt == c].mean(0)) > 2.5
    # source-only transfers well (above the 0.8 of always predicting the target majority)
    clf = LogisticRegression().fit(Xs, ys)
    assert clf.score(Xt, yt) > 0.9
    assert _knn_transfer("condshift-source", "condshift-target") > 0.85
    # perfect marginal alignment along the source classifier's axis (1-d optimal transport of the target
    # scores onto the source scores) pairs each target class with the other source class
    s, t = clf.decision_function(Xs), clf.decision_function(Xt)
    aligned = np.quantile(s, np.argsort(np.argsort(t)) / (len(t) - 1))
    acc = ((aligned > 0).astype(int) == yt).mean()
    assert acc <= embedded.condshift_bound() + 0.02
    assert embedded.condshift_bound() == pytest.approx(0.4)


def test_labelshift_changes_priors_only():
    Xs, ys = load("labelshift-source")
    Xt, yt = load("labelshift-target")
    assert np.bincount(ys)[1] / len(ys) == pytest.approx(0.5)
    assert np.bincount(yt)[1] / len(yt) == pytest.approx(0.2)
    for c in (0, 1):
        assert np.allclose(Xs[ys == c].mean(0), Xt[yt == c].mean(0), atol=0.2)
    assert _knn_transfer("labelshift-source", "labelshift-target") > 0.85
