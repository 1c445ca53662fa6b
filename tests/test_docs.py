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
