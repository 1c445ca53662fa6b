"""The conformance kit (dabench.testing): it passes every built-in method and
catches each kind of broken method with a message saying what to change."""

from __future__ import annotations

import pytest

from conftest import write
from dabench.plugins import _module_from_path, get_registry
from dabench.testing import (
    CHECKS,
    ConformanceError,
    check_method,
    parametrize_with_checks,
    run_checks,
)


def _builtin_methods() -> list[str]:
    """Every method registered by a built-in plugin (entry points into
    dabench_plugins), so methods added by other plugins are covered as soon
    as they are merged."""
    reg = get_registry()
    return sorted(n for n, cls in reg.methods.items()
                  if reg.plugins[reg.owner[("method", n)]].origin.startswith("entry point dabench_plugins."))


@parametrize_with_checks(_builtin_methods())
def test_builtin_methods_pass_the_kit(method, check):
    check(method)


def test_every_builtin_method_is_covered():
    names = _builtin_methods()
    assert {"source-only", "dann", "target-oracle"} <= set(names)


# ---------------------------------------------------------------- broken methods

BROKEN = '''
import gc
import sys

import numpy as np
import torch
from dabench import Float, Method, hookimpl


class _P:
    def __init__(self, n, extra=0, logits=False, noise=0.0, tensor=None):
        self.n, self.extra, self.logits, self.noise, self.tensor = n, extra, logits, noise, tensor

    def predict_proba(self, X, domain="target"):
        X = np.asarray(X)
        p = np.full((len(X), self.n + self.extra), 1.0 / (self.n + self.extra))
        p[:, 0] += self.noise
        p /= p.sum(1, keepdims=True)
        return p * 3.0 if self.logits else p

    def embed(self, X, domain="target"):
        return np.asarray(X, dtype=np.float32)


class Base(Method):
    family = "baseline"
    requires = frozenset({"same_feature_space"})
    hyperparameters = {"a": Float(0.5, 0.0, 1.0)}

    def fit(self, task):
        task.source_train.X
        return _P(task.n_classes)


class Good(Base):
    name = "kit-good"


class Noisy(Base):
    name = "kit-noisy"
    def fit(self, task):
        task.source_train.X
        return _P(task.n_classes, noise=float(np.random.default_rng().uniform()))


class Peeker(Base):
    name = "kit-peeker"
    def fit(self, task):
        for o in gc.get_objects():
            if type(o).__name__ == "PairSplit":
                try:
                    o.target_test.y[:3]
                except Exception:
                    pass
        return super().fit(task)


class Swallower(Base):
    name = "kit-swallower"
    def fit(self, task):
        try:
            task.source_train.X
        except Exception:
            pass
        return _P(task.n_classes)


class Exiter(Base):
    name = "kit-exiter"
    def fit(self, task):
        try:
            task.source_train.X
        except Exception:
            sys.exit(3)
        return _P(task.n_classes)


class WrongShape(Base):
    name = "kit-wrong-shape"
    def fit(self, task):
        return _P(task.n_classes, extra=1)


class Logits(Base):
    name = "kit-logits"
    def fit(self, task):
        return _P(task.n_classes, logits=True)


class Meta(Base):
    name = "kit-meta"
    def fit(self, task):
        return _P(task.n_classes, tensor=torch.nn.Linear(2, 2, device="meta"))


class BadDefault(Base):
    name = "kit-bad-default"
    hyperparameters = {"a": Float(5.0, 0.0, 1.0)}


class Unregistered(Base):
    name = "kit-unregistered"


class FewShot(Base):
    name = "kit-few-shot"
    requires = frozenset({"same_feature_space", "target_labels"})
    def fit(self, task):
        assert task.target_labeled is not None
        return super().fit(task)


class Hetero(Base):
    name = "kit-hetero"
    requires = frozenset()
    @classmethod
    def skip(cls, task):
        return None if not task.same_feature_space else "needs two feature spaces"
    def fit(self, task):
        assert task.source_shape == (1, 8, 8) and task.target_shape == (1, 28, 28)
        return super().fit(task)


@hookimpl
def dabench_methods(register):
    for c in (Good, Noisy, Peeker, Swallower, Exiter, WrongShape, Logits, Meta, FewShot, Hetero):
        register(c)
'''


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    path = write(tmp_path_factory.mktemp("kit") / "kitbroken.py", BROKEN)
    return _module_from_path(path)


def _result(mod, cls_name, check):
    [r] = run_checks(getattr(mod, cls_name), checks=[check], plugin=mod)
    return r


def test_a_good_method_passes_everything(broken):
    results = check_method(broken.Good, plugin=broken)
    assert [r.check for r in results] == [n for n, _ in CHECKS]
    assert all(r.status in ("PASS", "SKIP") for r in results)


@pytest.mark.parametrize("cls_name, check, says", [
    ("Noisy", "check_determinism", "derive every random stream from task.seed"),
    ("Peeker", "check_no_target_labels", "target test labels"),
    ("Swallower", "check_failure_is_stored", "swallows errors"),
    ("Exiter", "check_failure_is_stored", "SystemExit"),
    ("WrongShape", "check_fit_predict", "expected (150, 2)"),
    ("Logits", "check_fit_predict", "apply softmax"),
    ("Meta", "check_cpu_placement", "holds tensors on ['meta']"),
    ("BadDefault", "check_hyperparameters", "above its range"),
    ("BadDefault", "check_registration", "above its range"),
    ("Unregistered", "check_registration", "call register(Unregistered)"),
])
def test_each_defect_is_caught_with_what_to_change(broken, cls_name, check, says):
    r = _result(broken, cls_name, check)
    assert r.status == "FAIL", r
    assert says in r.message, r.message
    # the same method passes the checks that do not concern its defect
    if cls_name in ("Noisy", "Peeker", "Swallower"):
        assert _result(broken, cls_name, "check_fit_predict").status == "PASS"


def test_methods_needing_labels_or_two_spaces_get_a_suitable_task(broken):
    r = _result(broken, "FewShot", "check_fit_predict")
    assert r.status == "PASS" and "k_target=2" in r.message, r
    r = _result(broken, "Hetero", "check_fit_predict")
    assert r.status == "PASS" and "digits:mnist (feature_space=native)" in r.message, r


def test_check_method_raises_one_error_listing_the_failures(broken):
    with pytest.raises(ConformanceError) as e:
        check_method(broken.Logits, plugin=broken, checks=["check_hyperparameters", "check_fit_predict"])
    assert "kit-logits" in str(e.value) and "check_fit_predict" in str(e.value)
    assert "check_hyperparameters" not in str(e.value)


def test_cuda_check_skips_with_a_reason_without_a_gpu(broken):
    import torch

    r = _result(broken, "Good", "check_cuda_placement")
    if torch.cuda.is_available():
        assert r.status == "PASS", r
    else:
        assert r.status == "SKIP" and "no CUDA device" in r.message


def test_pytest_form_gives_one_test_per_check_named_for_k():
    mark = parametrize_with_checks(["dann"], checks=["check_hyperparameters", "check_determinism"])
    assert mark.kwargs["ids"] == ["dann-check_hyperparameters", "dann-check_determinism"]
    method, check = mark.args[1][0]
    assert method == "dann" and check.__name__ == "check_hyperparameters"
    check(method)  # passes silently
