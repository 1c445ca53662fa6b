"""A suite file's names, read without the registry: what the CLI checks
before any plugin (or torch, or NumPy) loads, so that a mistyped
``--methods``/``--pairs`` or suite path is refused at once with the closest
names.  :mod:`dabench.suite` parses and validates the whole file.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from .names import closest, did_you_mean

__all__ = ["SuiteError", "SuiteOutline", "check_filters", "normalize_pair", "outline", "read_toml"]


#: the most seeds a suite or ``--seeds`` may ask for
MAX_SEEDS = 1000


class SuiteError(ValueError):
    """A malformed suite; ``str()`` names the file, the key and what is expected."""

    def __init__(self, path: str | Path, key: str, message: str) -> None:
        self.path, self.key, self.message = str(path), key, message
        super().__init__(f"{self.path}: {key}: {message}" if key else f"{self.path}: {message}")


def normalize_pair(name: str) -> str:
    """``moons→moons-rot35`` (as progress lines and reports print a pair) is
    accepted for ``moons:moons-rot35``."""
    return name.strip().replace("→", ":", 1)


def _unknown(path: Path, key: str, what: str, bad: list[str], known: list[str]) -> SuiteError:
    hints = [h for h in (did_you_mean(b, known) for b in bad) if h]
    names = ", ".join(repr(b) for b in bad)
    verb = "is not a" if len(bad) == 1 else "are not"
    return SuiteError(path, key, f"{names} {verb} {what}{'' if len(bad) == 1 else 's'} of this suite"
                                 f"{'; ' + ' '.join(hints) if hints else ''} (it has: {', '.join(sorted(set(known)))})")


def check_filters(path: str | Path, suite_methods: list[str], suite_pairs: list[str],
                  methods: list[str] | None = None, pairs: list[str] | None = None,
                  seeds: int | None = None) -> None:
    """Check the CLI's ``--methods``/``--pairs``/``--seeds`` against a suite's
    method and pair names; raise :class:`SuiteError` naming the closest ones.
    Needs no registry (see :func:`outline`), so a typo is refused before any
    plugin loads."""
    path = Path(path)
    if methods:
        bad = [m for m in methods if m not in suite_methods]
        if bad:
            raise _unknown(path, "--methods", "method", bad, suite_methods)
    if pairs:
        bad = [p for p in pairs if normalize_pair(p) not in suite_pairs]
        if bad:
            raise _unknown(path, "--pairs", "pair", bad, suite_pairs)
    if seeds is not None and not 1 <= seeds <= MAX_SEEDS:
        raise SuiteError(path, "--seeds", f"expected an integer in [1, {MAX_SEEDS}]")


@dataclass(frozen=True)
class SuiteOutline:
    """A suite file's names, read without the registry (see :func:`outline`)."""

    path: Path
    name: str | None
    methods: list[str]
    pairs: list[str]


def read_toml(path: Path) -> dict:
    """The parsed TOML of a suite file; :class:`SuiteError` when it is missing
    (naming the closest suite files beside it) or is not TOML."""
    if not path.is_file():
        files = {p.name: str(p) for p in path.parent.glob("*.toml")} if path.parent.is_dir() else {}
        near = [files[n] for n in closest(path.name, files)]
        hint = f"; did you mean {' or '.join(repr(n) for n in near)}?" if near else ""
        raise SuiteError(path, "", "no such suite file" + hint)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise SuiteError(path, "", f"not valid TOML: {e}") from None
    except UnicodeDecodeError:
        raise SuiteError(path, "", "not a UTF-8 text file") from None


def outline(path: str | Path) -> SuiteOutline:
    """The suite's name, method names and pair names, read from the TOML
    alone (no plugin loaded, no schema check beyond what is needed to find
    them: :func:`parse_suite` checks the rest).  Raises :class:`SuiteError`
    when the file is missing or is not TOML."""
    path = Path(path)
    raw = read_toml(path)
    name = raw.get("name") if isinstance(raw.get("name"), str) else None
    methods = list(raw["methods"]) if isinstance(raw.get("methods"), dict) else []
    pairs = []
    for entry in raw.get("pairs", []) if isinstance(raw.get("pairs"), list) else []:
        p = entry.get("pair") if isinstance(entry, dict) else entry
        if isinstance(p, str):
            pairs.append(p)
    return SuiteOutline(path, name, methods, pairs)
