"""Search-space distributions as written in the tune YAML, and the parsing of space trees.

A distribution is a mapping with one key: ``{choice: [100, 256, 512]}``,
``{uniform: [low, high]}``, ``{loguniform: [low, high]}`` or ``{randint: [low, high]}``
(``high`` excluded, as in ``ray.tune.randint``). Every error names the dotted key.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Mapping

from anomaly.config import ConfigError

DISTRIBUTIONS = ("choice", "uniform", "loguniform", "randint")


def invalid_value(key: str, value: Any, allowed: str) -> ConfigError:
    """Build the error for an invalid tune config value, naming the key and what is allowed."""
    return ConfigError(f"invalid tune config value {key}={value!r}: expected {allowed}")


def is_number(value: Any) -> bool:
    """Return True if ``value`` is a finite int or float, bools excluded."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class Distribution:
    """One searched key's distribution, as written in the YAML."""

    kind: str
    args: tuple[Any, ...]

    def to_tune(self) -> Any:
        """Return the matching ``ray.tune`` search domain."""
        from ray import tune

        if self.kind == "choice":
            return tune.choice(list(self.args))
        sampler = {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}[self.kind]
        return sampler(*self.args)

    def probes(self) -> list[Any]:
        """Return the values checked against the training config at load: every choice, or both range ends."""
        if self.kind == "choice":
            return list(self.args)
        low, high = self.args
        if self.kind == "randint":
            return [low, high - 1]
        # Tune samples floats here even between integer bounds, so an integer key must fail now.
        return [float(low), float(high)]

    def to_yaml(self) -> dict[str, list[Any]]:
        return {self.kind: list(self.args)}


# YAML 1.1, which PyYAML follows, reads 1e-4 (no dot) as a string. Only 1.0e-4 is a float.
_EXPONENT_NUMBER = re.compile(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+")


def _yaml_number(value: Any) -> Any:
    """Read a string such as ``"1e-4"`` as the float it was meant to be; leave anything else."""
    if isinstance(value, str) and _EXPONENT_NUMBER.fullmatch(value.strip()):
        return float(value)
    return value


def parse_distribution(key: str, value: Any) -> Distribution:
    """Parse ``{kind: [args]}`` into a :class:`Distribution`, naming ``key`` in every error."""
    example = "a distribution such as {choice: [100, 256]} or {loguniform: [1.0e-5, 1.0e-3]}"
    if not isinstance(value, Mapping) or len(value) != 1:
        raise invalid_value(key, value, example)
    (kind, args), = value.items()
    if kind not in DISTRIBUTIONS:
        raise invalid_value(key, value, "one of the distributions " + ", ".join(DISTRIBUTIONS))
    if not isinstance(args, (list, tuple)) or not args:
        raise invalid_value(key, value, f"{{{kind}: [...]}} with a non-empty list")
    args = [_yaml_number(v) for v in args]
    if kind == "choice":
        return Distribution(kind, tuple(args))

    if len(args) != 2:
        raise invalid_value(key, value, f"{{{kind}: [low, high]}}")
    low, high = args
    if kind == "randint":
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in args) or low >= high:
            raise invalid_value(key, value, "{randint: [low, high]} with integers low < high (high excluded)")
    elif not (is_number(low) and is_number(high) and low < high):
        raise invalid_value(key, value, f"{{{kind}: [low, high]}} with numbers low < high")
    elif kind == "loguniform" and low <= 0:
        raise invalid_value(key, value, "{loguniform: [low, high]} with 0 < low < high")
    return Distribution(kind, (low, high))


def is_distribution(value: Any) -> bool:
    """Return True if a YAML value is a distribution leaf such as ``{choice: [...]}``."""
    return isinstance(value, Mapping) and any(name in value for name in DISTRIBUTIONS)


def merge_space(base: Mapping[Any, Any], update: Mapping[Any, Any]) -> dict[Any, Any]:
    """Deep-merge two space trees, an updated distribution replacing the old one whole."""
    merged = dict(base)
    for key, value in update.items():
        old = merged.get(key)
        if (isinstance(value, Mapping) and isinstance(old, Mapping)
                and not is_distribution(value) and not is_distribution(old)):
            merged[key] = merge_space(old, value)
        else:
            merged[key] = value
    return merged


def parse_space(tree: Any, prefix: str) -> dict[str, Distribution]:
    """Walk a nested (or dotted) space mapping down to its distributions."""
    if tree is None:
        return {}
    if not isinstance(tree, Mapping):
        raise invalid_value(prefix, tree, "a mapping of config keys to distributions")
    space: dict[str, Distribution] = {}
    for name, value in tree.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if value is None:
            continue  # `--set space.model.kernel_size=null` takes a key out of the search
        if is_distribution(value):
            if len(value) > 1:
                raise invalid_value(key, value, "one distribution per key, e.g. only {loguniform: [...]}")
            space[key] = parse_distribution(key, value)
        elif isinstance(value, Mapping):
            space.update(parse_space(value, key))
        else:
            raise invalid_value(key, value,
                                "a distribution such as {choice: [...]}; fixed values go in the base config")
    return space


__all__ = [
    "DISTRIBUTIONS", "Distribution", "invalid_value", "is_distribution", "is_number", "merge_space",
    "parse_distribution", "parse_space",
]
