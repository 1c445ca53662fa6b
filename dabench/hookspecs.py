"""Hook specifications of dabench.

Plugins implement these with ``@dabench.hookimpl``.  Registration hooks get a
``register`` callback (as in ``llm``): the host collects, validates and
rejects duplicates, so one broken plugin fails alone and the others keep
working.  A plugin is any module listed in the ``dabench`` entry-point group,
or any ``.py`` file in a ``--plugins-dir`` folder.
"""

from __future__ import annotations

from typing import Any, Callable

import pluggy

hookspec = pluggy.HookspecMarker("dabench")


@hookspec
def dabench_methods(register: Callable[[type], None]) -> None:
    """Register method classes.

    Called once per plugin when the host builds its registry (every CLI
    command that needs methods, and :func:`dabench.plugins.get_registry`).

    :param register: call ``register(MethodClass)`` once per method.  The
        class must subclass :class:`dabench.Method`, declare ``name``,
        ``family`` and ``hyperparameters``, and implement ``fit(task)``.
        An invalid class, or a name another plugin already registered, is
        rejected with an error naming this plugin; other plugins are
        unaffected.
    :return: nothing (the return value is ignored).
    """


@hookspec
def dabench_datasets(register: Callable[[Any], None]) -> None:
    """Register domains (datasets) that pairs can be built from.

    Called once per plugin when the host builds its registry.

    :param register: call ``register(DomainSpec)`` once per domain, with a
        :class:`dabench.data.DomainSpec` (name, label space, number of
        classes, input shape, and a ``load(data_root) -> (X, y)`` callable).
        Two domains form a pair (``"source:target"`` in a suite) when their
        label spaces are equal.
    :return: nothing.
    """


@hookspec
def dabench_validators(register: Callable[[Any], None]) -> None:
    """Register validators: scores for choosing hyperparameters without target labels.

    Called once per plugin when the host builds its registry.

    :param register: call ``register(Validator)`` once per validator, with a
        :class:`dabench.validators.Validator` (``name``, ``paper``, and
        ``score(predictor, task) -> float`` where higher is better).  A
        validator sees exactly what a method sees (a :class:`dabench.Task`),
        never target test labels.
    :return: nothing.
    """


@hookspec
def dabench_backbones(register: Callable[[str, Callable[..., Any]], None]) -> None:
    """Register feature-extractor factories that suites may name.

    Called once per plugin when the host builds its registry.

    :param register: call ``register(name, factory)`` where
        ``factory(shape) -> (torch.nn.Module, out_dim)`` builds a fresh,
        untrained-or-pretrained feature extractor for inputs of ``shape``.
    :return: nothing.
    """


@hookspec
def dabench_unavailable(register: Callable[[str, str, str], None]) -> None:
    """Say what this plugin cannot provide on this machine, and why.

    Called once per plugin when the host builds its registry, after the
    registration hooks.  An optional dependency that is missing or cannot be
    imported should not fail the host: register what you can, and report the
    rest here.  ``dabench list plugins`` shows them under the plugin, one
    line per reason; no other command prints them (a suite that names an
    unavailable method is refused with the reason).

    :param register: call ``register(kind, name, reason)`` with ``kind`` one of
        ``"method"``, ``"validator"``, ``"dataset"``, ``"backbone"`` or
        ``"plugin"`` (the whole plugin), the ``name`` users would type, and a
        one-line ``reason`` that says what to install or fix.
    :return: nothing.
    """


@hookspec
def dabench_run_finished(record: dict[str, Any]) -> None:
    """Called after each run has been written to the store (ok, failed or skipped).

    Runs in the process that writes the store (the driver), after the
    transaction commits, so a logger sees only durable records.  Exceptions
    raised here are reported and ignored: a logger cannot fail a sweep.

    :param record: a flat dict of scalars: ``key``, ``suite``, ``pair``,
        ``method``, ``method_version``, ``params`` (JSON text), ``seed``,
        ``status`` (``"ok"``, ``"failed"``, ``"skipped"``), ``reason``,
        ``target_acc``, ``target_f1``, ``source_acc``, ``wall_time_s``,
        ``rss_peak_mb`` (resident memory the run added, CPU), ``gpu_peak_mb``
        (CUDA allocator peak, or None), ``device``, ``threads`` (torch threads
        of the run), ``torch_version`` and one ``val_<validator>`` entry per
        validator.
    :return: nothing.
    """
