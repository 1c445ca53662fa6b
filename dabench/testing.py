"""The conformance kit for method plugins (``dabench.testing``).

Like scikit-learn's ``check_estimator``: a plugin's own test suite calls it
and every failure says what to change.  Two forms:

- a function, for scripts and for ``dabench plugin check``::

      from dabench.testing import check_method
      check_method(MyMethod)          # raises ConformanceError listing what to fix
      results = run_checks(MyMethod)  # or: one CheckResult per check, no raise

- a pytest decorator that yields one test per check, so an author can run
  ``pytest -k check_determinism``::

      from dabench.testing import parametrize_with_checks

      @parametrize_with_checks([MyMethod])
      def test_dabench_conformance(method, check):
          check(method)

The checks (see :data:`CHECKS`), each on a tiny embedded pair with a tiny
budget (a few seconds in all):

- ``check_registration``: the plugin module's ``dabench_methods`` hookimpl
  registers the class, and the host accepts it (name, contract version,
  requirements, hyperparameter declarations, ``fit`` implemented).
- ``check_hyperparameters``: declarations are valid, defaults lie in range,
  the constructor takes exactly the declared names, and points sampled from
  the declared ranges are accepted.
- ``check_fit_predict``: ``fit`` on a tiny task returns a predictor whose
  ``predict_proba`` gives ``(n, n_classes)`` finite probability rows and
  whose ``embed`` gives ``(n, d)`` finite features, for the target domain
  and (where the method has a source model) the source domain.
- ``check_determinism``: two fits with the same seed on CPU give identical
  probabilities (the host seeds Python, NumPy and torch with ``task.seed``
  before ``fit``, exactly as the runner does).
- ``check_no_target_labels``: the task holds no target test labels, and
  the kit holds no real target labels at all: its tiny splits keep *guard
  objects* in their place (target test labels, and target train labels for
  non-oracle methods) that record and refuse any access.  The guards catch
  *accidental* use (a method reading the wrong split, a helper that walks
  into the host's objects); they are not a sandbox.  Plugins are trusted
  code: a method determined to cheat can reload a public dataset itself,
  which is what the leaderboard's suspicion flag is for.
- ``check_failure_is_stored``: when ``fit`` fails (the kit makes reading the
  task's data raise), the host's Runner stores a ``failed`` run with the
  reason and the sweep goes on; the method must not swallow the error or
  raise something (``SystemExit``...) that escapes the host.
- ``check_cpu_placement``: with ``task.device == "cpu"`` every tensor and
  module reachable from the predictor is on the CPU and outputs are NumPy.
- ``check_cuda_placement``: the same on ``cuda`` (skipped, with the reason,
  when torch sees no GPU).
- ``check_track``: the method's track holds (:mod:`dabench.tracks`).  For a
  ``source-free`` method: its task holds no source data and ``fit`` never
  reached for a withheld field; for a ``test-time`` method: its task holds
  neither source data nor the target train split, ``fit`` returns an
  adapter with ``predict_batch``, every batch of the seeded target test
  stream gets valid probabilities, and the predictions of the first half
  of the stream do not change when the second half is replaced by other
  inputs (online: nothing is predicted from batches not yet seen).  A
  ``uda`` method passes trivially.

For a ``test-time`` method, "fit" in the checks above means ``fit`` and then
the host's stream over the tiny task's target test inputs
(:func:`dabench.tracks.run_stream`); its outputs are the stream's
predictions.

Fits run single-threaded (``torch.set_num_threads(1)`` for the duration of
a check: tiny models run several times faster than on a contended thread
pool).  The tiny task is the first of :data:`TINY_TASKS` that the method does not
``skip``: moons, moons on the ``mlp-bn`` backbone (methods adapting batch
normalisation), moons with ``k_target = 2`` (methods needing labelled
target samples), then digits→mnist in native feature spaces (heterogeneous
methods), with and without ``k_target``.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import tempfile
import textwrap
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from .contract import Budget, ContractError, Labeled, Method, Task, validate_method_class

__all__ = [
    "CHECKS",
    "CheckFailed",
    "CheckResult",
    "CheckSkipped",
    "ConformanceError",
    "TINY_TASKS",
    "TinyTask",
    "check_method",
    "parametrize_with_checks",
    "run_checks",
]


class CheckFailed(AssertionError):
    """One check failed; the message says what is wrong and what to change."""


class CheckSkipped(Exception):
    """A check does not apply here (e.g. no GPU); the message says why."""


class ConformanceError(AssertionError):
    """Raised by :func:`check_method` when any check fails; lists every failure."""

    def __init__(self, method: str, failures: list["CheckResult"]) -> None:
        self.method = method
        self.failures = failures
        lines = [f"method {method!r} fails {len(failures)} conformance check(s):"]
        lines += [f"  {r.check}: {r.message}" for r in failures]
        super().__init__("\n".join(lines))


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one check: ``status`` is ``"PASS"``, ``"FAIL"`` or ``"SKIP"``."""

    method: str
    check: str
    status: str
    message: str = ""

    @property
    def passed(self) -> bool:
        return self.status != "FAIL"


# --------------------------------------------------------------------------
# Tiny tasks
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class TinyTask:
    """A tiny embedded pair the kit fits on: pair, protocol and budget."""

    pair: str
    k_target: int = 0
    feature_space: str = "shared"
    max_source: int = 300
    max_target: int = 300
    steps: int = 20
    batch_size: int = 16
    backbone: str = "default"

    @property
    def label(self) -> str:
        extra = []
        if self.backbone != "default":
            extra.append(f"backbone={self.backbone}")
        if self.k_target:
            extra.append(f"k_target={self.k_target}")
        if self.feature_space != "shared":
            extra.append(f"feature_space={self.feature_space}")
        return self.pair + (f" ({', '.join(extra)})" if extra else "")

    def protocol(self):  # -> dabench.data.core.Protocol
        from .data.core import Protocol

        return Protocol(k_target=self.k_target, feature_space=self.feature_space,
                        max_source=self.max_source, max_target=self.max_target)


#: Candidate tiny tasks, in order; the kit uses the first one the method accepts.
TINY_TASKS: tuple[TinyTask, ...] = (
    TinyTask("moons:moons-rot35"),
    TinyTask("moons:moons-rot35", backbone="mlp-bn"),
    TinyTask("moons:moons-rot35", k_target=2),
    TinyTask("digits:mnist", feature_space="native", max_source=200, max_target=200, steps=10),
    TinyTask("digits:mnist", k_target=2, feature_space="native", max_source=200, max_target=200, steps=10),
    TinyTask("digits:mnist", max_source=200, max_target=200, steps=10),
)


@functools.lru_cache(maxsize=1)
def _kit_registry():
    """Embedded datasets, built-in backbones and validators, and no methods:
    the kit does not depend on which other plugins are installed."""
    import dabench_plugins.validators as validators

    from . import backbones
    from .data import embedded
    from .plugins import build_registry, get_plugin_manager

    pm = get_plugin_manager(entrypoints=False)
    pm.register(embedded, name="embedded-data")
    pm.register(backbones, name="backbones")
    pm.register(validators, name="validators")
    return build_registry(pm)


def _make_split(tiny: TinyTask, seed: int):
    reg = _kit_registry()
    s, t = tiny.pair.split(":")
    from .data.core import check_domain_arrays, make_split

    src, tgt = reg.datasets[s], reg.datasets[t]
    return make_split(tiny.pair, src, tgt, check_domain_arrays(src, *src.load(None)),
                      check_domain_arrays(tgt, *tgt.load(None)), seed=seed, protocol=tiny.protocol())


@functools.lru_cache(maxsize=8)
def _split(tiny: TinyTask, seed: int):
    """The tiny split as the kit keeps it: its target labels (test, and train)
    are guards, so no real target label is in the process while fits run."""
    raw = _make_split(tiny, seed)
    return dataclasses.replace(
        raw,
        target_test=_guarded(raw.target_test, "target test labels", _ACCESSES),
        target_train=_guarded(raw.target_train, "target train labels", _ACCESSES),
    )


def _oracle_labels(tiny: TinyTask, seed: int) -> np.ndarray:
    """Target *train* labels for a method declaring ``oracle`` (made on
    demand, never kept)."""
    return np.array(_make_split(tiny, seed).target_train.y)


def _task(cls: type[Method], tiny: TinyTask, seed: int = 0, device: str = "cpu",
          source_model: bool = True, log: list[str] | None = None) -> Task:
    """The task ``cls`` sees on ``tiny``, built as the Runner builds it: the
    host's task, the source model attached, then the view of the method's
    track (whose withheld fields record accesses into ``log``)."""
    from .tracks import task_for_track

    split = _split(tiny, seed)
    track = getattr(cls, "track", "uda")
    task = split.task(seed=seed, device=device, budget=Budget(tiny.steps, tiny.batch_size),
                      backbone=_kit_registry().backbones[tiny.backbone], oracle=False)
    if "oracle" in cls.requires:
        task = dataclasses.replace(task, target_train_labels=_oracle_labels(tiny, seed))
    if source_model and "source_model" in cls.requires and cls.skip(task_for_track(task, track)[0]) is None:
        from .source_model import with_source_model

        task = with_source_model(task)  # as the host hands it: trained on the source, a fresh copy
    return task_for_track(task, track, log)[0]


def choose_task(cls: type[Method]) -> TinyTask:
    """The first of :data:`TINY_TASKS` that ``cls.skip`` accepts."""
    reasons = []
    for tiny in TINY_TASKS:
        try:
            reason = cls.skip(_task(cls, tiny, source_model=False))
        except Exception as exc:
            raise CheckFailed(f"{cls.__name__}.skip(task) raised {_exc_line(exc)}: "
                              "skip must return a reason string or None, never raise") from exc
        if reason is None:
            return tiny
        reasons.append(f"{tiny.label}: {reason}")
    raise CheckFailed("the method skips every tiny task the kit offers (" + "; ".join(reasons) +
                      "); make skip(task) return None for at least one of them, or pass tasks=[TinyTask(...)]")


# --------------------------------------------------------------------------
# Guards for the labels the host keeps
# --------------------------------------------------------------------------


class LabelAccessError(RuntimeError):
    """Raised when a method touches labels the host keeps from it."""


class _LabelGuard:
    """Stands in for a label array the method must never see.  Any use
    (indexing, len, iteration, conversion, attribute access) is recorded
    and raises :class:`LabelAccessError`."""

    __slots__ = ("_what", "_log")

    def __init__(self, what: str, log: list[str]) -> None:
        object.__setattr__(self, "_what", what)
        object.__setattr__(self, "_log", log)

    def _hit(self, how: str):
        log = object.__getattribute__(self, "_log")
        what = object.__getattribute__(self, "_what")
        log.append(f"{what} ({how})")
        raise LabelAccessError(f"the method accessed the {what}, which the host keeps from it")

    def __getattribute__(self, name: str) -> Any:
        if name in ("__class__", "_hit", "__repr__"):
            return object.__getattribute__(self, name)
        return object.__getattribute__(self, "_hit")(f".{name}")

    def __getitem__(self, k: Any) -> Any:
        return self._hit("indexing")

    def __len__(self) -> int:
        return self._hit("len()")

    def __iter__(self):
        return self._hit("iteration")

    def __array__(self, *a: Any, **k: Any) -> Any:
        return self._hit("conversion to an array")

    def __eq__(self, other: Any) -> Any:
        return self._hit("comparison")

    __hash__ = object.__hash__

    def __repr__(self) -> str:
        return "<target labels kept by the host>"


def _guarded(lab: Labeled, what: str, log: list[str]) -> Labeled:
    g = object.__new__(Labeled)
    object.__setattr__(g, "X", lab.X)
    object.__setattr__(g, "y", _LabelGuard(what, log))
    return g


# Kept at module level while a fit runs, so the guards are where a cheating
# method would look (gc, frames, module globals).
_GUARDED_SPLITS: list[Any] = []
#: every recorded access to a guard (a fit reads the entries added while it ran)
_ACCESSES: list[str] = []


@dataclass
class _Fit:
    task: Task | None = None
    tiny: TinyTask | None = None
    predictor: Any = None
    error: BaseException | None = None
    trace: str = ""
    accesses: list[str] = field(default_factory=list)
    #: what the method reached for that its track withholds (dabench.tracks.Withheld)
    withheld: list[str] = field(default_factory=list)
    #: test-time methods: the stream's predictions (rows in target test order) and order
    stream: tuple[np.ndarray, np.ndarray] | None = None


def _is_test_time(cls: type[Method]) -> bool:
    return getattr(cls, "track", "uda") == "test-time"


def _fit(cls: type[Method], tiny: TinyTask, seed: int = 0, device: str = "cpu",
         params: dict | None = None, stream_X: np.ndarray | None = None) -> _Fit:
    """Fit like the Runner does (seed everything, then ``fit``; for a
    test-time method, then the host's stream over the target test inputs,
    or over ``stream_X``) with the host's labels guarded."""
    from .training import seed_everything

    out = _Fit(tiny=tiny)
    guarded = _split(tiny, seed)  # its target labels are guards
    task = _task(cls, tiny, seed, device, log=out.withheld)
    out.task = task
    _GUARDED_SPLITS.append(guarded)
    start = len(_ACCESSES)
    try:
        seed_everything(seed)
        method = cls(**(params or {}))
        out.predictor = method.fit(task)
        if _is_test_time(cls):
            from .tracks import run_stream

            X = guarded.target_test.X if stream_X is None else stream_X
            out.stream = run_stream(out.predictor, X, seed=seed, batch_size=tiny.batch_size,
                                    n_classes=guarded.n_classes)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - reported as a check failure
        out.error = exc
        out.trace = traceback.format_exc()
    finally:
        _GUARDED_SPLITS.remove(guarded)
        out.accesses = _ACCESSES[start:]
        del _ACCESSES[start:]
    return out


_FIT_CACHE: dict[tuple, _Fit] = {}


def _cached_fit(cls: type[Method], ctx: "_Context", device: str = "cpu") -> _Fit:
    key = (id(cls), ctx.tiny, device)
    hit = _FIT_CACHE.get(key)
    if hit is None or hit.__dict__.get("_cls") is not cls:
        if len(_FIT_CACHE) > 16:
            _FIT_CACHE.clear()
        hit = _fit(cls, ctx.tiny, device=device)
        hit.__dict__["_cls"] = cls
        _FIT_CACHE[key] = hit
    return hit


def _short_trace(trace: str, frames: int = 6) -> str:
    """The last ``frames`` frames of a traceback and its final line."""
    lines = trace.rstrip().splitlines()
    starts = [i for i, l in enumerate(lines) if l.startswith('  File "')]
    if len(starts) > frames:
        lines = [lines[0], "  ..."] + lines[starts[-frames]:]
    return "\n".join(lines[:60])


def _exc_line(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def _fitted(cls: type[Method], ctx: "_Context", device: str = "cpu") -> _Fit:
    f = _cached_fit(cls, ctx, device)
    if f.error is not None:
        raise CheckFailed(f"fit failed on {ctx.tiny.label} with {_exc_line(f.error)} "
                          f"(see check_fit_predict for the traceback); fix fit first")
    return f


# --------------------------------------------------------------------------
# The checks
# --------------------------------------------------------------------------


@dataclass
class _Context:
    plugin: ModuleType | None = None
    tasks: Sequence[TinyTask] | None = None
    _tiny: TinyTask | None = None
    cls: type[Method] | None = None

    @property
    def tiny(self) -> TinyTask:
        if self._tiny is None:
            assert self.cls is not None
            if self.tasks:
                self._tiny = self.tasks[0]
            else:
                self._tiny = choose_task(self.cls)
        return self._tiny


def check_registration(cls: type[Method], ctx: _Context) -> str:
    """The plugin's ``dabench_methods`` hookimpl registers ``cls`` and the host accepts it."""
    from .plugins import build_registry, get_plugin_manager, get_registry

    try:
        validate_method_class(cls)
    except ContractError as e:
        raise CheckFailed(f"the host rejects the class: {e}") from None
    module = ctx.plugin
    if module is None:
        module = importlib.import_module(cls.__module__)
    if not callable(getattr(module, "dabench_methods", None)):
        # the class may be registered by another module of its package
        installed = get_registry()
        owner = installed.owner.get(("method", cls.name))
        if installed.methods.get(cls.name) is cls and owner:
            return f"registered by installed plugin {owner!r}"
        raise CheckFailed(
            f"module {module.__name__} has no dabench_methods hook; add\n"
            f"    @hookimpl\n    def dabench_methods(register):\n        register({cls.__name__})\n"
            f"(with `from dabench import hookimpl`) and list the module in the `dabench` entry-point group")
    pm = get_plugin_manager(entrypoints=False)
    try:
        pm.register(module, name="plugin-under-test")
    except Exception as exc:
        raise CheckFailed(f"pluggy refuses module {module.__name__}: {_exc_line(exc)}; "
                          "hook functions must be named after dabench's hooks (see dabench/hookspecs.py)") from None
    if not pm.hook.dabench_methods.get_hookimpls():
        raise CheckFailed(f"{module.__name__}.dabench_methods is not marked as a hook implementation: "
                          "decorate it with @dabench.hookimpl")
    reg = build_registry(pm)
    errors = [e.message for e in reg.errors]
    if errors:
        raise CheckFailed("registration failed: " + "; ".join(errors))
    if reg.methods.get(cls.name) is not cls:
        found = sorted(reg.methods)
        raise CheckFailed(f"{module.__name__}.dabench_methods registers {found}, not {cls.__name__} "
                          f"({cls.name!r}); call register({cls.__name__}) in it")
    return f"registered by {module.__name__}.dabench_methods"


def check_hyperparameters(cls: type[Method], ctx: _Context) -> str:
    """Declarations valid, defaults in range, constructor takes the declared names only."""
    for k, hp in cls.hyperparameters.items():
        try:
            hp.check_declaration(k)
        except ContractError as e:
            raise CheckFailed(f"{e}; fix its declaration in {cls.__name__}.hyperparameters") from None
        if not k.isidentifier():
            raise CheckFailed(f"hyperparameter name {k!r} is not a Python identifier; rename it")
        if k in dir(Method):
            raise CheckFailed(f"hyperparameter {k!r} shadows Method.{k}; rename it")
    try:
        m = cls()
    except Exception as exc:
        raise CheckFailed(f"{cls.__name__}() with default hyperparameters raised {_exc_line(exc)}; "
                          "__init__ must accept only the declared hyperparameters as keyword arguments with defaults") from None
    expected = {k: hp.default for k, hp in cls.hyperparameters.items()}
    got = m.get_params()
    if set(got) != set(expected):
        raise CheckFailed(f"get_params() returns {sorted(got)}, expected exactly the declared {sorted(expected)}; "
                          "do not override get_params, and call super().__init__(**params) if you override __init__")
    for k, v in expected.items():
        if getattr(m, k) != v and not (isinstance(v, float) and np.isnan(v)):
            raise CheckFailed(f"the default of {k!r} is {v!r} but the constructed method has {getattr(m, k)!r}")
    try:
        cls(__no_such_hyperparameter__=1)
    except ContractError:
        pass
    except Exception as exc:
        raise CheckFailed(f"an unknown keyword raised {_exc_line(exc)} instead of dabench.ContractError; "
                          "call super().__init__(**params) so the host validates parameters") from None
    else:
        raise CheckFailed("the constructor accepts an undeclared hyperparameter; "
                          "call super().__init__(**params) so the host validates parameters")
    rng = np.random.default_rng(0)
    for i in range(5):
        point = {k: hp.sample(rng) for k, hp in sorted(cls.hyperparameters.items())}
        try:
            params = cls(**point).get_params()
        except Exception as exc:
            raise CheckFailed(f"a point sampled from the declared ranges, {point}, is rejected: {_exc_line(exc)}; "
                              "make the ranges match what the method accepts") from None
        if params != {k: cls.hyperparameters[k].validate(k, v) for k, v in point.items()}:
            raise CheckFailed(f"get_params() does not round-trip the sampled point {point}")
    return f"{len(cls.hyperparameters)} hyperparameters, defaults in range, 5 sampled points accepted"


def _check_outputs(pred: Any, X: np.ndarray, domain: str, n_classes: int, where: str) -> None:
    if not callable(getattr(pred, "predict_proba", None)) or not callable(getattr(pred, "embed", None)):
        raise CheckFailed(f"fit returned {type(pred).__name__}, which lacks predict_proba/embed; "
                          "return a dabench.training.TorchPredictor or an object with "
                          "predict_proba(X, domain) and embed(X, domain)")
    try:
        p = pred.predict_proba(X, domain=domain)
    except Exception as exc:
        raise CheckFailed(f"predict_proba({where}, domain={domain!r}) raised {_exc_line(exc)}") from None
    if not isinstance(p, np.ndarray):
        raise CheckFailed(f"predict_proba({where}) returned {type(p).__name__}; return a NumPy array "
                          "(e.g. tensor.detach().cpu().numpy())")
    if p.shape != (len(X), n_classes):
        raise CheckFailed(f"predict_proba({where}, domain={domain!r}) has shape {p.shape}, expected {(len(X), n_classes)}")
    if not np.isfinite(p).all():
        raise CheckFailed(f"predict_proba({where}) has non-finite values")
    if (p < -1e-6).any() or not np.allclose(p.sum(1), 1.0, atol=1e-3):
        raise CheckFailed(f"predict_proba({where}) rows are not probabilities (negative, or rows do not sum to 1); "
                          "apply softmax to logits")
    try:
        z = pred.embed(X, domain=domain)
    except Exception as exc:
        raise CheckFailed(f"embed({where}, domain={domain!r}) raised {_exc_line(exc)}") from None
    if not isinstance(z, np.ndarray) or z.ndim != 2 or len(z) != len(X):
        raise CheckFailed(f"embed({where}) returned {getattr(z, 'shape', type(z).__name__)}; "
                          f"expected a 2-d NumPy array with {len(X)} rows")
    if not np.isfinite(z).all():
        raise CheckFailed(f"embed({where}) has non-finite values")
    one = pred.predict_proba(X[:1], domain=domain)
    if np.asarray(one).shape != (1, n_classes):
        raise CheckFailed(f"predict_proba on a single row has shape {np.asarray(one).shape}, expected (1, {n_classes})")


def _source_applicable(cls: type[Method], task: Task) -> bool:
    # an oracle trained on target inputs has no source model on a heterogeneous pair
    return task.same_feature_space or "oracle" not in cls.requires


def check_fit_predict(cls: type[Method], ctx: _Context) -> str:
    """``fit`` returns a predictor with correct shapes and valid probabilities."""
    f = _cached_fit(cls, ctx)
    if f.error is not None:
        raise CheckFailed(f"fit raised {_exc_line(f.error)} on the tiny task {ctx.tiny.label}:\n"
                          + textwrap.indent(_short_trace(f.trace), "    "))
    split = _split(ctx.tiny, 0)
    n = split.n_classes
    if _is_test_time(cls):
        # run_stream checked every batch's probabilities as the host does
        n_batches = -(-len(split.target_test) // ctx.tiny.batch_size)
        msg = f"{ctx.tiny.label}: {n_batches} stream batches, probabilities valid"
        if callable(getattr(f.predictor, "predict_proba", None)):
            _check_outputs(f.predictor, split.source_test.X, "source", n, "source test inputs (after the stream)")
            msg += "; the adapted model's source probabilities and embeddings valid"
        return msg
    _check_outputs(f.predictor, split.target_test.X, "target", n, "target test inputs")
    domains = "target"
    if _source_applicable(cls, f.task):
        _check_outputs(f.predictor, split.source_test.X, "source", n, "source test inputs")
        domains = "target and source"
    return f"{ctx.tiny.label}: {domains} probabilities and embeddings valid"


def check_determinism(cls: type[Method], ctx: _Context) -> str:
    """Same seed on CPU, same probabilities."""
    a = _fitted(cls, ctx)
    b = _fit(cls, ctx.tiny)
    if b.error is not None:
        raise CheckFailed(f"a second fit with the same seed raised {_exc_line(b.error)}; fit must not keep state "
                          "between calls")
    X = _split(ctx.tiny, 0).target_test.X
    if _is_test_time(cls):
        pa, pb = a.stream[0], b.stream[0]
    else:
        pa, pb = a.predictor.predict_proba(X, domain="target"), b.predictor.predict_proba(X, domain="target")
    if not np.array_equal(np.asarray(pa), np.asarray(pb)):
        diff = float(np.abs(np.asarray(pa, dtype=np.float64) - np.asarray(pb, dtype=np.float64)).max())
        raise CheckFailed(f"two fits with seed 0 on CPU differ (max |dp| = {diff:.3g}); derive every random "
                          "stream from task.seed (dabench.training.seed_everything, stream_seed, TensorBatches(seed=...)) "
                          "and never use unseeded generators or the clock")
    return "two seeded CPU fits give identical probabilities"


def _reachable(obj: Any, limit: int = 200_000) -> dict[int, Any]:
    seen: dict[int, Any] = {}
    stack = [(obj, 0)]
    while stack and len(seen) < limit:
        o, depth = stack.pop()
        if id(o) in seen or depth > 12:
            continue
        seen[id(o)] = o
        kids: list[Any] = []
        if isinstance(o, dict):
            kids = list(o.keys()) + list(o.values())
        elif isinstance(o, (list, tuple, set, frozenset)):
            kids = list(o)
        elif isinstance(o, (str, bytes, int, float, bool, type(None), type, ModuleType)):
            kids = []
        elif isinstance(o, np.ndarray):
            kids = [o.base] if o.base is not None else []
        else:
            for name in getattr(type(o), "__slots__", ()):
                try:
                    kids.append(object.__getattribute__(o, name))
                except AttributeError:
                    pass
            try:
                kids += list(object.__getattribute__(o, "__dict__").values())
            except AttributeError:
                pass
            closure = getattr(o, "__closure__", None) if not isinstance(o, _LabelGuard) else None
            if closure:
                kids += [c.cell_contents for c in closure if c is not None]
        stack.extend((k, depth + 1) for k in kids)
    return seen


def check_no_target_labels(cls: type[Method], ctx: _Context) -> str:
    """The task holds no target test labels; the method never touches the ones the host keeps."""
    f = _cached_fit(cls, ctx)
    split = _split(ctx.tiny, 0)
    for o in _reachable(f.task).values():
        if o is split.target_test or o is split.target_test.y or isinstance(o, _LabelGuard):
            raise CheckFailed("the task reaches the host's target test labels (a host bug, not yours): report it")
    if f.accesses:
        raise CheckFailed(f"fit touched {sorted(set(f.accesses))}; a method may use only the Task it is given "
                          "(target_train has inputs only; use task.target_labeled when the protocol gives k labels)")
    if f.error is not None and isinstance(f.error, LabelAccessError):
        raise CheckFailed(str(f.error))
    if f.error is not None:
        raise CheckFailed(f"fit failed ({_exc_line(f.error)}), so label access could not be checked; fix fit first")
    return "target test labels are not in the task and were never touched"


class _InjectedFailure(RuntimeError):
    pass


_INJECTED = "dabench-kit injected failure: reading the task's data raised"


class _Poison:
    """Stands in for the task's data: any attribute access raises."""

    def __init__(self, what: str) -> None:
        self._what = what

    def __getattr__(self, name: str) -> Any:
        raise _InjectedFailure(f"{_INJECTED} ({self.__dict__.get('_what')}.{name})")

    def __len__(self) -> int:
        raise _InjectedFailure(_INJECTED)


def check_failure_is_stored(cls: type[Method], ctx: _Context) -> str:
    """A failing ``fit`` becomes a stored ``failed`` run; the sweep goes on."""
    from .plugins import Registry
    from .runner import Runner
    from .store import RunStore
    from .suite import parse_suite

    escaped: list[BaseException] = []

    class Failing(cls):  # type: ignore[misc, valid-type]
        def fit(self, task: Task) -> Any:
            poisoned = dataclasses.replace(
                task, source_train=_Poison("source_train"), source_val=_Poison("source_val"),
                target_train=_Poison("target_train"),
                target_labeled=None if task.target_labeled is None else _Poison("target_labeled"),
                target_train_labels=None if task.target_train_labels is None else _Poison("target_train_labels"),
                source_model=None if task.source_model is None else _Poison("source_model"),
            )
            try:
                return super().fit(poisoned)
            except KeyboardInterrupt:
                raise
            except Exception:
                raise
            except BaseException as exc:  # noqa: BLE001 - SystemExit & co.: noted, then handled by the host
                escaped.append(exc)
                raise

    Failing.__name__ = cls.__name__
    kit = _kit_registry()
    reg = Registry(methods={cls.name: Failing}, datasets=dict(kit.datasets), validators=dict(kit.validators),
                   backbones=dict(kit.backbones))
    t = ctx.tiny
    suite_text = textwrap.dedent(f"""
        name = "kit"
        seeds = 2
        pairs = ["{t.pair}"]
        backbone = "{t.backbone}"
        [protocol]
        k_target = {t.k_target}
        feature_space = "{t.feature_space}"
        max_source = {t.max_source}
        max_target = {t.max_target}
        [budget]
        steps = {t.steps}
        batch_size = {t.batch_size}
        [methods.{cls.name}]
        """)
    from .executors import InProcessExecutor

    with tempfile.TemporaryDirectory(prefix="dabench-kit-") as tmp:
        path = Path(tmp) / "kit.toml"
        path.write_text(suite_text, encoding="utf-8")
        suite = parse_suite(path, reg)
        store = RunStore(Path(tmp) / "res")
        try:
            # the Failing subclass lives in this process only: run it here
            summary = Runner(reg, store, device="cpu").run(suite, executor=InProcessExecutor())
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # noqa: BLE001
            store.close()
            raise CheckFailed(f"fit raised {_exc_line(exc)}, which escapes the host's per-run error handling and "
                              "stops the whole sweep; raise an Exception subclass (e.g. RuntimeError) instead") from None
        rows = store.rows()
        store.close()
    statuses = [r["status"] for r in rows]
    if len(rows) != 2:
        raise CheckFailed(f"expected 2 stored runs (2 seeds), found {len(rows)}")
    if any(s == "ok" for s in statuses):
        raise CheckFailed("fit returned a predictor although reading the task's data raised: it swallows errors. "
                          "Let exceptions propagate so the host records the run as failed with its reason")
    if statuses != ["failed", "failed"] or summary.failed != 2:
        raise CheckFailed(f"expected both runs stored as failed, got {statuses}")
    if not all(r["reason"] for r in rows):
        raise CheckFailed("a failed run was stored without a reason")
    if escaped:
        raise CheckFailed(f"fit raised {_exc_line(escaped[0])} when reading the task's data raised; dabench stores "
                          f"the run as failed, but a caller using the method outside dabench loses its whole "
                          f"program: raise an Exception subclass (e.g. RuntimeError) instead")
    return f"both failing runs stored as failed ({rows[0]['reason'][:60]}...)"


def _torch_objects(pred: Any) -> tuple[list[Any], list[Any]]:
    import torch

    tensors, modules = [], []
    for o in _reachable(pred).values():
        if isinstance(o, torch.nn.Module):
            modules.append(o)
        elif isinstance(o, torch.Tensor):
            tensors.append(o)
    for m in modules:
        tensors += list(m.parameters()) + list(m.buffers())
    return tensors, modules


def _check_placement(cls: type[Method], ctx: _Context, device: str) -> str:
    import torch

    f = _fitted(cls, ctx, device)
    tensors, modules = _torch_objects(f.predictor)
    want = torch.device(device).type
    wrong = sorted({str(t.device) for t in tensors if t.device.type != want})
    if wrong:
        raise CheckFailed(f"with task.device={device!r} the predictor holds tensors on {wrong}; "
                          "put every module and tensor on dabench.training.resolve_device(task.device), "
                          "never hard-code .cuda() or 'cpu'")
    split = _split(ctx.tiny, 0)
    if _is_test_time(cls):  # one more batch through the adapter (the cached fit's stream is already recorded)
        p = f.predictor.predict_batch(np.array(split.target_test.X[:8], copy=True))
    else:
        p = f.predictor.predict_proba(split.target_test.X[:8], domain="target")
    if not isinstance(p, np.ndarray):
        raise CheckFailed(f"predict_proba returned {type(p).__name__} on {device}; return NumPy arrays")
    return f"{len(tensors)} tensors in {len(modules)} modules, all on {want}"


def check_cpu_placement(cls: type[Method], ctx: _Context) -> str:
    """With ``task.device == "cpu"`` everything stays on the CPU."""
    return _check_placement(cls, ctx, "cpu")


def check_cuda_placement(cls: type[Method], ctx: _Context) -> str:
    """With ``task.device == "cuda"`` the model lives on the GPU (skipped without one)."""
    import torch

    if not torch.cuda.is_available():
        raise CheckSkipped(f"no CUDA device visible to torch {torch.__version__}; run the kit on a GPU machine "
                           "to check CUDA placement")
    return _check_placement(cls, ctx, "cuda")


def check_track(cls: type[Method], ctx: _Context) -> str:
    """The method's track holds: it never sees, nor reaches for, what its track withholds."""
    from .contract import TRACKS
    from .tracks import TrackViolation

    track = getattr(cls, "track", "uda")
    if track == "uda":
        return "uda: labelled source + unlabelled target train (nothing withheld)"
    f = _cached_fit(cls, ctx)
    split = _split(ctx.tiny, 0)
    held = [split.source_train, split.source_val, split.source_test]
    if track == "test-time":
        held += [split.target_train, split.target_test]
    forbidden = {id(o) for lab in held for o in (lab, lab.X, lab.y)}
    for o in _reachable(f.task).values():
        if id(o) in forbidden:
            raise CheckFailed(f"the {track} task reaches data the track withholds (a host bug, not yours): report it")
    if f.withheld:
        raise CheckFailed(f"fit reached for {sorted(set(f.withheld))}, which the {track} track withholds "
                          f"({TRACKS[track]}); use only task.source_model"
                          + ("" if track == "test-time" else " and task.target_train"))
    if isinstance(f.error, TrackViolation):
        raise CheckFailed(str(f.error))
    if f.error is not None:
        raise CheckFailed(f"fit failed ({_exc_line(f.error)}), so the track could not be checked; fix fit first")
    if track == "source-free":
        return "source-free: no source data in the task, none reached for"
    # online: the first half of the stream is predicted the same whatever comes after it
    X = np.asarray(split.target_test.X)
    order = f.stream[1]
    bs = ctx.tiny.batch_size
    n_batches = -(-len(X) // bs)
    if n_batches < 2:
        raise CheckSkipped(f"the tiny task's stream has {n_batches} batch: nothing to check online behaviour on")
    head = order[: (n_batches // 2) * bs]
    tail = order[len(head):]
    other = np.array(X, copy=True)
    donor = np.asarray(split.target_train.X)
    other[tail] = donor[np.arange(len(tail)) % len(donor)]
    g = _fit(cls, ctx.tiny, stream_X=other)
    if g.error is not None:
        raise CheckFailed(f"a second fit and stream with the same seed raised {_exc_line(g.error)}")
    if not np.array_equal(f.stream[0][head], g.stream[0][head]):
        raise CheckFailed("the predictions for the first half of the test stream changed when the second half was "
                          "replaced by other inputs: a test-time method may use only the batches delivered so far "
                          "(predict each batch in predict_batch, before or while adapting on it)")
    return (f"test-time: no source data or target train split in the task, none reached for; {n_batches} stream "
            f"batches; the first {n_batches // 2} are predicted the same whatever follows them")


#: Every check, in the order they run: ``(name, function)``.
CHECKS: tuple[tuple[str, Callable[[type[Method], _Context], str]], ...] = (
    ("check_registration", check_registration),
    ("check_hyperparameters", check_hyperparameters),
    ("check_fit_predict", check_fit_predict),
    ("check_determinism", check_determinism),
    ("check_no_target_labels", check_no_target_labels),
    ("check_failure_is_stored", check_failure_is_stored),
    ("check_cpu_placement", check_cpu_placement),
    ("check_cuda_placement", check_cuda_placement),
    ("check_track", check_track),
)


# --------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------


def _resolve(method: Any) -> type[Method]:
    if isinstance(method, str):
        from .plugins import get_registry

        reg = get_registry()
        if method not in reg.methods:
            raise KeyError(f"no method {method!r} is registered; installed: {sorted(reg.methods)}")
        return reg.methods[method]
    return method


def run_one_check(method: Any, check: str, *, plugin: ModuleType | None = None,
                  tasks: Sequence[TinyTask] | None = None, _ctx: _Context | None = None) -> CheckResult:
    """Run the check named ``check`` on ``method`` (a class or a registered name)."""
    cls = _resolve(method)
    fn = dict(CHECKS).get(check)
    if fn is None:
        raise KeyError(f"no check {check!r}; checks: {[n for n, _ in CHECKS]}")
    ctx = _ctx or _Context(plugin=plugin, tasks=tasks)
    ctx.cls = cls
    name = getattr(cls, "name", "") or getattr(cls, "__name__", repr(cls))
    import torch

    threads = torch.get_num_threads()
    try:
        if check not in ("check_registration", "check_hyperparameters"):
            validate_method_class(cls)
        # tiny models: one thread is several times faster than a contended pool
        torch.set_num_threads(1)
        msg = fn(cls, ctx)
        return CheckResult(name, check, "PASS", msg or "")
    except CheckSkipped as e:
        return CheckResult(name, check, "SKIP", str(e))
    except (CheckFailed, ContractError) as e:
        return CheckResult(name, check, "FAIL", str(e))
    except KeyboardInterrupt:
        raise
    except Exception as e:  # a bug surfaced by the check itself
        return CheckResult(name, check, "FAIL", f"{_exc_line(e)}\n" + textwrap.indent(_short_trace(traceback.format_exc()), "    "))
    finally:
        torch.set_num_threads(threads)


def run_checks(method: Any, *, checks: Iterable[str] | None = None, plugin: ModuleType | None = None,
               tasks: Sequence[TinyTask] | None = None) -> list[CheckResult]:
    """Run the checks (all by default) on ``method``; one :class:`CheckResult` each, no raise.

    :param method: a :class:`dabench.Method` subclass, or the name of a registered method.
    :param checks: names from :data:`CHECKS` (default: all).
    :param plugin: the module whose ``dabench_methods`` registers the class
        (default: the module that defines it).
    :param tasks: tiny tasks to use instead of the first of :data:`TINY_TASKS` the method accepts.
    """
    names = list(checks) if checks is not None else [n for n, _ in CHECKS]
    cls = _resolve(method)
    ctx = _Context(plugin=plugin, tasks=tasks)
    out = [run_one_check(cls, n, _ctx=ctx) for n in names]
    _FIT_CACHE.clear()
    return out


def check_method(method: Any, *, checks: Iterable[str] | None = None, plugin: ModuleType | None = None,
                 tasks: Sequence[TinyTask] | None = None) -> list[CheckResult]:
    """Run the checks and raise :class:`ConformanceError` listing every failure.

    Returns the results (passes and skips) when nothing failed.
    """
    results = run_checks(method, checks=checks, plugin=plugin, tasks=tasks)
    failed = [r for r in results if r.status == "FAIL"]
    if failed:
        raise ConformanceError(failed[0].method, failed)
    return results


def _pytest_check(name: str, plugin: ModuleType | None, tasks: Sequence[TinyTask] | None) -> Callable[[Any], None]:
    def check(method: Any) -> None:
        import pytest

        r = run_one_check(method, name, plugin=plugin, tasks=tasks)
        if r.status == "SKIP":
            pytest.skip(r.message)
        if r.status == "FAIL":
            raise CheckFailed(f"{r.method}: {name}: {r.message}")

    check.__name__ = name
    return check


def parametrize_with_checks(methods: Iterable[Any], *, plugin: ModuleType | None = None,
                            tasks: Sequence[TinyTask] | None = None, checks: Iterable[str] | None = None):
    """A ``pytest.mark.parametrize`` over (method, check): one test per check.

    Test ids are ``<method name>-<check name>`` so ``pytest -k check_determinism``
    selects one check.  ``methods`` are classes or registered method names::

        @parametrize_with_checks([MyMethod])
        def test_dabench_conformance(method, check):
            check(method)
    """
    import pytest

    names = list(checks) if checks is not None else [n for n, _ in CHECKS]
    params, ids = [], []
    for m in methods:
        label = m if isinstance(m, str) else (getattr(m, "name", "") or m.__name__)
        for n in names:
            params.append((m, _pytest_check(n, plugin, tasks)))
            ids.append(f"{label}-{n}")
    return pytest.mark.parametrize("method, check", params, ids=ids)
