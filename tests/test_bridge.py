"""The pytorch-adapt bridge (plugins/pytorch_adapt_bridge.py).

Its methods also run through the conformance kit in test_testing_kit.py
(every built-in method does).  Tests needing pytorch-adapt skip, saying so,
when it is not installed; the "absent" behaviour is tested either way.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

import dabench_plugins.pytorch_adapt_bridge as bridge
from conftest import make_task
from dabench.plugins import get_registry

pytestmark = pytest.mark.filterwarnings("ignore:pkg_resources is deprecated")

HAVE_PA = not bridge.missing_modules()
needs_pa = pytest.mark.skipif(
    not HAVE_PA, reason=f"pytorch-adapt not installed ({', '.join(bridge.missing_modules())} missing); "
                        f"install it with: {bridge.INSTALL}")

@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models train several times faster on one thread than on a contended pool."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


NAMES = {"pa-dann", "pa-cdan", "pa-mcc", "pa-bnm", "pa-atdoc", "pa-mcd", "pa-mmd", "pa-jmmd", "pa-coral"}


def test_without_pytorch_adapt_the_bridge_registers_nothing_and_says_why(monkeypatch, capsys):
    monkeypatch.setattr(bridge, "missing_modules", lambda: ["pytorch_adapt"])
    bridge._validators_module.cache_clear()
    try:
        reg = get_registry()
        assert not NAMES & set(reg.methods) and "source-only" in reg.methods
        assert not [v for v in reg.validators if v.startswith("pa-")]
        [note] = [u for u in reg.unavailable if u.plugin == "pytorch-adapt"]
        assert note.kind == "plugin" and "pytorch_adapt not installed" in note.reason
        assert "dabench[pytorch-adapt]" in note.reason
        assert reg.errors == []

        from dabench.cli import main

        assert main(["list", "plugins"]) == 0
        out = capsys.readouterr().out
        [line] = [l for l in out.splitlines() if "unavailable" in l]  # said once, briefly
        assert "unavailable here: the whole plugin: pytorch_adapt not installed" in line and len(line) < 200, line
        assert main(["list", "methods"]) == 0
        assert "pytorch" not in capsys.readouterr().err  # the other commands stay quiet
        with pytest.raises(bridge.BridgeUnavailable, match="pip install --no-deps pytorch-adapt==0.0.83"):
            bridge._pa.__wrapped__()
    finally:
        bridge._validators_module.cache_clear()


@needs_pa
def test_all_algorithms_are_registered_and_validators_say_why_they_are_missing(registry):
    assert NAMES <= set(registry.methods)
    assert {registry.owner[("method", n)] for n in NAMES} == {"pytorch-adapt"}
    pa_validators = {v for v in registry.validators if v.startswith("pa-")}
    notes = {u.name: u.reason for u in registry.unavailable if u.plugin == "pytorch-adapt"}
    # each bridged validator is either registered or reported unavailable with a reason
    assert pa_validators | set(notes) == set(bridge.VALIDATORS)
    if importlib.util.find_spec("torchvision") is None:
        assert set(notes) == set(bridge.VALIDATORS)
        assert all("torchvision" in r for r in notes.values())


@needs_pa
def test_unavailable_parts_are_said_once_in_list_plugins_not_on_every_command():
    from conftest import run_cli

    for what in ("methods", "datasets", "validators"):
        r = run_cli("list", what)
        assert r.returncode == 0 and r.stderr == "", r.stderr
    assert "pa-dann" in run_cli("list", "methods").stdout
    if importlib.util.find_spec("torchvision") is None:
        out = run_cli("list", "plugins").stdout
        [line] = [l for l in out.splitlines() if "unavailable" in l]
        assert "validators pa-im, pa-entropy, pa-bnm, pa-snd" in line and "torchvision" in line


@needs_pa
def test_each_step_is_one_call_of_pytorch_adapts_own_hook(registry, monkeypatch):
    """The bridge drives pytorch-adapt's DANNHook (not a re-implementation):
    one hook call per step, and the hook's optimiser step changes the weights."""
    from pytorch_adapt.hooks import DANNHook

    calls = []
    original = DANNHook.__call__

    def counting(self, *args, **kwargs):
        calls.append(sorted(args[0]))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DANNHook, "__call__", counting)
    task, split = make_task(registry, steps=7, batch_size=16)
    pred = registry.methods["pa-dann"]().fit(task)
    assert len(calls) == 7
    assert {"G", "C", "D", "src_imgs", "src_labels", "target_imgs", "src_domain", "target_domain"} <= set(calls[0])
    assert "target_labels" not in calls[0]
    p = pred.predict_proba(split.target_test.X)
    assert p.shape == (len(split.target_test.X), 2)


@needs_pa
def test_grl_weight_reaches_the_gradient_reversal_layer(registry):
    """pa-dann's grl_weight is pytorch-adapt's gradient_reversal_weight: a
    different weight trains a different model from the same seed; a tiny one
    leaves the classifier close to source-only training."""
    task, split = make_task(registry, steps=25, batch_size=32)
    X = split.target_test.X
    a = registry.methods["pa-dann"](grl_weight=0.01).fit(task).predict_proba(X)
    b = registry.methods["pa-dann"](grl_weight=3.0).fit(task).predict_proba(X)
    c = registry.methods["pa-dann"](grl_weight=0.01).fit(task).predict_proba(X)
    assert np.array_equal(a, c) and not np.allclose(a, b)


@needs_pa
def test_mcd_predicts_with_the_mean_of_its_two_classifiers(registry):
    import torch

    task, split = make_task(registry, steps=5, batch_size=16)
    pred = registry.methods["pa-mcd"](repeat=1).fit(task)
    X = split.target_test.X[:20]
    feats = torch.from_numpy(pred.embed(X))
    heads = pred.classifier.models
    assert len(heads) == 2
    with torch.no_grad():
        expect = torch.stack([torch.softmax(h(feats), 1) for h in heads]).mean(0).numpy()
    np.testing.assert_allclose(pred.predict_proba(X), expect, rtol=1e-5, atol=1e-6)


@needs_pa
@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None,
                    reason="pytorch-adapt's validators import torchvision, which is not installed here")
def test_bridged_validators_score_a_predictor(registry):
    task, _ = make_task(registry, steps=5, batch_size=16, source_lr=0.01)
    pred = registry.methods["source-only"]().fit(task)
    for name in (v for v in registry.validators if v.startswith("pa-")):
        assert np.isfinite(registry.validators[name].score(pred, task))
