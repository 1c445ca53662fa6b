"""The contract: hyperparameter declarations and target-label leakage."""

from __future__ import annotations

import numpy as np
import pytest

from dabench import Budget, ContractError, Float, Int, Choice, Method
from dabench.contract import Labeled, Unlabeled, validate_method_class
from dabench.data.core import Protocol, make_split


class _M(Method):
    name = "m"
    family = "baseline"
    hyperparameters = {"lr": Float(0.1, 1e-3, 1.0, log=True), "width": Int(8, 1, 64), "act": Choice("relu", ["relu", "tanh"])}

    def fit(self, task):  # pragma: no cover - not called
        raise NotImplementedError


def test_params_fill_defaults_and_validate_ranges():
    assert _M().get_params() == {"act": "relu", "lr": 0.1, "width": 8}
    assert _M(lr=0.5).lr == 0.5
    with pytest.raises(ContractError, match="above its range"):
        _M(lr=3.0)
    with pytest.raises(ContractError, match="no hyperparameter"):
        _M(momentum=0.9)
    with pytest.raises(ContractError, match="integer"):
        _M(width=2.5)
    with pytest.raises(ContractError, match="one of"):
        _M(act="gelu")


def test_invalid_method_classes_are_rejected_with_reason():
    class NoFit(Method):
        name = "nofit"

    class BadRange(_M):
        name = "bad"
        hyperparameters = {"lr": Float(5.0, 0.0, 1.0)}

    class Future(_M):
        name = "future"
        requires_contract = "2"

    with pytest.raises(ContractError, match="does not implement fit"):
        validate_method_class(NoFit)
    with pytest.raises(ContractError, match="above its range"):
        validate_method_class(BadRange)
    with pytest.raises(ContractError, match="contract 2"):
        validate_method_class(Future)
    with pytest.raises(ContractError, match="subclass"):
        validate_method_class(object)


def test_sampling_is_seeded_and_in_range():
    hp = Float(0.1, 1e-3, 1.0, log=True)
    a = [hp.sample(np.random.default_rng(3)) for _ in range(5)]
    b = [hp.sample(np.random.default_rng(3)) for _ in range(5)]
    assert a == b and all(1e-3 <= x <= 1.0 for x in a)


def test_task_arrays_are_read_only_and_unlabeled_has_no_labels():
    u = Unlabeled(np.zeros((3, 2)))
    assert not hasattr(u, "y")
    with pytest.raises(ValueError):
        u.X[0, 0] = 1.0
    lab = Labeled(np.zeros((3, 2)), np.array([0, 1, 0]))
    with pytest.raises(ValueError):
        lab.y[0] = 1


def _reachable(obj, seen=None, depth=0):
    """Every object reachable from ``obj`` through attributes, slots, containers."""
    seen = seen if seen is not None else {}
    if id(obj) in seen or depth > 12:
        return seen
    seen[id(obj)] = obj
    children = []
    if isinstance(obj, dict):
        children = list(obj.keys()) + list(obj.values())
    elif isinstance(obj, (list, tuple, set, frozenset)):
        children = list(obj)
    elif isinstance(obj, (np.ndarray, str, bytes, int, float, bool, type(None))):
        if isinstance(obj, np.ndarray) and obj.base is not None:
            children = [obj.base]
    else:
        for name in getattr(type(obj), "__slots__", ()):
            if hasattr(obj, name):
                children.append(getattr(obj, name))
        children += list(getattr(obj, "__dict__", {}).values())
        if callable(obj) and hasattr(obj, "__closure__") and obj.__closure__:
            children += [c.cell_contents for c in obj.__closure__]
    for c in children:
        _reachable(c, seen, depth + 1)
    return seen


@pytest.mark.parametrize("oracle", [False, True])
@pytest.mark.parametrize("k", [0, 2])
def test_target_test_labels_never_reachable_from_a_task(registry, oracle, k):
    src, tgt = registry.datasets["digits"], registry.datasets["mnist"]
    split = make_split("digits:mnist", src, tgt, src.load(None), tgt.load(None), seed=0,
                       protocol=Protocol(k_target=k, max_target=600))
    task = split.task(seed=0, device="cpu", budget=Budget(10, 8), backbone=registry.backbones["default"], oracle=oracle)
    test_X, test_y = split.target_test.X, split.target_test.y
    objs = _reachable(task)
    for o in objs.values():
        assert o is not split and o is not split.target_test and o is not test_y and o is not test_X
        if isinstance(o, np.ndarray) and o.ndim == 1 and len(o) == len(test_y):
            assert not np.array_equal(o, test_y), "an array equal to the target test labels is reachable"
        if isinstance(o, np.ndarray) and o.ndim == 2 and o.shape[1] == test_X.shape[1]:
            # no target test input row appears among the arrays a method sees
            rows = {r.tobytes() for r in o}
            assert not any(r.tobytes() in rows for r in test_X[:50])
    # the method sees target train inputs only, unlabelled unless it is the oracle
    assert not hasattr(task.target_train, "y")
    assert (task.target_train_labels is not None) == oracle
    assert (task.target_labeled is not None) == (k > 0)
    if k:
        assert np.bincount(task.target_labeled.y, minlength=10).tolist() == [k] * 10
