"""Search-space parsing: Hydra sweep overrides to Optuna distributions, with the released plugin's meanings.

- ``choice(a, b, ...)`` (or ``a,b``): categorical over the values (str, int, float or bool).
- ``range(start, stop[, step])``: every ``step`` from ``start`` up to and including ``stop`` (an int or, if any of
  the three is a float, a float distribution with that step). Hydra's own basic sweeper stops before ``stop``; the
  released Optuna sweeper includes it, and so do we.
- ``shuffle(range(...))``: categorical over the values Hydra's range iterates (``stop`` excluded there);
  ``shuffle(choice(...))``: categorical over the choices. Both in the written order (the released plugin shuffles
  the order, which changes nothing but the sampling of a seeded search).
- ``interval(a, b)``: uniform float; ``int(interval(a, b))``: uniform int, both ends included;
  ``tag(log, ...)`` on either: log scale. We refuse any other tag, and tags on choice or range (the released
  plugin ignores them: a mistyped ``log`` would silently search a linear scale).

A param's name is its override key as written, ``+w`` or ``~z`` included, so the job gets ``+w=<value>`` and the
reports say ``+w``. Values reach jobs unchanged: a string choice ``'1'`` stays the string '1'.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, QuotedString, RangeSweep
from hydra.errors import HydraException
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution


@dataclass
class SearchSpace:
    """A parsed sweep: what Optuna samples (name -> distribution), and the lines every job gets unchanged."""

    distributions: dict[str, BaseDistribution]
    fixed: list[str]


@functools.cache
def _parser() -> OverridesParser:
    """One parser per process: building it costs about 0.1 s."""
    return OverridesParser.create()


def first_line(error: BaseException | str) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def parse_search_space(overrides: Sequence[str]) -> SearchSpace:
    """Parse ``key=value`` lines into a search space; a later line for the same key wins (command line over config).

    Raises ValueError with a one-line message naming the parameter, before anything is written.
    """
    parsed: dict[str, Override] = {}
    for line in overrides:
        name = line.split("=", 1)[0].lstrip("+~")
        try:
            parsed[name] = _parser().parse_override(line)
        except HydraException as e:
            raise ValueError(f"invalid search space for '{name}': {first_line(e)}") from None
    space = SearchSpace({}, [])
    for name, override in parsed.items():
        if not override.is_sweep_override() or override.is_delete():
            space.fixed.append(str(override.input_line))
            continue
        try:
            space.distributions[override.get_key_element()] = _distribution(override)
        except (HydraException, TypeError, ValueError) as e:
            raise ValueError(f"invalid search space for '{name}': {first_line(e)}") from None
    return space


def _distribution(override: Override) -> BaseDistribution:
    """One sweep override as an Optuna distribution (see the module docstring); Optuna checks the bounds."""
    value = override.value()
    if not isinstance(value, IntervalSweep | ChoiceSweep | RangeSweep):
        raise ValueError(f"unsupported sweep '{override.get_value_element_as_str()}'")
    unknown = set(value.tags) - {"log"}
    if unknown:
        raise ValueError(f"unknown tag(s) {sorted(unknown)}: only 'log' is supported")
    log_scale = "log" in value.tags
    if log_scale and not isinstance(value, IntervalSweep):
        raise ValueError("tag(log, ...) applies to interval(...) only")
    if isinstance(value, IntervalSweep):
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(value.start, value.end, log=log_scale)
        return FloatDistribution(value.start, value.end, log=log_scale)
    if isinstance(value, ChoiceSweep) or value.shuffle:
        items = value.list if isinstance(value, ChoiceSweep) else list(value.range())
        choices = [c.text if isinstance(c, QuotedString) else c for c in items]
        if not choices or not all(isinstance(c, str | int | float | bool) for c in choices):
            raise ValueError("choice(...) takes one or more str, int, float or bool values")
        return CategoricalDistribution(choices)
    if any(isinstance(v, float) for v in (value.start, value.stop, value.step)):
        return FloatDistribution(value.start, value.stop, step=value.step)
    return IntDistribution(value.start, value.stop, step=value.step)


def contains(distribution: BaseDistribution, value: Any) -> bool:
    """Whether an enqueued or warm-start value is in the space (Optuna itself would run it with a warning)."""
    if isinstance(value, bool) and not isinstance(distribution, CategoricalDistribution):
        return False
    try:
        return distribution._contains(distribution.to_internal_repr(value))
    except (TypeError, ValueError):
        return False


def grid(distribution: BaseDistribution) -> list[Any]:
    """Every value of a discrete distribution, both ends included: the grid sampler walks what the others draw
    from (the released plugin's grid leaves out the upper end)."""
    if isinstance(distribution, CategoricalDistribution):
        return list(distribution.choices)
    if distribution.step is None:
        raise ValueError("the grid sampler needs discrete params: choice, range or int(interval)")
    n = round((distribution.high - distribution.low) / distribution.step)
    return [distribution.low + i * distribution.step for i in range(n + 1)]


def grid_space(space: SearchSpace) -> dict[str, list[Any]]:
    """The grid sampler's search space: every param's values; a one-line ValueError naming a continuous param."""
    try:
        return {name: grid(d) for name, d in space.distributions.items()}
    except ValueError as e:
        bad = next(n for n, d in space.distributions.items() if getattr(d, "step", 0) is None)
        raise ValueError(f"hydra.sweeper.sampler: '{bad}': {e}") from None


def _parses_to(text: str, value: Any) -> bool:
    """Round-trip check: the job must see the very value Optuna recorded (e.g. the string '1', not the int 1)."""
    try:
        override = _parser().parse_override(f"k={text}")
    except HydraException:
        return False
    parsed = override.value()
    return not override.is_sweep_override() and type(parsed) is type(value) and parsed == value


def format_value(value: Any) -> str:
    """Override text that Hydra parses back to exactly ``value`` (floats keep repr precision)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    for text in (str(value), "'" + str(value).replace("'", "\\'") + "'"):
        if _parses_to(text, value):
            return text
    raise ValueError(f"cannot pass {value!r} through a Hydra override")


def space_json(space: dict[str, BaseDistribution]) -> dict[str, str]:
    return {name: optuna.distributions.distribution_to_json(d) for name, d in sorted(space.items())}


def _space_text(distribution: BaseDistribution) -> str:
    """A distribution in a few characters, for one-line errors."""
    if isinstance(distribution, CategoricalDistribution):
        return f"choice{tuple(distribution.choices)}"
    text = f"[{distribution.low}, {distribution.high}]"
    if distribution.log:
        text += " log"
    if distribution.step is not None and (isinstance(distribution, FloatDistribution) or distribution.step != 1):
        text += f" step {distribution.step}"
    return ("int" if isinstance(distribution, IntDistribution) else "float") + text


def space_diff(stored: dict[str, str], configured: dict[str, str]) -> str:
    """What differs between two spaces (as ``space_json`` gives them), in one line."""
    load = optuna.distributions.json_to_distribution
    parts = [f"{n} {_space_text(load(stored[n]))} now {_space_text(load(configured[n]))}"
             for n in sorted(stored.keys() & configured.keys()) if stored[n] != configured[n]]
    parts += [f"{n} no longer searched" for n in sorted(stored.keys() - configured.keys())]
    parts += [f"{n} not searched before" for n in sorted(configured.keys() - stored.keys())]
    return "; ".join(parts)
