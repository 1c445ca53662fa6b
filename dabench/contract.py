"""The method contract: what a method may see (`Task`), what it must be
(`Method`), and what it returns (`Predictor`).

The contract is versioned by :data:`CONTRACT_VERSION`.  A plugin may declare
``requires_contract = "1"`` on its method classes; the host refuses a method
written for another major version with a message naming the plugin.

Target test labels never enter a :class:`Task`.  The host keeps the target
test split in its own :class:`~dabench.data.core.PairSplit` and evaluates the
returned :class:`Predictor` on it after ``fit`` returns.

Every method runs under one **track** (:data:`TRACKS`, ``Method.track``),
which fixes what its ``Task`` holds (contract revision 1.3; see
:mod:`dabench.tracks` for how the host builds each track's ``Task`` and
evaluates it):

- ``"uda"``: labelled source + unlabelled target train (the default);
- ``"source-free"``: the host's shared source model + unlabelled target
  train; no source data at all (``source_train`` and ``source_val`` are
  withheld: reading them fails the run);
- ``"test-time"``: the shared source model only; ``fit`` returns an
  :class:`OnlineAdapter` and the host feeds it the target *test* inputs
  in seeded batches, one at a time, scoring the predictions it returns
  for each batch (online: no second pass, no target train split).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping, Protocol, runtime_checkable

import numpy as np

CONTRACT_VERSION = "1"
#: Backward-compatible revisions of the contract within :data:`CONTRACT_VERSION`
#: (new optional Task fields, new helpers).  A plugin needing revision ``r``
#: declares ``requires_contract = "1.r"``; hosts with an older revision refuse it.
CONTRACT_REVISION = 3
#: Revision 1: the host's shared source model (``Task.source_model``, the
#: ``source_model`` requirement).  Revision 2: streamed image domains
#: (``Task.streamed``, an ``X`` that is a :class:`dabench.data.stream.ImageStream`),
#: the ``arrays`` requirement.  Revision 3: tracks (``Method.track``,
#: ``Task.track``, withheld fields, :class:`OnlineAdapter`).

#: The settings a method can run under (``Method.track``): what its Task
#: holds.  Revision 1.3 added the ``source-free`` and ``test-time`` tracks.
TRACKS = {
    "uda": "labelled source data + unlabelled target train data (unsupervised domain adaptation)",
    "source-free": ("the host's shared source model + unlabelled target train data; no source data at all "
                    "(source-free domain adaptation)"),
    "test-time": ("the host's shared source model + the target test stream, delivered in seeded batches "
                  "that are predicted before or while being adapted on; no source data, no target train "
                  "split, no second pass (online test-time adaptation)"),
}

#: Method families the host knows.  Plugins may use others; the leaderboard
#: groups by this string.
FAMILIES = (
    "baseline",
    "reference",
    "adversarial",
    "self-training",
    "contrastive",
    "reweighting",
    "heterogeneous",
    "discrepancy",
    "normalisation",
    "other",
)

#: Requirements a method may declare.  The host skips (with the reason shown
#: in the leaderboard) any pair/protocol that cannot satisfy them.
REQUIREMENTS = {
    "same_feature_space": "source and target must share one input space",
    "target_labels": "needs k labelled target samples per class (suite protocol k_target > 0)",
    "oracle": "trains on the labelled target train split: a reference row (target-oracle), never ranked",
    "arrays": "reads whole domains as in-memory arrays (not only batches through TensorBatches / "
              "TorchPredictor); skipped on streamed image domains",
    "source_model": ("starts from the host's shared source model (task.source_model: trained once per pair, "
                     "seed, backbone and recipe, cached; contract 1.1)"),
}


class ContractError(ValueError):
    """A plugin or method violates the contract; the message says what to change."""


# --------------------------------------------------------------------------
# Hyperparameters
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class HParam:
    """One declared hyperparameter: a default and a search range.

    ``kind`` is ``"float"``, ``"int"``, ``"choice"`` or ``"bool"``.  For numeric
    kinds ``low``/``high`` bound the search range (inclusive) and ``log``
    samples log-uniformly.  For ``"choice"`` the range is ``choices``.
    """

    default: Any
    kind: str = "float"
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple = ()
    help: str = ""

    def validate(self, name: str, value: Any) -> Any:
        """Return ``value`` coerced to this kind, or raise ContractError."""
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise ContractError(f"hyperparameter {name!r} must be true/false, got {value!r}")
            return value
        if self.kind == "choice":
            if value not in self.choices:
                raise ContractError(
                    f"hyperparameter {name!r} must be one of {list(self.choices)}, got {value!r}"
                )
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ContractError(f"hyperparameter {name!r} must be a number, got {value!r}")
        if self.kind == "int":
            if float(value) != int(value):
                raise ContractError(f"hyperparameter {name!r} must be an integer, got {value!r}")
            value = int(value)
        else:
            value = float(value)
            if not math.isfinite(value):
                raise ContractError(f"hyperparameter {name!r} must be finite, got {value!r}")
        if self.low is not None and value < self.low:
            raise ContractError(f"hyperparameter {name!r}={value} is below its range [{self.low}, {self.high}]")
        if self.high is not None and value > self.high:
            raise ContractError(f"hyperparameter {name!r}={value} is above its range [{self.low}, {self.high}]")
        return value

    def check_declaration(self, name: str) -> None:
        """Raise ContractError when the declaration itself is inconsistent."""
        if self.kind not in ("float", "int", "choice", "bool"):
            raise ContractError(f"hyperparameter {name!r}: unknown kind {self.kind!r}")
        if self.kind in ("float", "int"):
            if self.low is None or self.high is None:
                raise ContractError(f"hyperparameter {name!r}: numeric kinds need low and high")
            if self.low > self.high:
                raise ContractError(f"hyperparameter {name!r}: low > high")
            if self.log and self.low <= 0:
                raise ContractError(f"hyperparameter {name!r}: log range needs low > 0")
        if self.kind == "choice" and not self.choices:
            raise ContractError(f"hyperparameter {name!r}: choice needs choices")
        self.validate(name, self.default)

    def sample(self, rng: np.random.Generator) -> Any:
        """Draw one value from the search range with ``rng``."""
        if self.kind == "bool":
            return bool(rng.integers(0, 2))
        if self.kind == "choice":
            return self.choices[int(rng.integers(0, len(self.choices)))]
        lo, hi = float(self.low), float(self.high)
        x = math.exp(rng.uniform(math.log(lo), math.log(hi))) if self.log else rng.uniform(lo, hi)
        return int(round(x)) if self.kind == "int" else float(x)


def Float(default: float, low: float, high: float, log: bool = False, help: str = "") -> HParam:
    return HParam(default, "float", low, high, log, (), help)


def Int(default: int, low: int, high: int, log: bool = False, help: str = "") -> HParam:
    return HParam(default, "int", low, high, log, (), help)


#: The declared hyperparameter of a method that fine-tunes ``task.backbone``:
#: the backbone's learning rate relative to the heads' when the backbone is
#: pretrained (TLlib: 0.1); see :func:`dabench.training.backbone_param_groups`.
BACKBONE_LR_MULT = HParam(0.1, "float", 0.01, 1.0, True, (),
                          "learning rate of a pretrained backbone relative to the heads' (TLlib: 0.1); "
                          "a backbone trained from scratch always learns at the heads' rate")


def Choice(default: Any, choices: tuple | list, help: str = "") -> HParam:
    return HParam(default, "choice", None, None, False, tuple(choices), help)


def Bool(default: bool, help: str = "") -> HParam:
    return HParam(default, "bool", help=help)


# --------------------------------------------------------------------------
# What a method may see
# --------------------------------------------------------------------------


def _is_stream(X: Any) -> bool:
    return bool(getattr(X, "__dabench_stream__", False))


def _frozen(a: np.ndarray | None) -> np.ndarray | None:
    if a is None:
        return None
    if _is_stream(a):  # a streamed image domain: immutable, holds no pixels
        return a
    a = np.array(a, copy=True)
    a.setflags(write=False)
    return a


@dataclass(frozen=True, slots=True)
class Labeled:
    """Inputs with labels.  Arrays are read-only copies; ``X`` may instead be
    a streamed image domain (:class:`dabench.data.stream.ImageStream`)."""

    X: np.ndarray
    y: np.ndarray

    def __post_init__(self) -> None:
        object.__setattr__(self, "X", _frozen(self.X if _is_stream(self.X) else np.asarray(self.X, dtype=np.float32)))
        object.__setattr__(self, "y", _frozen(np.asarray(self.y, dtype=np.int64)))
        if len(self.X) != len(self.y):
            raise ContractError(f"X has {len(self.X)} rows but y has {len(self.y)}")

    def __len__(self) -> int:
        return len(self.X)


@dataclass(frozen=True, slots=True)
class Unlabeled:
    """Inputs without labels.  There is no ``y`` attribute to reach.  ``X``
    is an array or a streamed image domain, as in :class:`Labeled`."""

    X: np.ndarray

    def __post_init__(self) -> None:
        object.__setattr__(self, "X", _frozen(self.X if _is_stream(self.X) else np.asarray(self.X, dtype=np.float32)))

    def __len__(self) -> int:
        return len(self.X)


@dataclass(frozen=True, slots=True)
class Budget:
    """Training budget.  ``steps`` optimiser steps of ``batch_size`` samples
    per domain; methods with rounds divide ``steps`` among them."""

    steps: int = 1000
    batch_size: int = 64


@dataclass(frozen=True, slots=True)
class Task:
    """Everything a method may see for one run.

    - ``source_train`` / ``source_val``: labelled source data (``Labeled``).
    - ``target_train``: unlabelled target data (``Unlabeled``: no ``y``).
    - ``target_labeled``: ``k`` labelled target samples per class, drawn from
      the target *train* split, only when the suite's protocol sets
      ``k_target > 0``; otherwise ``None``.
    - ``source_shape`` / ``target_shape``: per-sample input shapes, e.g.
      ``(2,)`` or ``(3, 28, 28)``; ``X`` arrays are flattened to ``(n, prod(shape))``.
    - ``same_feature_space``: whether source and target share one input space.
    - ``n_classes``, ``device`` (a torch device string), ``seed``, ``budget``.
    - ``backbone``: ``backbone(shape) -> (torch.nn.Module, out_dim)``, a fresh
      feature extractor suited to inputs of that shape, seeded by the caller.
    - ``source_model``: for methods requiring ``source_model``, the host's
      trained source model (``build(device)`` gives fresh ``(encoder,
      classifier)`` copies); None otherwise.
    - ``track``: the method's track (:data:`TRACKS`).  Under ``source-free``
      the source fields are :class:`dabench.tracks.Withheld` placeholders
      (reading one raises :class:`dabench.tracks.TrackViolation` and fails
      the run) and ``target_labeled`` is None; under ``test-time``
      ``target_train`` is withheld as well (the target test inputs arrive
      batch by batch through :class:`OnlineAdapter`, see :mod:`dabench.tracks`).
    - Streamed image domains (image folders; Office-31, Office-Home, VisDA
      end to end): every ``X`` is then a :class:`dabench.data.stream.ImageStream`
      instead of an array (``len``, ``shape``, row indexing, no pixels):
      iterate it with :class:`dabench.training.TensorBatches` (training
      augmentation per batch) and predict with
      :class:`dabench.training.TorchPredictor`, exactly as for arrays.
      ``streamed`` says which; a method that reads whole arrays declares the
      ``arrays`` requirement and is skipped there.

    Target *test* data and labels are not here: the host keeps them.
    """

    source_train: Labeled
    source_val: Labeled
    target_train: Unlabeled
    target_labeled: Labeled | None
    source_shape: tuple[int, ...]
    target_shape: tuple[int, ...]
    same_feature_space: bool
    n_classes: int
    device: str
    seed: int
    budget: Budget
    backbone: Callable[[tuple[int, ...]], Any] = field(repr=False)
    #: Labels of ``target_train``, given only to methods that declare the
    #: ``oracle`` requirement (the target-oracle reference row).  These are
    #: target *train* labels; the target *test* split is never in a Task.
    target_train_labels: np.ndarray | None = field(default=None, repr=False)
    #: The host's shared source model (a :class:`dabench.source_model.SourceModel`:
    #: ``build(device) -> (encoder, classifier)`` gives fresh trained copies),
    #: given only to methods that declare the ``source_model`` requirement
    #: (contract revision 1.1); None otherwise.
    source_model: Any = field(default=None, repr=False)
    #: The track the task was built for (:data:`TRACKS`; contract revision 1.3).
    track: str = "uda"

    @property
    def streamed(self) -> bool:
        """Whether the domains are streamed from image files (``X`` are
        :class:`~dabench.data.stream.ImageStream` objects, not arrays).
        Only the fields the task's track gives are looked at (a withheld
        field is never read)."""
        return any(_is_stream(d.X) for d in (self.source_train, self.target_train)
                   if not getattr(type(d), "__dabench_withheld__", False))

    @property
    def source_dim(self) -> int:
        return int(np.prod(self.source_shape))

    @property
    def target_dim(self) -> int:
        return int(np.prod(self.target_shape))


# --------------------------------------------------------------------------
# What a method returns
# --------------------------------------------------------------------------


@runtime_checkable
class Predictor(Protocol):
    """What ``Method.fit`` returns.

    ``predict_proba(X, domain)`` gives an ``(n, n_classes)`` array of class
    probabilities (rows sum to 1); ``embed(X, domain)`` gives ``(n, d)``
    features.  ``domain`` is ``"target"`` or ``"source"``: the host calls it
    with source test data to measure forgetting, and heterogeneous methods
    use it to pick the encoder.
    """

    def predict_proba(self, X: np.ndarray, domain: str = "target") -> np.ndarray: ...

    def embed(self, X: np.ndarray, domain: str = "target") -> np.ndarray: ...


@runtime_checkable
class OnlineAdapter(Protocol):
    """What ``Method.fit`` returns for a ``test-time`` method (contract 1.3).

    The host calls ``predict_batch(X)`` once per batch of the target test
    stream, in the stream's seeded order, and scores the returned ``(n,
    n_classes)`` probabilities; the adapter may update itself on ``X``
    before, while or after predicting it (as TENT does), but it never sees
    a batch twice nor a batch before its turn.  ``X`` is a read-only
    float32 array of flattened inputs, like ``Task`` arrays.

    Optional: ``predict_proba(X, domain)`` and ``embed(X, domain)`` with
    the adapted model as it stands after the stream, without adapting on
    ``X``; the host uses them for source accuracy after adaptation
    (forgetting).  Without them that column is empty for the run.
    """

    def predict_batch(self, X: np.ndarray) -> np.ndarray: ...


# --------------------------------------------------------------------------
# The method base class
# --------------------------------------------------------------------------


class Method:
    """Base class for method plugins.

    Subclasses set the class attributes below and implement :meth:`fit`.
    The constructor takes only the declared hyperparameters as keyword
    arguments, fills defaults and validates ranges, so ``get_params()`` is
    exactly the record the store and the run key use.

    Class attributes:

    - ``name``: unique, lower-case, dash-separated (``"dann"``).
    - ``family``: one of :data:`FAMILIES` (free text allowed).
    - ``version``: bump when a change alters results; it enters the run key.
    - ``requires``: a set of keys of :data:`REQUIREMENTS`.
    - ``hyperparameters``: ``{name: HParam}`` with defaults and search ranges.
    - ``reference``: ``True`` for reference rows (target-oracle) never ranked.
    - ``paper``: the citation the implementation follows.
    - ``track``: one of :data:`TRACKS` (default ``"uda"``).  ``source-free``
      and ``test-time`` methods start from the host's shared source model
      (``requires`` must include ``"source_model"``) and declare
      ``requires_contract = "1.3"``; a ``test-time`` method's ``fit``
      returns an :class:`OnlineAdapter` instead of a :class:`Predictor`.
      A method meant for two tracks registers one class per track.
    """

    name: ClassVar[str] = ""
    family: ClassVar[str] = "other"
    version: ClassVar[str] = "1"
    requires: ClassVar[frozenset[str]] = frozenset()
    hyperparameters: ClassVar[Mapping[str, HParam]] = {}
    reference: ClassVar[bool] = False
    paper: ClassVar[str] = ""
    requires_contract: ClassVar[str] = CONTRACT_VERSION
    track: ClassVar[str] = "uda"

    def __init__(self, **params: Any) -> None:
        unknown = sorted(set(params) - set(self.hyperparameters))
        if unknown:
            raise ContractError(
                f"method {self.name!r} has no hyperparameter(s) {unknown}; "
                f"declared: {sorted(self.hyperparameters)}"
            )
        self._params = {
            k: hp.validate(k, params.get(k, hp.default)) for k, hp in sorted(self.hyperparameters.items())
        }

    def get_params(self) -> dict[str, Any]:
        """The full hyperparameter record (defaults filled in), sorted by name."""
        return dict(self._params)

    def __getattr__(self, item: str) -> Any:
        params = self.__dict__.get("_params")
        if params is not None and item in params:
            return params[item]
        raise AttributeError(f"{type(self).__name__!s} has no attribute {item!r}")

    @classmethod
    def skip(cls, task: Task) -> str | None:
        """Return a reason string when this method cannot run on ``task``, else None.

        The default checks ``requires``; override to add method-specific reasons.
        """
        if "same_feature_space" in cls.requires and not task.same_feature_space:
            return "needs a shared feature space; this pair is heterogeneous"
        if "target_labels" in cls.requires and task.target_labeled is None:
            return "needs k labelled target samples per class; the suite sets k_target = 0"
        if "arrays" in cls.requires and task.streamed:
            return ("reads whole domains as in-memory arrays; this pair's images are streamed from files "
                    "(batches only)")
        return None

    def fit(self, task: Task) -> Predictor:  # pragma: no cover - abstract
        raise NotImplementedError


def contract_mismatch(required: Any) -> str | None:
    """Why a plugin declaring ``required`` (``"MAJOR"`` or ``"MAJOR.REVISION"``)
    cannot run on this host, or None when it can.

    Compatible: same major version, and a revision no newer than
    :data:`CONTRACT_REVISION`.  A different major version means the contract
    changed incompatibly (renamed fields, new semantics).
    """
    text = str(required).strip()
    parts = text.split(".")
    if not (1 <= len(parts) <= 2 and all(p.isdigit() for p in parts)):
        return (f"declares contract {text!r}, which is not a version like '1' or '1.0'; "
                f"set it to '{CONTRACT_VERSION}'")
    major, rev = parts[0], int(parts[1]) if len(parts) == 2 else 0
    host = f"{CONTRACT_VERSION}.{CONTRACT_REVISION}"
    if major != CONTRACT_VERSION:
        return (f"was written for dabench contract {text}, this dabench implements contract {host}: "
                f"install a release of the plugin built for contract {CONTRACT_VERSION}, "
                f"or a dabench implementing contract {major}")
    if rev > CONTRACT_REVISION:
        return (f"needs dabench contract {text}, this dabench implements contract {host}: "
                "upgrade dabench (pip install -U dabench)")
    return None


def _revision(required: Any) -> int:
    parts = str(required).strip().split(".")
    return int(parts[1]) if len(parts) == 2 and parts[1].isdigit() else 0


def validate_method_class(cls: Any) -> None:
    """Raise ContractError, saying what to change, when ``cls`` is not a valid method."""
    if not isinstance(cls, type) or not issubclass(cls, Method):
        raise ContractError(f"{cls!r} is not a subclass of dabench.Method")
    if not cls.name or not isinstance(cls.name, str) or cls.name != cls.name.strip().lower() or " " in cls.name:
        raise ContractError(f"{cls.__name__}.name must be a non-empty lower-case string without spaces, got {cls.name!r}")
    if ":" in cls.name or "," in cls.name:
        raise ContractError(f"{cls.__name__}.name must not contain ':' or ',', got {cls.name!r}")
    mismatch = contract_mismatch(cls.requires_contract)
    if mismatch:
        raise ContractError(f"method {cls.name!r} {mismatch}")
    unknown = set(cls.requires) - set(REQUIREMENTS)
    if unknown:
        raise ContractError(f"method {cls.name!r} declares unknown requirements {sorted(unknown)}; known: {sorted(REQUIREMENTS)}")
    if not isinstance(cls.hyperparameters, Mapping):
        raise ContractError(f"method {cls.name!r}: hyperparameters must be a dict of name -> HParam")
    for k, hp in cls.hyperparameters.items():
        if not isinstance(hp, HParam):
            raise ContractError(f"method {cls.name!r}: hyperparameter {k!r} must be declared with dabench.Float/Int/Choice/Bool")
        try:
            hp.check_declaration(k)
        except ContractError as e:
            raise ContractError(f"method {cls.name!r}: {e}") from None
    if cls.fit is Method.fit:
        raise ContractError(f"method {cls.name!r} does not implement fit(task)")
    track = getattr(cls, "track", "uda")
    if track not in TRACKS:
        raise ContractError(f"method {cls.name!r} declares track {track!r}; known tracks: {list(TRACKS)}")
    if track != "uda":
        if "source_model" not in cls.requires:
            raise ContractError(f"method {cls.name!r} is a {track} method: add \"source_model\" to its requires "
                                f"(a {track} method starts from the host's shared source model and never trains "
                                f"its own: it has no source data)")
        if _revision(cls.requires_contract) < 3:
            raise ContractError(f"method {cls.name!r} is a {track} method: declare requires_contract = "
                                f"\"{CONTRACT_VERSION}.3\" (tracks are contract revision 1.3; an older host would "
                                f"run it as a uda method and hand it the source data)")
