"""The plugin author's guide stays true to the code (like datasette's test_docs)."""

from __future__ import annotations

import dataclasses
import inspect
import re

import pytest

import dabench.hookspecs as hookspecs
from conftest import ROOT
from dabench import REQUIREMENTS, Task
from dabench.testing import CHECKS

GUIDE = ROOT / "docs" / "plugin-guide.md"


def _hookspecs() -> dict[str, str]:
    """{hook name: 'name(param: annotation, ...) -> return'} from hookspecs.py."""
    out = {}
    for name, fn in vars(hookspecs).items():
        if callable(fn) and hasattr(fn, "dabench_spec"):
            sig = inspect.signature(fn)
            params = ", ".join(f"{p.name}: {p.annotation}" for p in sig.parameters.values())
            out[name] = f"{name}({params}) -> {sig.return_annotation}"
    return out


@pytest.fixture(scope="module")
def guide() -> str:
    return GUIDE.read_text(encoding="utf-8")


def _documented(guide: str) -> dict[str, str]:
    heads = re.findall(r"^#{2,4} `(dabench_\w+)\((.*)`\s*$", guide, flags=re.M)
    return {name: f"{name}({rest}" for name, rest in heads}


@pytest.mark.parametrize("hook", sorted(_hookspecs()))
def test_every_hookspec_is_documented_with_its_exact_signature(guide, hook):
    documented = _documented(guide)
    assert hook in documented, f"docs/plugin-guide.md has no '### `{_hookspecs()[hook]}`' section"
    assert documented[hook] == _hookspecs()[hook], (
        f"the guide documents {documented[hook]!r} but hookspecs.py says {_hookspecs()[hook]!r}")


def test_no_documented_hook_is_stale(guide):
    stale = set(_documented(guide)) - set(_hookspecs())
    assert not stale, f"docs/plugin-guide.md documents hooks that do not exist: {sorted(stale)}"


def test_the_contract_and_the_kit_are_documented(guide):
    for f in dataclasses.fields(Task):
        assert f"`task.{f.name}`" in guide, f"Task field {f.name!r} is not in the guide's contract table"
    for req in REQUIREMENTS:
        assert f"`{req}`" in guide, f"requirement {req!r} is not documented"
    for name, _ in CHECKS:
        assert f"| `{name}` |" in guide, f"conformance check {name!r} is not in the guide's table"


def _signature(name: str, obj) -> str:
    """``name(a: T, b: T = d, *, c: T) -> R`` as the guide writes it (a
    class: its constructor, without ``self`` and return)."""
    fn = obj.__init__ if inspect.isclass(obj) else obj
    sig = inspect.signature(fn)
    parts, star = [], False
    for p in sig.parameters.values():
        if p.name == "self":
            continue
        if p.kind is p.KEYWORD_ONLY and not star:
            parts.append("*")
            star = True
        ann = p.annotation if isinstance(p.annotation, str) else inspect.formatannotation(p.annotation)
        text = f"{p.name}: {ann}"
        if p.default is not p.empty:
            text += f" = {p.default!r}"
        parts.append(text)
    out = f"{name}({', '.join(parts)})"
    if not inspect.isclass(obj):
        ret = sig.return_annotation
        out += f" -> {ret if isinstance(ret, str) else inspect.formatannotation(ret)}"
    return out


HELPERS = ("seed_everything", "stream_seed", "resolve_device", "TensorBatches", "check_finite", "progress",
           "annealed_lr", "grl_lambda", "grad_reverse", "make_sgd", "backbone_param_groups", "set_lr", "amp_context",
           "fit_supervised", "TorchPredictor")


@pytest.mark.parametrize("name", HELPERS)
def test_every_training_helper_is_documented_with_its_exact_signature(guide, name):
    import dabench.training as training

    section = guide.split("### Training helpers", 1)[1].split("\n## ", 1)[0]
    documented = re.findall(rf"^- `({name}\(.*?\)(?: -> [^`]+)?)`", section, flags=re.M)
    expected = _signature(name, getattr(training, name))
    assert documented == [expected], f"the guide's helper reference should read: - `{expected}`"


@pytest.mark.parametrize("name", ["Float", "Int", "Choice", "Bool"])
def test_hyperparameter_declarations_are_documented_with_their_signatures(guide, name):
    import dabench

    assert _signature(name, getattr(dabench, name)) in guide


def test_the_readme_plugin_snippet_runs_as_written(registry):
    """The README's plugin example is complete Python: its imports cover
    what it uses, and its method fits and predicts on an embedded pair."""
    from conftest import make_task

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    [code] = [b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "class MyMethod(Method)" in b]
    namespace: dict = {"__name__": "readme_snippet"}
    exec(compile(code, "README.md", "exec"), namespace)
    task, split = make_task(registry, steps=2, batch_size=16)
    predictor = namespace["MyMethod"]().fit(task)
    p = predictor.predict_proba(split.target_test.X)
    assert p.shape == (len(split.target_test.X), task.n_classes)
