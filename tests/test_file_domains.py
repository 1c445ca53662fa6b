"""Domains declared in a suite from array files ([domains.NAME], format = "npz"),
and the host's input standardisation of vector data."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import run_cli, write
from dabench.data.core import DataError, Protocol, make_split
from dabench.suite import SuiteError, parse_suite

SUITE = """
name = "files"
seeds = 1
pairs = ["{pair}"]

[budget]
steps = 30
batch_size = 16

[domains.mine]
path = "{path}"
format = "npz"
label_space = "{space}"
{extra}

[methods.source-only]
"""


def _images(path, n=60, c=1, hw=8, dtype=np.uint8, seed=0, n_classes=10, **extra):
    rng = np.random.default_rng(seed)
    X = rng.integers(0, 256, size=(n, c, hw, hw)).astype(dtype)
    y = np.arange(n) % n_classes
    np.savez(path, X=X, y=y, **extra)
    return X, y


def _suite(tmp_path, path, pair="mine:digits", space="digits10", extra=""):
    return write(tmp_path / "s.toml", SUITE.format(pair=pair, path=path, space=space, extra=extra))


def test_npz_domain_loads_scaled_images_and_pairs_with_a_registered_domain(registry, tmp_path):
    X, y = _images(tmp_path / "d.npz")
    s = parse_suite(_suite(tmp_path, "d.npz"), registry)  # relative: the suite's folder
    (pair,) = s.pairs
    spec = pair.domain("mine", registry)
    assert spec.shape == (1, 8, 8) and spec.n_classes == 10 and spec.fingerprint.startswith("sha256:")
    Xl, yl = spec.load(None)
    np.testing.assert_allclose(Xl, X.astype(np.float32) / 255.0)
    np.testing.assert_array_equal(yl, y)
    # the spec travels with the run (workers): it pickles
    import pickle

    assert pickle.loads(pickle.dumps(s.expand(registry)[0])).pair.domain("mine", registry).load(None)[0].shape == Xl.shape


def test_npz_grey_hw_arrays_get_a_channel_and_float_scale_is_taken(registry, tmp_path):
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "g.npz", images=rng.random((40, 6, 6)).astype(np.float32) * 2.0,
             labels=np.arange(40) % 10)
    s = parse_suite(_suite(tmp_path, "g.npz", extra='x = "images"\ny = "labels"\nscale = 2.0'), registry)
    spec = s.pairs[0].domain("mine", registry)
    X, _ = spec.load(None)
    assert spec.shape == (1, 6, 6) and X.shape == (40, 1, 6, 6) and X.max() <= 1.0


def test_relative_path_prefers_data_root_over_suite_folder(registry, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    _images(tmp_path / "d.npz", seed=0)
    _images(root / "d.npz", seed=1)
    s = parse_suite(_suite(tmp_path, "d.npz"), registry, data_root=root)
    assert s.pairs[0].domain("mine", registry).load.path == str((root / "d.npz").resolve())


def test_edited_file_changes_the_run_key(registry, tmp_path):
    _images(tmp_path / "d.npz", seed=0)
    path = _suite(tmp_path, "d.npz")
    k0 = parse_suite(path, registry).expand(registry)[0].key
    assert parse_suite(path, registry).expand(registry)[0].key == k0
    _images(tmp_path / "d.npz", seed=1)
    assert parse_suite(path, registry).expand(registry)[0].key != k0


BAD = {
    "labels_out_of_range": (dict(y=np.arange(60) % 12), "domains.mine.y", "outside [0, 10)"),
    "y_wrong_length": (dict(y=np.arange(59) % 10), "domains.mine.y", "expected (60,)"),
    "float_labels": (dict(y=(np.arange(60) % 10).astype(np.float32)), "domains.mine.y", "integer class labels"),
    "no_x": (dict(X=None), "domains.mine.x", "has no array 'X'"),
    "channels_last": (dict(X=np.zeros((60, 8, 8, 3), np.uint8)), "domains.mine.x", "channels-last"),
    "bad_rank": (dict(X=np.zeros((60,), np.uint8)), "domains.mine.x", "expected (n, C, H, W)"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_malformed_npz_is_refused_naming_suite_key_and_file(registry, tmp_path, case):
    arrays, key, expected = BAD[case]
    base = {"X": np.zeros((60, 1, 8, 8), np.uint8), "y": np.arange(60) % 10}
    base.update(arrays)
    np.savez(tmp_path / "d.npz", **{k: v for k, v in base.items() if v is not None})
    path = _suite(tmp_path, "d.npz")
    with pytest.raises(SuiteError) as ei:
        parse_suite(path, registry)
    assert ei.value.key == key and expected in str(ei.value) and str(path) in str(ei.value)


@pytest.mark.parametrize("table, key, expected", [
    ('[domains.mine]\nformat = "npz"\nlabel_space = "digits10"\n', "domains.mine.path", "missing"),
    ('[domains.mine]\npath = "d.npz"\nformat = "hdf5"\nlabel_space = "digits10"\n', "domains.mine.format",
     "unknown format"),
    ('[domains.mine]\npath = "d.npz"\nformat = "npz"\nlabel_space = "digits10"\nscale = -1\n',
     "domains.mine.scale", "positive number"),
    ('[domains.mine]\npath = "d.npz"\nformat = "npz"\nlabel_space = "digits10"\nn_classes = 7\n',
     "domains.mine.n_classes", "has 10 classes"),
    ('[domains.mnist]\npath = "d.npz"\nformat = "npz"\nlabel_space = "digits10"\n', "domains.mnist",
     "already registered"),
    ('[domains.mine]\npath = "d.npz"\nformat = "npz"\nlabel_space = "digits10"\ncolour = 1\n',
     "domains.mine.colour", "unknown key"),
    ('[domains.mine]\npath = "not-there.npz"\nformat = "npz"\nlabel_space = "new-space"\n',
     "domains.mine.n_classes", "set n_classes"),
])
def test_malformed_domain_tables(registry, tmp_path, table, key, expected):
    _images(tmp_path / "d.npz")
    path = write(tmp_path / "s.toml", 'name = "x"\npairs = ["mine:digits"]\n[methods.source-only]\n' + table)
    with pytest.raises(SuiteError) as ei:
        parse_suite(path, registry)
    assert ei.value.key == key and expected in str(ei.value)


def test_label_space_mismatch_with_partner_is_refused(registry, tmp_path):
    _images(tmp_path / "d.npz", n_classes=2)
    path = _suite(tmp_path, "d.npz", pair="mine:moons", space="mine2", extra="n_classes = 2")
    with pytest.raises(SuiteError, match="different label spaces"):
        parse_suite(path, registry)


def test_nan_inputs_fail_at_load_with_the_row(registry, tmp_path):
    X = np.zeros((60, 1, 8, 8), np.float32)
    X[7, 0, 0, 0] = np.nan
    np.savez(tmp_path / "d.npz", X=X, y=np.arange(60) % 10)
    spec = parse_suite(_suite(tmp_path, "d.npz"), registry).pairs[0].domain("mine", registry)
    with pytest.raises(DataError, match=r"non-finite.*row 7"):
        spec.load(None)


def test_missing_file_is_missing_data_not_a_failed_run(tmp_path):
    """A pair whose file is absent is reported once, not stored, exit 1 (like an absent standard dataset)."""
    path = _suite(tmp_path, "nowhere/d.npz")
    r = run_cli("run", str(path), "--results", str(tmp_path / "res"), "--data-root", str(tmp_path / "root"))
    assert r.returncode == 1, r.stderr
    out = r.stdout + r.stderr
    assert "'nowhere/d.npz' not found" in out and str(tmp_path / "root") in out and "Traceback" not in out
    from dabench.store import RunStore

    assert RunStore(tmp_path / "res").count() == 0


def test_npz_domain_runs_end_to_end(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 5)).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.int64)
    np.savez(tmp_path / "a.npz", X=X, y=y)
    np.savez(tmp_path / "b.npz", X=X + 0.3, y=y)
    text = (SUITE.format(pair="mine:other", path="a.npz", space="vec2", extra="n_classes = 2")
            + '\n[domains.other]\npath = "b.npz"\nformat = "npz"\nlabel_space = "vec2"\nn_classes = 2\n')
    path = write(tmp_path / "s.toml", text)
    r = run_cli("run", str(path), "--results", str(tmp_path / "res"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ok: target acc" in r.stderr
    from dabench.store import RunStore

    assert RunStore(tmp_path / "res").statuses() and set(RunStore(tmp_path / "res").statuses().values()) == {"ok"}


# ---------------------------------------------------------------- standardisation


def _vector_domains(registry, tmp_path, scale=0.003, shift=0.0, n=400, d=20, seed=0):
    from dabench.data.files import parse_domain_table

    rng = np.random.default_rng(seed)
    out = []
    for i, off in enumerate((0.0, shift)):
        X = (rng.random((n, d)) < 0.1) * scale * (1 + rng.random((n, d)))
        y = (X[:, :5].sum(1) > np.median(X[:, :5].sum(1))).astype(np.int64)
        np.savez(tmp_path / f"v{i}.npz", X=(X + off).astype(np.float32), y=y)
        out.append(parse_domain_table(f"v{i}", {"path": f"v{i}.npz", "format": "npz", "label_space": "v2",
                                                "n_classes": 2},
                                      suite_dir=tmp_path, data_root=None, registered=registry.datasets))
    return out


def test_vectors_are_standardised_with_source_train_statistics(registry, tmp_path):
    a, b = _vector_domains(registry, tmp_path, shift=0.01)
    split = make_split("v0:v1", a, b, a.load(None), b.load(None), 0, Protocol())
    Xs = split.source_train.X
    np.testing.assert_allclose(Xs.mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(Xs.std(0), 1, atol=1e-3)
    # the target is mapped with the *source* statistics: its shift survives
    assert split.target_train.X.mean() > 1.0
    raw = make_split("v0:v1", a, b, a.load(None), b.load(None), 0, Protocol(standardize="none"))
    assert abs(raw.source_train.X.mean()) < 0.01
    assert Protocol().as_dict()["standardize"] == "source"


def test_constant_features_do_not_divide_by_zero(registry, tmp_path):
    from dabench.data.core import _moments

    mean, std = _moments(np.array([[1.0, 2.0], [1.0, 4.0]], np.float32))
    np.testing.assert_array_equal(std, [1.0, 1.0])
    np.testing.assert_array_equal(mean, [1.0, 3.0])


def test_pad_resize_keeps_scale_and_centres(registry):
    from dabench.data.core import resize_images

    X = np.zeros((2, 1, 28, 28), np.float32)
    X[:, 0, 10, 12] = 1.0
    out = resize_images(X, (3, 32, 32), "pad")
    assert out.shape == (2, 3, 32, 32) and out[:, :, 12, 14].min() == 1.0 and out.sum() == 2 * 3
    with pytest.raises(DataError, match="larger"):
        resize_images(np.zeros((1, 1, 40, 40), np.float32), (1, 32, 32), "pad")
    assert Protocol(resize="pad").as_dict()["resize"] == "pad" and "resize" not in Protocol().as_dict()
