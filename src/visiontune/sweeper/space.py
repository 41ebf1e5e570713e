"""The search space: Hydra's sweep grammar as Optuna distributions, sampled values back as overrides.

`interval(a, b)` is a float range, `int(interval(a, b))` an int range, `tag(log, ...)` makes either
log-uniform, `range(a, b, step)` is discrete like Python's range (b excluded), and `choice(...)` or
`a,b,c` is categorical. Later overrides of a key replace earlier ones, so a plain `key=value` on the
command line fixes a parameter that `hydra.sweeper.params` would search.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from visiontune.errors import UserError

_ABSENT = object()
_NATIVE = (bool, int, float, str)


@dataclass
class Param:
    """One searched parameter: `name` is Optuna's name for it, `key` the override's left-hand side."""

    name: str
    key: str
    distribution: Any
    labels: list[str] = field(default_factory=list)  # categorical: each choice as override text

    def override(self, value: Any) -> str:
        from optuna.distributions import CategoricalDistribution

        if isinstance(self.distribution, CategoricalDistribution):
            choices = self.distribution.choices
            index = next(i for i, c in enumerate(choices) if type(c) is type(value) and c == value)
            return f"{self.key}={self.labels[index]}"
        return f"{self.key}={value!r}" if isinstance(value, float) else f"{self.key}={value}"


def parse(params: dict[str, str], arguments: list[str], config: DictConfig) -> tuple[list[Param], list[str]]:
    """(searched parameters, fixed overrides) from `hydra.sweeper.params` and the command line.

    Raises UserError for grammar errors, unknown keys and sweeps Optuna cannot sample.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    lines = [f"{k}={v}" for k, v in params.items()] + list(arguments)
    parser = OverridesParser.create()
    by_name: dict[str, Param | str] = {}
    for line in lines:
        try:
            override = parser.parse_override(line)
        except HydraException as exc:
            raise UserError(f"cannot parse the sweep override '{line}': {first_line(exc)}") from None
        override.input_line = override.input_line or line
        name = override.key_or_group + (f"@{override.package}" if override.package else "")
        by_name.pop(name, None)  # a later override of a key replaces an earlier one
        if override.is_sweep_override():
            check_key(override, config)
            by_name[name] = to_param(name, override)
        else:
            by_name[name] = override.input_line
    space = [p for p in by_name.values() if isinstance(p, Param)]
    fixed = [p for p in by_name.values() if isinstance(p, str)]
    return space, fixed


def check_key(override, config: DictConfig) -> None:
    """A searched key must exist (a config value or a config group), unless it is added with +/++."""
    key = override.key_or_group
    if override.is_add() or override.is_force_add() or override.is_hydra_override():
        return
    if key in config.hydra.runtime.choices:
        return
    if OmegaConf.select(config, key, default=_ABSENT, throw_on_resolution_failure=False) is _ABSENT:
        raise UserError(
            f"search space key '{key}' is not in the config; check its spelling "
            f"(python -m <app> --cfg job shows the config) or write +{key} to add a new key"
        )


def to_param(name: str, override) -> Param:
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep

    sweep = override.value()
    key = override.get_key_element()
    unknown = set(sweep.tags) - {"log"}
    if unknown:
        raise UserError(
            f"'{override.input_line}': the only tag the sweeper knows is 'log', not {sorted(unknown)}"
        )
    log = "log" in sweep.tags
    try:
        if isinstance(sweep, ChoiceSweep):
            return choice_param(name, key, override, log)
        if isinstance(sweep, RangeSweep):
            return Param(name, key, range_distribution(sweep, log))
        if isinstance(sweep, IntervalSweep):
            return Param(name, key, interval_distribution(sweep, log))
    except ValueError as exc:  # Optuna's checks: low > high, log with low <= 0, ...
        raise UserError(f"'{override.input_line}': {first_line(exc)}") from None
    raise UserError(f"'{override.input_line}': the Optuna sweeper cannot sample {type(sweep).__name__}")


def choice_param(name: str, key: str, override, log: bool) -> Param:
    from optuna.distributions import CategoricalDistribution

    if log:
        raise UserError(f"'{override.input_line}': tag(log, ...) needs interval or range, not choice")
    values = override.value().list
    labels = list(override.sweep_string_iterator())
    # lists and dicts are not Optuna choices: those are searched as their override text
    choices = [v if isinstance(v, _NATIVE) else s for v, s in zip(values, labels, strict=True)]
    unique = {}
    for c, s in zip(choices, labels, strict=True):
        unique.setdefault((type(c), c), (c, s))
    if not unique:
        raise UserError(f"'{override.input_line}': choice() needs at least one value")
    return Param(
        name, key, CategoricalDistribution([c for c, _ in unique.values()]), [s for _, s in unique.values()]
    )


def range_distribution(sweep, log: bool):
    from optuna.distributions import FloatDistribution, IntDistribution

    values = list(sweep.range())
    if not values:
        raise ValueError("the range is empty (range(start, stop, step) excludes stop)")
    low, high, step = min(values), max(values), abs(sweep.step)
    if log and step != 1:
        raise ValueError("tag(log, range(...)) needs step 1; use tag(log, int(interval(a, b)))")
    if all(isinstance(v, int) for v in values) and isinstance(step, int):
        return IntDistribution(low, high, log=log, step=1 if log else step)
    if log:
        raise ValueError("tag(log, ...) of a float range: use tag(log, interval(a, b))")
    return FloatDistribution(float(low), round(low + step * (len(values) - 1), 12), step=float(step))


def interval_distribution(sweep, log: bool):
    from optuna.distributions import FloatDistribution, IntDistribution

    if isinstance(sweep.start, int) and isinstance(sweep.end, int):
        return IntDistribution(sweep.start, sweep.end, log=log)
    return FloatDistribution(float(sweep.start), float(sweep.end), log=log)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
