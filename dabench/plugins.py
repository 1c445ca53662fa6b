"""The plugin manager and the registry built from it.

``get_plugin_manager`` is a factory (no import-time global): it adds the hook
specs, loads the ``dabench`` entry-point group, imports every ``.py`` file of
an optional ``plugins_dir``, honours ``DABENCH_DISABLE_PLUGINS`` (a comma
list of plugin names) and checks pending hooks.  ``build_registry`` then calls
each registration hook *one plugin at a time*, so a plugin that raises or
registers something invalid is reported with its name and skipped while the
others keep working.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import traceback
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterable

import pluggy

from . import hookspecs
from .contract import ContractError, Method, contract_mismatch, validate_method_class
from .data.core import DomainSpec

log = logging.getLogger("dabench")

GROUP = "dabench"


@dataclass(frozen=True)
class PluginError:
    """One problem with one plugin; ``str()`` is the one line shown to users."""

    plugin: str
    message: str

    def __str__(self) -> str:
        return f"plugin {self.plugin!r}: {self.message}"


@dataclass
class PluginInfo:
    name: str
    origin: str  # "entry point module:attr" or a file path
    methods: list[str] = field(default_factory=list)
    datasets: list[str] = field(default_factory=list)
    validators: list[str] = field(default_factory=list)
    backbones: list[str] = field(default_factory=list)
    #: ``(kind, name, reason)`` for what the plugin could not provide here
    #: (from its ``dabench_unavailable`` hook).
    unavailable: list[tuple[str, str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class Unavailable:
    """Something a plugin knows it cannot provide on this machine, and why."""

    plugin: str
    kind: str  # "method", "validator", "dataset", "backbone" or "plugin"
    name: str
    reason: str

    def __str__(self) -> str:
        if self.kind == "plugin" and self.name == self.plugin:
            return f"plugin {self.plugin!r} is unavailable: {self.reason}"
        return f"{self.kind} {self.name!r} of plugin {self.plugin!r} is unavailable: {self.reason}"


#: Module attribute a plugin may set to the contract it was written for.
CONTRACT_ATTR = "dabench_contract"


def check_plugin_contract(plugin: Any) -> str | None:
    """The reason ``plugin`` (a module) cannot be loaded on this host's
    contract, from its optional ``dabench_contract`` attribute, or None."""
    declared = getattr(plugin, CONTRACT_ATTR, None)
    if declared is None:
        return None
    return contract_mismatch(declared)


def _one_line(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def _module_from_path(path: Path) -> ModuleType:
    name = f"dabench_local_plugin_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return mod


def disabled_from_env() -> set[str]:
    raw = os.environ.get("DABENCH_DISABLE_PLUGINS", "")
    return {p.strip() for p in raw.split(",") if p.strip()}


def get_plugin_manager(
    plugins_dir: str | os.PathLike | None = None,
    entrypoints: bool = True,
    blocked: Iterable[str] = (),
    errors: list[PluginError] | None = None,
    origins: dict[str, str] | None = None,
) -> pluggy.PluginManager:
    """Build a plugin manager.

    :param plugins_dir: a folder whose ``*.py`` files are each loaded as a plugin
        (named after the file stem).
    :param entrypoints: load the ``dabench`` entry-point group.
    :param blocked: plugin names not to load (added to ``DABENCH_DISABLE_PLUGINS``).
    :param errors: a list that receives one :class:`PluginError` per plugin that
        failed to import; such a plugin is skipped.
    :param origins: a dict that receives ``{plugin name: where it came from}``.
    """
    errors = errors if errors is not None else []
    origins = origins if origins is not None else {}
    pm = pluggy.PluginManager("dabench")
    pm.add_hookspecs(hookspecs)
    for name in set(blocked) | disabled_from_env():
        pm.set_blocked(name)

    if entrypoints:
        for ep in sorted(entry_points(group=GROUP), key=lambda e: e.name):
            if pm.is_blocked(ep.name) or pm.get_plugin(ep.name) is not None:
                continue
            try:
                plugin = ep.load()
                mismatch = check_plugin_contract(plugin)
                if mismatch:
                    errors.append(PluginError(ep.name, f"{mismatch}; it was skipped"))
                    continue
                pm.register(plugin, name=ep.name)
                origins[ep.name] = f"entry point {ep.value}"
            except KeyboardInterrupt:
                raise
            except BaseException as exc:  # noqa: BLE001 - a broken plugin (even one calling sys.exit) fails alone
                errors.append(PluginError(ep.name, f"failed to load ({ep.value}): {_one_line(exc)}; it was skipped"))
                log.debug("plugin %s failed:\n%s", ep.name, traceback.format_exc())

    if plugins_dir is not None:
        folder = Path(plugins_dir)
        if not folder.is_dir():
            errors.append(PluginError(str(folder), "--plugins-dir is not a folder"))
        else:
            for path in sorted(folder.glob("*.py")):
                name = path.stem
                if pm.is_blocked(name) or path.name.startswith("_"):
                    continue
                if pm.get_plugin(name) is not None:
                    errors.append(PluginError(name, f"{path} has the same name as an installed plugin; it was skipped"))
                    continue
                try:
                    module = _module_from_path(path)
                    mismatch = check_plugin_contract(module)
                    if mismatch:
                        errors.append(PluginError(name, f"{path} {mismatch}; it was skipped"))
                        continue
                    pm.register(module, name=name)
                    origins[name] = str(path)
                except KeyboardInterrupt:
                    raise
                except BaseException as exc:  # noqa: BLE001 - SystemExit at import fails this plugin only
                    errors.append(PluginError(name, f"failed to import {path}: {_one_line(exc)}; it was skipped"))
    pm.check_pending()
    return pm


@dataclass
class Registry:
    """Everything the plugins registered, plus one error line per problem."""

    methods: dict[str, type[Method]] = field(default_factory=dict)
    datasets: dict[str, DomainSpec] = field(default_factory=dict)
    validators: dict[str, Any] = field(default_factory=dict)
    backbones: dict[str, Callable[..., Any]] = field(default_factory=dict)
    plugins: dict[str, PluginInfo] = field(default_factory=dict)
    errors: list[PluginError] = field(default_factory=list)
    unavailable: list[Unavailable] = field(default_factory=list)
    owner: dict[tuple[str, str], str] = field(default_factory=dict)  # (kind, name) -> plugin
    pm: pluggy.PluginManager | None = None
    #: how :func:`get_registry` built it (``plugins_dir``, ``entrypoints``,
    #: ``blocked``), so a worker process can build the same one; None for a
    #: registry assembled in memory
    source: dict[str, Any] | None = None

    def method(self, name: str) -> type[Method]:
        return self.methods[name]


def _validate_domain(obj: Any) -> str:
    if not isinstance(obj, DomainSpec):
        raise ContractError(f"register() expects a dabench.data.DomainSpec, got {type(obj).__name__}")
    if not obj.name or ":" in obj.name or "," in obj.name:
        raise ContractError(f"dataset name {obj.name!r} must be non-empty without ':' or ','")
    if obj.n_classes < 2:
        raise ContractError(f"dataset {obj.name!r} must have at least 2 classes")
    return obj.name


def _validate_validator(obj: Any) -> str:
    name = getattr(obj, "name", None)
    if not isinstance(name, str) or not name:
        raise ContractError("a validator needs a non-empty string attribute 'name'")
    if not callable(getattr(obj, "score", None)):
        raise ContractError(f"validator {name!r} needs a score(predictor, task) -> float method")
    return name


def build_registry(pm: pluggy.PluginManager, errors: list[PluginError] | None = None,
                   origins: dict[str, str] | None = None) -> Registry:
    """Call every registration hook plugin by plugin and collect the results."""
    reg = Registry(errors=list(errors or []), pm=pm)
    origins = origins or {}
    for pname, _plugin in sorted(pm.list_name_plugin(), key=lambda t: t[0]):
        reg.plugins.setdefault(pname, PluginInfo(pname, origins.get(pname, "registered directly")))

    def run_hook(hook_name: str, kind: str, store: dict, validate: Callable[[Any], str], value_of: Callable) -> None:
        caller = getattr(pm.hook, hook_name)
        for impl in caller.get_hookimpls():
            pname = impl.plugin_name
            info = reg.plugins.setdefault(pname, PluginInfo(pname, origins.get(pname, "")))
            staged: dict[str, Any] = {}

            def register(*args: Any) -> None:
                obj = args[0] if len(args) == 1 else args
                name = validate(obj)
                if name in staged:
                    raise ContractError(f"registers {kind} {name!r} twice")
                staged[name] = value_of(obj)

            try:
                impl.function(register=register)
            except KeyboardInterrupt:
                raise
            except BaseException as exc:  # noqa: BLE001
                reg.errors.append(PluginError(pname, f"{hook_name} failed: {_one_line(exc)}; its {kind}s were skipped"))
                continue
            for name, value in staged.items():
                other = reg.owner.get((kind, name))
                if other is not None:
                    reg.errors.append(PluginError(
                        pname, f"{kind} {name!r} is already registered by plugin {other!r}; this one was skipped"))
                    continue
                store[name] = value
                reg.owner[(kind, name)] = pname
                getattr(info, kind + "s").append(name)

    def validate_method(cls: Any) -> str:
        validate_method_class(cls)
        return cls.name

    def validate_backbone(args: Any) -> str:
        if not (isinstance(args, tuple) and len(args) == 2 and isinstance(args[0], str) and callable(args[1])):
            raise ContractError("register(name, factory) expects a name and a callable")
        return args[0]

    run_hook("dabench_methods", "method", reg.methods, validate_method, lambda c: c)
    run_hook("dabench_datasets", "dataset", reg.datasets, _validate_domain, lambda d: d)
    run_hook("dabench_validators", "validator", reg.validators, _validate_validator, lambda v: v)
    run_hook("dabench_backbones", "backbone", reg.backbones, validate_backbone, lambda a: a[1])

    for impl in pm.hook.dabench_unavailable.get_hookimpls():
        pname = impl.plugin_name
        info = reg.plugins.setdefault(pname, PluginInfo(pname, origins.get(pname, "")))
        found: list[Unavailable] = []

        def say(kind: str, name: str, reason: str) -> None:
            if kind not in ("method", "validator", "dataset", "backbone", "plugin"):
                raise ContractError(f"dabench_unavailable: unknown kind {kind!r}")
            found.append(Unavailable(pname, kind, str(name), str(reason).strip().replace("\n", " ")))

        try:
            impl.function(register=say)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # noqa: BLE001
            reg.errors.append(PluginError(pname, f"dabench_unavailable failed: {_one_line(exc)}"))
            continue
        reg.unavailable += found
        info.unavailable += [(u.kind, u.name, u.reason) for u in found]
    return reg


def get_registry(plugins_dir: str | os.PathLike | None = None, entrypoints: bool = True,
                 blocked: Iterable[str] = ()) -> Registry:
    """Plugin manager + registry in one call (what the CLI uses)."""
    errors: list[PluginError] = []
    origins: dict[str, str] = {}
    blocked = tuple(blocked)
    pm = get_plugin_manager(plugins_dir, entrypoints, blocked, errors, origins)
    reg = build_registry(pm, errors, origins)
    reg.source = {"plugins_dir": None if plugins_dir is None else str(plugins_dir), "entrypoints": entrypoints,
                  "blocked": blocked}
    return reg
