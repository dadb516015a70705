"""The hyperparameter search config: search settings, search spaces and the base training config.

A tune YAML has these top-level keys::

    search:        settings of the search (:class:`SearchConfig`)
    space:         distributions sampled for every method where the key applies
    method_space:  distributions for one method only, e.g. {5: {mask: {num_masks: {randint: [1, 4]}}}}
    base:          the base training config (model, loss, mask, score, optim, train, data, ray)
    model: ...     top-level training sections, merged over ``base`` (this is where --set lands)

Distributions are described in :mod:`anomaly.tune_distributions`. Keys may be
nested or dotted.

Everything is checked at load, before Ray starts: unknown keys and wrong types in
``search``, and every searched key against the training config, by building a
config with each choice and with both ends of each range for every method.
"""

from __future__ import annotations

import dataclasses
import logging
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from anomaly.config import (
    Config,
    ConfigError,
    from_dict,
    merge,
    parse_overrides,
    read_yaml,
    unflatten,
)
from anomaly.tune_distributions import (
    Distribution,
    invalid_value,
    is_number,
    merge_space,
    parse_space,
)

log = logging.getLogger(__name__)

TRAINING_SECTIONS = ("model", "loss", "mask", "score", "optim", "train", "data", "ray")
SPEC_SECTIONS = ("search", "space", "method_space", "base")
SCHEDULERS = ("asha", "fifo")
ALL_METHODS = (1, 2, 3, 4, 5)

# Keys that only some methods read. A key of the common `space` is left out of
# the other methods' trials, so results.csv shows no value that had no effect.
APPLIES_TO: dict[str, tuple[int, ...]] = {
    "model.kernel_size": (1, 2, 3),  # Skip-GANomaly's U-Net has fixed 4x4 kernels
    "loss.w_enc": (1, 2, 3),  # GANomaly's encoder loss
    "loss.w_lat": (4, 5),  # Skip-GANomaly's latent (discriminator feature) loss
    "score.skip_lambda": (4,),
    "mask.": (5,),  # every mask.* key: inpainting holes of method 5
}


@dataclass(frozen=True)
class SearchConfig:
    """Settings of the search itself; the ``search:`` section of the tune YAML."""

    methods: tuple[int, ...] = ALL_METHODS
    num_samples: int = 1  # trials per method, so num_samples * len(methods) trials in all
    scheduler: str = "asha"  # asha stops weak trials early; fifo runs every trial to the end
    grace_period: int = 1  # epochs every trial trains before ASHA may stop it
    reduction_factor: float = 2.0  # ASHA keeps the best 1/reduction_factor at each rung
    max_concurrent_trials: int = 0  # 0: as many as the cluster fits
    seed: int = 0  # seed of the sampler: the same YAML and seed draw the same trials
    retry_errored: bool = False  # on a rerun, retry trials that ended in ERROR


@dataclass(frozen=True)
class TuneSpec:
    """A validated search: settings, the base training config and each method's space."""

    search: SearchConfig
    base: dict[str, Any]  # nested training config, without model.method
    spaces: dict[int, dict[str, Distribution]]  # method -> dotted key -> distribution
    max_epochs: int  # maximum train.epochs over all trials

    def searched_keys(self) -> list[str]:
        """All dotted keys searched for at least one method, sorted."""
        return sorted({key for space in self.spaces.values() for key in space})

    def to_tree(self) -> dict[str, Any]:
        """Plain nested data, for ``tune_config.yaml`` and the rerun check."""
        search = {f.name: getattr(self.search, f.name) for f in dataclasses.fields(SearchConfig)}
        search["methods"] = list(self.search.methods)
        spaces = {m: {k: d.to_yaml() for k, d in sorted(space.items())} for m, space in self.spaces.items()}
        return {"search": search, "base": self.base, "spaces": spaces}


def _coerce_search_value(key: str, value: Any, annotation: Any) -> Any:
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise invalid_value(key, value, "true or false")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise invalid_value(key, value, "an integer")
    if annotation is float:
        if is_number(value):
            return float(value)
        raise invalid_value(key, value, "a number")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise invalid_value(key, value, "a string")
    # The only tuple field is `methods`.
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value:
        raise invalid_value(key, value, "a non-empty list of methods, e.g. [1, 4]")
    for method in value:
        if method not in ALL_METHODS or isinstance(method, bool):
            raise invalid_value(key, value, "methods from 1, 2, 3, 4, 5")
    if len(set(value)) != len(value):
        raise invalid_value(key, value, "each method at most once")
    return tuple(value)


def parse_search(values: Mapping[str, Any]) -> SearchConfig:
    """Build and check the ``search`` section."""
    hints = typing.get_type_hints(SearchConfig)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise ConfigError(f"unknown tune config key search.{unknown[0]}: allowed keys in 'search' are "
                          + ", ".join(sorted(hints)))
    search = SearchConfig(**{k: _coerce_search_value(f"search.{k}", v, hints[k]) for k, v in values.items()})
    if search.num_samples < 1:
        raise invalid_value("search.num_samples", search.num_samples, "1 or more trials per method")
    if search.scheduler not in SCHEDULERS:
        raise invalid_value("search.scheduler", search.scheduler, "one of " + ", ".join(SCHEDULERS))
    if search.grace_period < 1:
        raise invalid_value("search.grace_period", search.grace_period, "1 or more epochs")
    if search.reduction_factor <= 1:
        raise invalid_value("search.reduction_factor", search.reduction_factor, "a number above 1")
    if search.max_concurrent_trials < 0:
        raise invalid_value("search.max_concurrent_trials", search.max_concurrent_trials,
                            "0 (automatic) or more")
    return search


def applies(key: str, method: int) -> bool:
    """Return True if ``method`` reads the config ``key`` (see ``APPLIES_TO``)."""
    for pattern, methods in APPLIES_TO.items():
        if key == pattern or (pattern.endswith(".") and key.startswith(pattern)):
            return method in methods
    return True


def trial_tree(base: Mapping[str, Any], method: int, params: Mapping[str, Any]) -> dict[str, Any]:
    """The nested training config of one trial: base, then the method, then the sampled values."""
    tree = merge(base, {"model": {"method": method}})
    return merge(tree, unflatten(dict(params)))


def trial_config(base: Mapping[str, Any], method: int, params: Mapping[str, Any]) -> Config:
    """Build and validate the training config of one trial (see :func:`trial_tree`)."""
    return from_dict(trial_tree(base, method, params))


def _method_spaces(search: SearchConfig, common: dict[str, Distribution],
                   per_method: Any) -> dict[int, dict[str, Distribution]]:
    if per_method is None:
        per_method = {}
    if not isinstance(per_method, Mapping):
        raise invalid_value("method_space", per_method, "a mapping from method number to a space")
    extra: dict[int, dict[str, Distribution]] = {}
    for raw_method, tree in per_method.items():
        try:
            method = int(raw_method)
        except (TypeError, ValueError):
            method = 0
        if method not in ALL_METHODS:
            raise invalid_value("method_space", raw_method, "method numbers 1 to 5 as keys")
        extra[method] = parse_space(tree, "")
        if method not in search.methods and extra[method]:
            log.warning("method_space.%d is ignored: method %d is not in search.methods %s",
                        method, method, list(search.methods))

    spaces: dict[int, dict[str, Distribution]] = {}
    for method in search.methods:
        spaces[method] = {k: d for k, d in common.items() if applies(k, method)}
        spaces[method].update(extra.get(method, {}))
    return spaces


def _check_space(base: dict[str, Any], method: int, space: dict[str, Distribution]) -> int:
    """Build a config for every probe value of every key; return the largest epoch count seen."""
    try:
        config = trial_config(base, method, {})
    except ConfigError as exc:
        raise ConfigError(f"base training config with model.method={method}: {exc}") from exc
    max_epochs = config.train.epochs
    for key, distribution in space.items():
        if key == "model.method":
            raise ConfigError("model.method cannot be searched in a space: "
                              "list the methods in search.methods instead")
        for value in distribution.probes():
            try:
                config = trial_config(base, method, {key: value})
            except ConfigError as exc:
                raise ConfigError(f"search space {key}={value!r} for method {method}: {exc}") from exc
            max_epochs = max(max_epochs, config.train.epochs)
    return max_epochs


def build_spec(tree: Mapping[str, Any]) -> TuneSpec:
    """Validate a parsed tune YAML (with overrides merged in) and build the :class:`TuneSpec`."""
    allowed = SPEC_SECTIONS + TRAINING_SECTIONS
    unknown = sorted(str(k) for k in set(tree) - set(allowed))
    if unknown:
        raise ConfigError(f"unknown tune config section {unknown[0]!r}: allowed sections are "
                          + ", ".join(allowed))
    search_values = tree.get("search") or {}
    if not isinstance(search_values, Mapping):
        raise invalid_value("search", search_values, "a mapping of search settings")
    search = parse_search(search_values)

    base_values = tree.get("base") or {}
    if not isinstance(base_values, Mapping):
        raise invalid_value("base", base_values, "a mapping of training config sections")
    base = merge(base_values, {name: tree[name] for name in TRAINING_SECTIONS if name in tree})
    model = base.get("model")
    if isinstance(model, Mapping) and "method" in model:
        raise ConfigError(
            f"the base training config sets model.method={model['method']!r}, but a search takes its "
            "methods from search.methods: remove model.method and set for example search.methods=[1, 4]"
        )

    common = parse_space(tree.get("space"), "")
    spaces = _method_spaces(search, common, tree.get("method_space"))
    max_epochs = max(_check_space(base, method, spaces[method]) for method in search.methods)
    return TuneSpec(search, base, spaces, max_epochs)


def _method_keys_as_int(tree: dict[str, Any]) -> dict[str, Any]:
    """Key ``method_space`` by int, since ``--set method_space.4...`` gives the string "4"."""
    per_method = tree.get("method_space")
    if not isinstance(per_method, Mapping):
        return tree
    keyed = {int(k) if isinstance(k, str) and k.isdigit() else k: v for k, v in per_method.items()}
    return {**tree, "method_space": keyed}


def merge_tune_trees(tree: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Merge overrides into a tune YAML tree; in the spaces a new distribution replaces the old one."""
    tree, update = _method_keys_as_int(dict(tree)), _method_keys_as_int(dict(update))
    spaces = {name: merge_space(tree.get(name) or {}, update[name])
              for name in ("space", "method_space")
              if isinstance(update.get(name), Mapping) and isinstance(tree.get(name) or {}, Mapping)}
    return {**merge(tree, update), **spaces}


def load_tune_config(path: str | Path | None, overrides: list[str] | None = None) -> TuneSpec:
    """Read a tune YAML, apply ``--set key=value`` overrides and validate it (:func:`build_spec`)."""
    tree = read_yaml(path) if path else {}
    tree = merge_tune_trees(tree, parse_overrides(overrides))
    return build_spec(tree)


__all__ = [
    "APPLIES_TO", "SearchConfig", "TuneSpec", "applies", "build_spec", "load_tune_config",
    "merge_tune_trees", "parse_search", "trial_config", "trial_tree",
]
