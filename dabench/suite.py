"""Suites: TOML files with a validated schema, expanded into runs.

A suite file looks like this (every key is checked; an unknown key, a
missing field or a wrong type is an error naming the file and the key)::

    name = "quick"                      # required
    description = "..."                 # optional
    seeds = 3                           # N (seeds 0..N-1) or a list of ints
    time_limit_s = 14400                # per-run wall-time limit (default 4 h; --time-limit)
    cleared = ["dann:moons:moons-rot35"]  # suspicion flags a person checked (METHOD or METHOD:PAIR)
    validator = "source-val"            # hyperparameter selection without target labels
    backbone = "default"                # a registered backbone
    pairs = [                           # "source:target", or a table with overrides
        "moons:moons-rot35",
        { pair = "mnist:mnistm", budget = { steps = 600 } },
        { pair = "svhn:mnist-full", backbone = "dtn" },   # per-pair backbone
    ]

    [protocol]                          # optional; defaults shown
    k_target = 0                        # labelled target samples per class given to methods
    feature_space = "shared"            # "shared" (homogenise inputs) or "native"
    max_source = 4000                   # cap on samples per domain (optional)
    max_target = 4000
    training = "end-to-end"             # or "head": domains are cached backbone features
    standardize = "source"              # vector inputs: per-feature mean/std of the source
                                        # train split ("none": as loaded); images untouched
    resize = "bilinear"                 # smaller images to the shared shape: "bilinear" or
                                        # "pad" (zero-pad, centred, at their own scale)
    augment = "none"                    # streamed image domains: training transform per batch,
                                        # "crop-flip" or "center-flip" (TLlib's recipes)
    amp = false                         # CUDA: bf16 autocast + channels-last (no effect on CPU)

    [budget]                            # optional; defaults shown
    steps = 1000
    batch_size = 64

    [source_model]                      # optional: the host's shared source model
    lr = 0.01                           # (dabench.source_model; also per pair:
    weight_decay = 5e-4                 #  { pair = "...", source_model = { steps = 3000 } })
    steps = 1000                        # default: the pair's budget
    batch_size = 64                     # default: the pair's budget
    backbone_lr_mult = 0.1              # a pretrained backbone's lr / the classifier's

    [[published]]                       # optional: published numbers the report compares with
    pair = "mnist:mnistm"               # (dabench.published)
    method = "dann"
    accuracy = 76.66
    source = "Ganin et al., JMLR 2016, Table 2"

    [domains.NAME]                      # optional: a domain from a file (dabench.data.files)
    path = "usps.npz"
    format = "npz"
    label_space = "digits10"

    [methods.source-only]               # one table per method (may be empty)
    [methods.dann]
    params = { lr = 0.01 }              # fixed values (override defaults)
    grid = { lambda_max = [0.1, 1.0] }  # cartesian product of lists
    random = { n = 4, seed = 0 }        # n points sampled from the declared ranges

A run is one (pair, method, hyperparameter point, seed); its key hashes
everything that changes the result (see :func:`RunSpec.key`).

Sizes are bounded so a typo cannot hang the parser or the store: at most
:data:`MAX_SEEDS` seeds, :data:`MAX_POINTS` hyperparameter points per method
and :data:`MAX_RUNS` runs per suite; seeds lie in ``[0, 2**32 - 1]``;
every other integer has a range named in its error.  Expansion is linear in
the number of points.
"""

from __future__ import annotations

import itertools
import math
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .contract import CONTRACT_VERSION, Budget, ContractError
from .data.core import DomainSpec, Protocol
from .data.files import DomainTableError, parse_domain_table
from .names import did_you_mean
from .source_model import SourceRecipe
from .store import canonical_json, run_key
from .suitefile import (  # noqa: F401  (re-exported: the names the CLI checks first)
    MAX_SEEDS,
    SuiteError,
    SuiteOutline,
    check_filters,
    normalize_pair,
    outline,
    read_toml,
)

#: The per-run wall-time limit when a suite sets none (seconds): generous, so
#: that only a run that hangs hits it; ``time_limit_s`` or ``--time-limit``
#: changes it.
DEFAULT_TIME_LIMIT_S = 4 * 3600
MAX_SEED = 2**32 - 1
MAX_POINTS = 10_000
MAX_RUNS = 200_000
#: inclusive ranges of the integer settings (beyond them: an error naming the key)
_INT_RANGES = {
    "k_target": (0, 100_000),
    "max_source": (10, 10**9),
    "max_target": (10, 10**9),
    "steps": (1, 10**9),
    "batch_size": (1, 10**6),
}


@dataclass(frozen=True)
class PairEntry:
    name: str  # "source:target"
    source: str
    target: str
    protocol: Protocol
    budget: Budget
    backbone: str | None = None  # overrides the suite's backbone for this pair
    #: how the host trains this pair's shared source model (``[source_model]``)
    source_recipe: SourceRecipe = SourceRecipe()
    #: the pair's domains declared in the suite's ``[domains.NAME]`` tables
    #: (not registered by a plugin): they travel with the run to workers
    file_domains: tuple[DomainSpec, ...] = ()

    def domain(self, name: str, registry: Any) -> DomainSpec:
        """The spec of domain ``name`` of this pair: the suite's own, else the registry's."""
        for d in self.file_domains:
            if d.name == name:
                return d
        return registry.datasets[name]

    def fingerprints(self) -> dict[str, str] | None:
        """Data digests of the pair's domains that have one (see
        :attr:`DomainSpec.fingerprint`), for the run key; None when none has."""
        fps = {role: d.fingerprint for role, name in (("source", self.source), ("target", self.target))
               for d in self.file_domains if d.name == name and d.fingerprint}
        return fps or None


@dataclass(frozen=True)
class MethodEntry:
    name: str
    points: tuple[dict[str, Any], ...]  # full hyperparameter records, defaults filled


@dataclass(frozen=True)
class RunSpec:
    suite: str
    pair: PairEntry
    method: str
    method_version: str
    params: dict[str, Any]
    point: int
    seed: int
    backbone: str
    #: the resolved source-model recipe when the method starts from the
    #: host's source model (``requires = {"source_model"}``), else None
    source_recipe: dict[str, Any] | None = None
    #: the method's track (``Method.track``; see :mod:`dabench.tracks`)
    track: str = "uda"

    @property
    def key(self) -> str:
        """sha256 of what changes the result: method + version + params, pair,
        seed, protocol, budget, backbone, the track (when not ``uda``) and the contract version.  The suite
        name and the device are not part of it.  Pairs with domains from
        files add the files' digests (so edited data is recomputed); other
        keys are unchanged by that field's existence."""
        extra = {}
        fps = self.pair.fingerprints()
        if fps:
            extra["data"] = fps
        if self.source_recipe is not None:
            extra["source_model"] = self.source_recipe
        if self.track != "uda":  # uda keys are unchanged by the field's existence
            extra["track"] = self.track
        return run_key(**extra,
            method=self.method,
            method_version=self.method_version,
            params=self.params,
            pair=self.pair.name,
            seed=self.seed,
            protocol=self.pair.protocol.as_dict(),
            budget={"steps": self.pair.budget.steps, "batch_size": self.pair.budget.batch_size},
            backbone=self.backbone,
            contract=CONTRACT_VERSION,
        )


@dataclass
class Suite:
    path: Path
    name: str
    description: str
    seeds: list[int]
    validator: str
    backbone: str
    pairs: list[PairEntry]
    methods: list[MethodEntry]
    raw: dict = field(repr=False, default_factory=dict)
    #: published results the suite cites (``[[published]]``; see :mod:`dabench.published`)
    published: list[dict[str, Any]] = field(default_factory=list)
    #: per-run wall-time limit in seconds (a run over it is stored as failed)
    time_limit_s: float = DEFAULT_TIME_LIMIT_S
    #: suspicion flags a person has checked and cleared: ``METHOD`` (every
    #: pair) or ``METHOD:SOURCE:TARGET`` (see the leaderboard's suspicion check)
    cleared: tuple[str, ...] = ()

    def expand(self, registry: Any) -> list[RunSpec]:
        """Every run of the suite, in a stable order (pair, seed, method, point)."""
        specs = []
        for pair in self.pairs:
            for seed in self.seeds:
                for m in self.methods:
                    cls = registry.methods[m.name]
                    version = str(cls.version)
                    recipe = (pair.source_recipe.resolved(pair.budget.steps, pair.budget.batch_size)
                              if "source_model" in cls.requires else None)
                    track = getattr(cls, "track", "uda")
                    for i, params in enumerate(m.points):
                        specs.append(RunSpec(self.name, pair, m.name, version, params, i, seed,
                                             pair.backbone or self.backbone, recipe, track))
        return specs

    def pair_labels(self) -> dict[tuple, str]:
        """Each pair entry's name (keyed by :func:`pair_key`), made unique
        where one pair is listed under several protocols: ``digits:mnist
        [feature_space=native, k_target=3]`` (the protocol keys that differ;
        else also the budget and backbone), as the leaderboard names its
        columns."""
        return variant_labels(self.pairs, self.backbone)

    def point_labels(self) -> dict[tuple[str, int], str]:
        """``{(method, point): label}``: the method's name, followed, when
        it has several hyperparameter points, by the values that differ
        between them (``dann lambda_max=1.0``)."""
        out = {}
        for m in self.methods:
            for i, params in enumerate(m.points):
                suffix = _differing(params, [p for j, p in enumerate(m.points) if j != i])
                out[(m.name, i)] = f"{m.name} {suffix}" if suffix else m.name
        return out

    def restrict(self, methods: list[str] | None = None, pairs: list[str] | None = None,
                 seeds: int | None = None) -> "Suite":
        """The suite limited by CLI filters; unknown names raise SuiteError
        (naming the closest ones)."""
        s = replace(self)
        check_filters(self.path, [m.name for m in self.methods], [p.name for p in self.pairs], methods, pairs, seeds)
        if methods:
            s.methods = [m for m in self.methods if m.name in methods]
        if pairs:
            wanted = {normalize_pair(p) for p in pairs}
            s.pairs = [p for p in self.pairs if p.name in wanted]
        if seeds is not None:
            s.seeds = list(range(seeds))
        return s


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _differing(variant: dict[str, Any], others: list[dict[str, Any]]) -> str:
    """``k=v, ...`` for the keys where ``variant`` differs from some other."""
    keys = sorted(k for k in variant if any(o.get(k) != variant[k] for o in others))
    return ", ".join(f"{k}={_fmt_value(variant[k])}" for k in keys)


def pair_key(e: PairEntry) -> tuple:
    """What tells apart the entries of a suite's ``pairs`` list (a value, so
    a run spec sent to a worker and back still finds its label)."""
    return (e.name, canonical_json(e.protocol.as_dict()), e.budget.steps, e.budget.batch_size, e.backbone)


def variant_labels(pairs: list[PairEntry], backbone: str = "default") -> dict[tuple, str]:
    """See :meth:`Suite.pair_labels`."""
    out: dict[tuple, str] = {}
    for p in pairs:
        same = [q for q in pairs if q.name == p.name and pair_key(q) != pair_key(p)]
        if not same:
            out[pair_key(p)] = p.name
            continue

        def proto(e: PairEntry) -> dict[str, Any]:
            return e.protocol.as_dict()

        def everything(e: PairEntry) -> dict[str, Any]:
            return dict(proto(e), steps=e.budget.steps, batch_size=e.budget.batch_size,
                        backbone=e.backbone or backbone)

        suffix = _differing(proto(p), [proto(q) for q in same]) or _differing(everything(p), [everything(q) for q in same])
        out[pair_key(p)] = f"{p.name} [{suffix}]" if suffix else p.name
    return out


# ----------------------------------------------------------------- parsing

_TOP = {"name", "description", "seeds", "validator", "backbone", "pairs", "protocol", "budget", "methods",
        "domains", "source_model", "published", "time_limit_s", "cleared"}
_PROTOCOL = {"k_target", "feature_space", "max_source", "max_target", "training", "standardize", "resize",
             "augment", "amp"}
TRAINING_PROTOCOLS = ("end-to-end", "head")
_BUDGET = {"steps", "batch_size"}
_SOURCE_MODEL = {"steps", "batch_size", "lr", "weight_decay", "backbone_lr_mult"}
_METHOD = {"params", "grid", "random"}


def _type_name(v: Any) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "true/false", list: "a list",
            dict: "a table"}.get(type(v), type(v).__name__)


def _expect(path: Path, key: str, value: Any, typ: type | tuple, what: str) -> Any:
    if isinstance(value, bool) and bool not in (typ if isinstance(typ, tuple) else (typ,)):
        raise SuiteError(path, key, f"expected {what}, got {_type_name(value)} ({value!r})")
    if not isinstance(value, typ):
        raise SuiteError(path, key, f"expected {what}, got {_type_name(value)} ({value!r})")
    return value


def _check_keys(path: Path, where: str, table: dict, allowed: set[str]) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        prefix = f"{where}." if where else ""
        hint = did_you_mean(unknown[0], allowed)
        raise SuiteError(path, prefix + unknown[0],
                         f"unknown key{'; ' + hint if hint else ''}; allowed keys here: {sorted(allowed)}")


def _unknown_name(kind: str, name: str, available: Any, registry: Any = None, label: str | None = None) -> str:
    """``unknown method 'dnn'; did you mean 'dann'? available: [...]``, or,
    when a plugin said it cannot provide ``name`` here, why; a whole plugin
    that is unavailable here is mentioned (it may be the one providing it)."""
    notes = list(getattr(registry, "unavailable", ()) or ())
    for u in notes:
        if u.kind == kind and u.name == name:
            return f"{label or kind} {name!r} is unavailable here: {u.reason}"
    hint = did_you_mean(name, available)
    if hint and len(available) > 15:  # a long list buries the hint
        msg = f"unknown {label or kind} {name!r}; {hint} (`dabench list {kind}s` lists all {len(available)})"
    else:
        msg = f"unknown {label or kind} {name!r}{'; ' + hint if hint else ''}; available: {sorted(available)}"
    off = sorted({u.plugin for u in notes if u.kind == "plugin"})
    if off:
        msg += (f" (unavailable here: plugin{'s' if len(off) > 1 else ''} {', '.join(repr(p) for p in off)}; "
                f"`dabench list plugins` says why)")
    return msg


def _int_in_range(path: Path, key: str, value: Any, kind: str) -> int:
    lo, hi = _INT_RANGES[kind]
    what = {0: f"a non-negative integer (at most {hi})", 1: f"a positive integer (at most {hi})"}.get(
        lo, f"an integer in [{lo}, {hi}]")
    _expect(path, key, value, int, what)
    if not lo <= value <= hi:
        raise SuiteError(path, key, f"expected {what}, got {value}")
    return value


def _check_name(path: Path, key: str, text: str) -> None:
    bad = [c for c in text if ord(c) < 32 or ord(c) == 127]
    if bad:
        raise SuiteError(path, key, f"contains the control character {bad[0]!r}; use printable characters only")


def _protocol(path: Path, where: str, table: Any, base: Protocol) -> Protocol:
    _expect(path, where, table, dict, "a table")
    _check_keys(path, where, table, _PROTOCOL)
    kw = base.__dict__.copy()
    if "k_target" in table:
        kw["k_target"] = _int_in_range(path, f"{where}.k_target", table["k_target"], "k_target")
    if "feature_space" in table:
        fs = _expect(path, f"{where}.feature_space", table["feature_space"], str, '"shared" or "native"')
        if fs not in ("shared", "native"):
            raise SuiteError(path, f"{where}.feature_space", f'expected "shared" or "native", got {fs!r}')
        kw["feature_space"] = fs
    if "training" in table:
        tr = _expect(path, f"{where}.training", table["training"], str, '"end-to-end" or "head"')
        if tr not in TRAINING_PROTOCOLS:
            raise SuiteError(path, f"{where}.training", f'expected "end-to-end" or "head", got {tr!r}')
        kw["training"] = tr
    if "resize" in table:
        rs = _expect(path, f"{where}.resize", table["resize"], str, '"bilinear" or "pad"')
        if rs not in ("bilinear", "pad"):
            raise SuiteError(path, f"{where}.resize", f'expected "bilinear" or "pad", got {rs!r}')
        kw["resize"] = rs
    if "standardize" in table:
        st = _expect(path, f"{where}.standardize", table["standardize"], str, '"source" or "none"')
        if st not in ("source", "none"):
            raise SuiteError(path, f"{where}.standardize", f'expected "source" or "none", got {st!r}')
        kw["standardize"] = st
    if "augment" in table:
        from .data.stream import AUGMENTATIONS

        au = _expect(path, f"{where}.augment", table["augment"], str, f"one of {list(AUGMENTATIONS)}")
        if au not in AUGMENTATIONS:
            raise SuiteError(path, f"{where}.augment", f"expected one of {list(AUGMENTATIONS)}, got {au!r}")
        kw["augment"] = au
    if "amp" in table:
        kw["amp"] = _expect(path, f"{where}.amp", table["amp"], bool, "true/false")
    for cap in ("max_source", "max_target"):
        if cap in table:
            kw[cap] = _int_in_range(path, f"{where}.{cap}", table[cap], cap)
    return Protocol(**kw)


def _budget(path: Path, where: str, table: Any, base: Budget) -> Budget:
    _expect(path, where, table, dict, "a table")
    _check_keys(path, where, table, _BUDGET)
    kw = {"steps": base.steps, "batch_size": base.batch_size}
    for k in _BUDGET:
        if k in table:
            kw[k] = _int_in_range(path, f"{where}.{k}", table[k], k)
    return Budget(**kw)


def _source_recipe(path: Path, where: str, table: Any, base: SourceRecipe) -> SourceRecipe:
    _expect(path, where, table, dict, "a table")
    _check_keys(path, where, table, _SOURCE_MODEL)
    kw = base.__dict__.copy()
    for k in ("steps", "batch_size"):
        if k in table:
            kw[k] = _int_in_range(path, f"{where}.{k}", table[k], k)
    for k, lo, hi in (("lr", 1e-6, 10.0), ("weight_decay", 0.0, 1.0), ("backbone_lr_mult", 0.01, 1.0)):
        if k in table:
            v = _expect(path, f"{where}.{k}", table[k], (int, float), "a number")
            if not (lo <= float(v) <= hi):
                raise SuiteError(path, f"{where}.{k}", f"expected a number in [{lo}, {hi}], got {v!r}")
            kw[k] = float(v)
    return SourceRecipe(**kw)


def _points(path: Path, name: str, table: dict, cls: Any) -> tuple[dict[str, Any], ...]:
    where = f"methods.{name}"
    _check_keys(path, where, table, _METHOD)
    hps = cls.hyperparameters
    fixed = _expect(path, f"{where}.params", table.get("params", {}), dict, "a table of hyperparameter values")
    grid = _expect(path, f"{where}.grid", table.get("grid", {}), dict, "a table of lists")
    for k in list(fixed) + list(grid):
        if k not in hps:
            sec = "params" if k in fixed else "grid"
            hint = did_you_mean(k, hps)
            raise SuiteError(path, f"{where}.{sec}.{k}", f"method {name!r} has no such hyperparameter"
                                                          f"{'; ' + hint if hint else ''}; declared: {sorted(hps)}")
    for k, vals in grid.items():
        _expect(path, f"{where}.grid.{k}", vals, list, "a non-empty list of values")
        if not vals:
            raise SuiteError(path, f"{where}.grid.{k}", "expected a non-empty list of values")
    if "random" in table:
        rnd = _expect(path, f"{where}.random", table["random"], dict, "a table { n = N, seed = S }")
        _check_keys(path, f"{where}.random", rnd, {"n", "seed"})
        n = _expect(path, f"{where}.random.n", rnd.get("n"), int, "a positive integer (number of points)")
        rseed = _expect(path, f"{where}.random.seed", rnd.get("seed", 0), int, "an integer")
        if n < 1:
            raise SuiteError(path, f"{where}.random.n", "expected a positive integer")
        if n > MAX_POINTS:
            raise SuiteError(path, f"{where}.random.n", f"{n} points is more than the {MAX_POINTS} a method may have")
        if not 0 <= rseed <= MAX_SEED:
            raise SuiteError(path, f"{where}.random.seed", f"expected an integer in [0, {MAX_SEED}], got {rseed}")
        if grid:
            raise SuiteError(path, f"{where}.random", "use either grid or random, not both")
        raw_points = []
        free = [k for k in sorted(hps) if k not in fixed]
        for i in range(n):
            pt = dict(fixed)
            for k in free:
                # seeded per (method, hyperparameter, point) so adding a
                # hyperparameter does not change the others' draws (DomainBed)
                rng = np.random.default_rng([rseed, i, zlib.crc32(f"{name}/{k}".encode())])
                pt[k] = hps[k].sample(rng)
            raw_points.append(pt)
    else:
        keys = sorted(grid)
        size = math.prod(len(grid[k]) for k in keys)
        if size > MAX_POINTS:
            raise SuiteError(path, f"{where}.grid", f"the grid has {size} points, more than the {MAX_POINTS} a method "
                                                    f"may have; use random = {{ n = N }} or a smaller grid")
        raw_points = [dict(fixed, **dict(zip(keys, combo))) for combo in itertools.product(*(grid[k] for k in keys))]
    points = []
    for pt in raw_points:
        try:
            points.append(cls(**pt).get_params())
        except ContractError as e:
            raise SuiteError(path, where, str(e)) from None
    unique, seen = [], set()
    for p in points:
        text = canonical_json(p)
        if text not in seen:  # a set: linear in the number of points
            seen.add(text)
            unique.append(p)
    return tuple(unique)


def _domains(path: Path, raw: Any, registry: Any, data_root: str | Path | None) -> dict[str, DomainSpec]:
    """The suite's ``[domains.NAME]`` tables as specs (see :mod:`dabench.data.files`)."""
    from .data.download import resolve_data_root

    tables = _expect(path, "domains", raw, dict, "a table of [domains.NAME] tables")
    root = resolve_data_root(data_root).path
    out: dict[str, DomainSpec] = {}
    for name, table in tables.items():
        try:
            out[name] = parse_domain_table(name, table, suite_dir=path.resolve().parent, data_root=root,
                                           registered=registry.datasets)
        except DomainTableError as e:
            raise SuiteError(path, f"domains.{name}" + (f".{e.key}" if e.key else ""), e.message) from None
    return out


def _check_streamed_pair(path: Path, where: str, pname: str, s: DomainSpec, t: DomainSpec, proto: Protocol) -> None:
    """A pair's domains are both streamed or both in memory, augmentation is
    only asked of streamed ones, and their classes agree (count and names)."""
    if s.streamed != t.streamed:
        kinds = {d.name: ("streamed image files" if d.streamed else "in-memory arrays") for d in (s, t)}
        raise SuiteError(path, where, f"{pname!r} mixes {kinds}; pair streamed image domains (image folders, "
                                      f"the Office/VisDA images) with each other")
    if s.streamed and proto.resize != "bilinear" and s.shape != t.shape:
        raise SuiteError(path, where, f'resize = "{proto.resize}" applies to in-memory image arrays; the streamed '
                                      f"images of {pname!r} are decoded at the shared size (resized): remove it")
    if proto.augment != "none" and not s.streamed:
        raise SuiteError(path, where, f'augment = "{proto.augment}" applies to streamed image domains (image '
                                      f"folders, the Office/VisDA images); {pname!r} holds in-memory arrays, which "
                                      f'are never augmented: set augment = "none" for this pair')
    if s.n_classes != t.n_classes:
        raise SuiteError(path, where, f"{pname!r}: {s.name!r} has {s.n_classes} classes and {t.name!r} has "
                                      f"{t.n_classes} in label space {s.label_space!r}; a pair needs one label space "
                                      f"(set n_classes or classes = [...] in the [domains] tables)")
    if s.classes is not None and t.classes is not None and s.classes != t.classes:
        only_s = sorted(set(s.classes) - set(t.classes))
        only_t = sorted(set(t.classes) - set(s.classes))
        if only_s or only_t:
            what = "; ".join(f"class {c!r} exists in {a!r} and not in {b!r}" for cs, a, b in
                             ((only_s, s.name, t.name), (only_t, t.name, s.name)) for c in cs[:3])
            raise SuiteError(path, where, f"{pname!r}: {what}; a pair needs the same classes on both sides "
                                          f"(add or remove the class folders, or list classes = [...])")
        raise SuiteError(path, where, f"{pname!r}: the domains list the same classes in another order "
                                      f"({list(s.classes[:3])}... vs {list(t.classes[:3])}...); labels would not "
                                      f"match: give both the same classes = [...]")


def parse_suite(path: str | Path, registry: Any, data_root: str | Path | None = None) -> Suite:
    """Read and validate a suite file against the registry's methods and
    datasets.  ``data_root`` (``--data-root``; default ``$DABENCH_DATA``, then
    the per-user data folder) is where relative paths of ``[domains.NAME]``
    files are looked up first, before the suite's folder."""
    path = Path(path)
    raw = read_toml(path)
    _check_keys(path, "", raw, _TOP)
    if "name" not in raw:
        raise SuiteError(path, "name", "missing; expected a string naming the suite (used for the results folder)")
    name = _expect(path, "name", raw["name"], str, "a string")
    _check_name(path, "name", name)
    if not name or "/" in name or "\\" in name or name.startswith(".") or len(name) > 200:
        raise SuiteError(path, "name", "expected a non-empty name of at most 200 characters, without '/' or '\\', "
                                       "not starting with '.'")
    description = _expect(path, "description", raw.get("description", ""), str, "a string")

    seeds_raw = raw.get("seeds", 3)
    if isinstance(seeds_raw, list):
        if not seeds_raw or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds_raw):
            raise SuiteError(path, "seeds", "expected a positive integer N or a non-empty list of non-negative integers")
        big = [s for s in seeds_raw if s > MAX_SEED]
        if big:
            raise SuiteError(path, "seeds", f"seed {big[0]} is out of range: seeds must lie in [0, {MAX_SEED}]")
        seeds = sorted(set(seeds_raw))
        if len(seeds) > MAX_SEEDS:
            raise SuiteError(path, "seeds", f"{len(seeds)} seeds is more than the {MAX_SEEDS} a suite may have")
    else:
        n = _expect(path, "seeds", seeds_raw, int, "a positive integer N or a list of integers")
        if n < 1:
            raise SuiteError(path, "seeds", "expected a positive integer")
        if n > MAX_SEEDS:
            raise SuiteError(path, "seeds", f"{n} seeds is more than the {MAX_SEEDS} a suite may have")
        seeds = list(range(n))

    time_limit = raw.get("time_limit_s", DEFAULT_TIME_LIMIT_S)
    _expect(path, "time_limit_s", time_limit, (int, float), "a number of seconds")
    if not (isinstance(time_limit, (int, float)) and math.isfinite(time_limit) and 1 <= time_limit <= 30 * 86400):
        raise SuiteError(path, "time_limit_s", f"expected seconds in [1, {30 * 86400}] (30 days), got {time_limit!r}")
    cleared_raw = _expect(path, "cleared", raw.get("cleared", []), list, 'a list like ["method", "method:source:target"]')
    for i, c in enumerate(cleared_raw):
        _expect(path, f"cleared[{i}]", c, str, 'a string "METHOD" or "METHOD:SOURCE:TARGET"')
        if c.count(":") not in (0, 2) or not c.split(":")[0]:
            raise SuiteError(path, f"cleared[{i}]", f'expected "METHOD" or "METHOD:SOURCE:TARGET", got {c!r}')

    validator = _expect(path, "validator", raw.get("validator", "source-val"), str, "a string")
    if validator not in registry.validators:
        raise SuiteError(path, "validator", _unknown_name("validator", validator, registry.validators, registry))
    backbone = _expect(path, "backbone", raw.get("backbone", "default"), str, "a string")
    if backbone not in registry.backbones:
        raise SuiteError(path, "backbone", _unknown_name("backbone", backbone, registry.backbones, registry))

    domains = _domains(path, raw.get("domains", {}), registry, data_root)
    datasets = {**registry.datasets, **domains}

    protocol = _protocol(path, "protocol", raw.get("protocol", {}), Protocol())
    budget = _budget(path, "budget", raw.get("budget", {}), Budget())
    recipe = _source_recipe(path, "source_model", raw.get("source_model", {}), SourceRecipe())

    if "pairs" not in raw:
        raise SuiteError(path, "pairs", 'missing; expected a list like ["moons:moons-rot35"]')
    pairs_raw = _expect(path, "pairs", raw["pairs"], list, 'a non-empty list of "source:target" strings')
    if not pairs_raw:
        raise SuiteError(path, "pairs", 'expected a non-empty list of "source:target" strings')
    pairs: list[PairEntry] = []
    for i, entry in enumerate(pairs_raw):
        where = f"pairs[{i}]"
        p_proto, p_budget, p_backbone, p_recipe = protocol, budget, None, recipe
        if isinstance(entry, dict):
            _check_keys(path, where, entry, {"pair", "protocol", "budget", "backbone", "source_model"})
            if "pair" not in entry:
                raise SuiteError(path, f"{where}.pair", 'missing; expected "source:target"')
            if "protocol" in entry:
                p_proto = _protocol(path, f"{where}.protocol", entry["protocol"], protocol)
            if "budget" in entry:
                p_budget = _budget(path, f"{where}.budget", entry["budget"], budget)
            if "source_model" in entry:
                p_recipe = _source_recipe(path, f"{where}.source_model", entry["source_model"], recipe)
            if "backbone" in entry:
                p_backbone = _expect(path, f"{where}.backbone", entry["backbone"], str, "a string")
                if p_backbone not in registry.backbones:
                    raise SuiteError(path, f"{where}.backbone",
                                     _unknown_name("backbone", p_backbone, registry.backbones, registry))
            where, entry = f"{where}.pair", entry["pair"]
        pname = _expect(path, where, entry, str, '"source:target"')
        if pname.count(":") != 1:
            raise SuiteError(path, where, f'expected "source:target", got {pname!r}')
        src, tgt = pname.split(":")
        for role, d in (("source", src), ("target", tgt)):
            if d not in datasets:
                raise SuiteError(path, where, _unknown_name("dataset", d, datasets, registry, f"{role} dataset")
                                 + f" (or declare it in a [domains.{d}] table)")
        s_spec, t_spec = datasets[src], datasets[tgt]
        if s_spec.label_space != t_spec.label_space:
            raise SuiteError(path, where, f"{src!r} ({s_spec.label_space}) and {tgt!r} ({t_spec.label_space}) have different label spaces")
        feats = {getattr(s_spec, "features", None), getattr(t_spec, "features", None)} - {None}
        if p_proto.training == "head" and not (s_spec.features and t_spec.features):
            raw = [d for d, sp in ((src, s_spec), (tgt, t_spec)) if not sp.features]
            raise SuiteError(path, where, f'training = "head" needs cached-feature domains (e.g. '
                                          f'"office31-amazon@resnet50"); {raw} hold raw inputs')
        if feats and p_proto.training != "head":
            raise SuiteError(path, where, f'{pname!r} holds cached {sorted(feats)} features; set training = "head" '
                                          f'in [protocol] (the backbone cannot be fine-tuned through cached features)')
        _check_streamed_pair(path, where, pname, s_spec, t_spec, p_proto)
        if any(p.name == pname and p.protocol == p_proto and p.backbone == p_backbone for p in pairs):
            raise SuiteError(path, where, f"pair {pname!r} is listed twice")
        own = tuple(domains[d] for d in dict.fromkeys((src, tgt)) if d in domains)
        pairs.append(PairEntry(pname, src, tgt, p_proto, p_budget, p_backbone, p_recipe, own))

    if "methods" not in raw:
        raise SuiteError(path, "methods", "missing; expected a table per method, e.g. [methods.source-only]")
    methods_raw = _expect(path, "methods", raw["methods"], dict, "a table of method tables")
    if not methods_raw:
        raise SuiteError(path, "methods", "expected at least one method")
    methods = []
    for mname, table in methods_raw.items():
        if mname not in registry.methods:
            raise SuiteError(path, f"methods.{mname}", _unknown_name("method", mname, registry.methods, registry))
        _expect(path, f"methods.{mname}", table, dict, "a table")
        methods.append(MethodEntry(mname, _points(path, mname, table, registry.methods[mname])))

    n_runs = len(pairs) * len(seeds) * sum(len(m.points) for m in methods)
    if n_runs > MAX_RUNS:
        raise SuiteError(path, "", f"the suite expands into {n_runs} runs, more than the {MAX_RUNS} one suite may "
                                   f"have; split it into several suites")
    published: list[dict[str, Any]] = []
    if "published" in raw:
        from .published import PublishedError, parse_published

        try:
            published = parse_published(raw["published"], [p.name for p in pairs], [m.name for m in methods])
        except PublishedError as e:
            raise SuiteError(path, e.key, e.message) from None
    return Suite(path, name, description, seeds, validator, backbone, pairs, methods, raw, published,
                 time_limit_s=float(time_limit), cleared=tuple(cleared_raw))
