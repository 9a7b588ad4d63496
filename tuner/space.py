"""Search-space files: load and validate a YAML file into a typed `SearchSpace` (tuner/search_space.py).

A space file has four sections (see search_spaces/vpsde.yaml):

    hyperparameters:   what the search varies, by short name (lr, batch_size, num_res_blocks, ch_mult,
                       sampling_eps) or by any dotted TrialConfig field (model.dropout, train.ema_decay, ...)
    fixed:             a partial TrialConfig: everything a trial needs that the search does not vary
    search:            algorithm and scheduler (the names of tuner/search_tables.py), trial count, concurrency,
                       seed, ASHA's grace period and reduction factor, re-scoring top k, time budget, retries
    resources:         CPUs per trial, and the GPU fraction used when the cluster has GPUs

Every problem raises `SpaceError` with one line naming the file and the field, before anything starts.
"""

from __future__ import annotations

import copy
import hashlib
import math
from pathlib import Path
from typing import Any

from trials.cli import UserError
from trials.config import ConfigError, TrialConfig, build_dataclass, field_paths, read_yaml, set_dotted
from tuner.search_space import KINDS, Hyperparameter, Resources, SearchSettings, SearchSpace
from tuner.search_tables import SCHEDULERS, SEARCH_ALGORITHMS

# The seed's five hyperparameters by their familiar names.
SHORT_NAMES = {
    "lr": "train.lr",
    "batch_size": "train.batch_size",
    "num_res_blocks": "model.num_res_blocks",
    "ch_mult": "model.ch_mult",
    "sampling_eps": "sde.sampling_eps",
}


class SpaceError(UserError, ValueError):
    """A search-space file is wrong; the message is one line naming the file and the field."""


def load_space(path: str | Path) -> SearchSpace:
    try:
        raw, raw_bytes = read_yaml(path)
    except ConfigError as exc:
        raise SpaceError(str(exc)) from None
    if not isinstance(raw, dict):
        raise SpaceError(f"{path}: must be a mapping with sections hyperparameters, fixed, search, resources")
    return parse_space(raw, str(path), hashlib.sha256(raw_bytes).hexdigest(), default_name=Path(path).stem)


def parse_space(raw: dict[str, Any], where: str, sha256: str = "", default_name: str = "space") -> SearchSpace:
    def fail(field_path: str, message: str):
        raise SpaceError(f"{where}: {field_path}: {message}")

    sections = {"name", "hyperparameters", "fixed", "search", "resources"}
    for key in raw:
        if key not in sections:
            fail(key, f"unknown section (known: {', '.join(sorted(sections))})")
    name = raw.get("name", default_name)
    if not isinstance(name, str) or not name or any(c in name for c in "/\\ "):
        fail("name", f"must be a non-empty word without slashes or spaces, got {name!r}")

    fixed = raw.get("fixed") or {}
    if not isinstance(fixed, dict):
        fail("fixed", "must be a mapping of TrialConfig sections (data, model, sde, train, eval, sample)")
    try:
        TrialConfig.from_dict(fixed)
    except ConfigError as exc:
        fail(*f"fixed.{exc}".split(": ", 1))

    hps_raw = raw.get("hyperparameters")
    if not isinstance(hps_raw, dict) or not hps_raw:
        fail("hyperparameters", "must be a non-empty mapping of name -> {type, ...}")
    known_paths = field_paths()
    hyperparameters = []
    for hp_name, spec in hps_raw.items():
        hp = _parse_hyperparameter(str(hp_name), spec, known_paths, fail)
        _check_values_fit_the_model(hp, fixed, fail)
        hyperparameters.append(hp)
    paths = [hp.path for hp in hyperparameters]
    if len(set(paths)) != len(paths):
        dup = next(p for p in paths if paths.count(p) > 1)
        fail("hyperparameters", f"two entries set the same field {dup}")

    search_raw = dict(raw.get("search") or {}) if isinstance(raw.get("search"), dict) else raw.get("search")
    points_raw = search_raw.pop("points_to_evaluate", None) if isinstance(search_raw, dict) else None
    if isinstance(search_raw, dict) and "tpe_startup_trials" in search_raw and "startup_trials" not in search_raw:
        search_raw["startup_trials"] = search_raw.pop("tpe_startup_trials")  # the name before GP joined TPE
    search = _parse_section(SearchSettings, search_raw, "search", fail)
    points = _parse_points(points_raw, hyperparameters, fixed, fail)
    if search.algorithm not in SEARCH_ALGORITHMS:
        fail("search.algorithm", f"must be one of {', '.join(SEARCH_ALGORITHMS)}, got {search.algorithm!r}")
    if search.scheduler not in SCHEDULERS:
        fail("search.scheduler", f"must be one of {', '.join(SCHEDULERS)}, got {search.scheduler!r}")
    for key in ("num_samples", "max_concurrent", "top_k", "grace_period", "startup_trials"):
        if getattr(search, key) < 1:
            fail(f"search.{key}", f"must be >= 1, got {getattr(search, key)}")
    if search.reduction_factor < 2:
        fail("search.reduction_factor", f"must be >= 2, got {search.reduction_factor}")
    if search.max_failures < 0:
        fail("search.max_failures", f"must be >= 0, got {search.max_failures}")
    if search.time_budget_s is not None and search.time_budget_s <= 0:
        fail("search.time_budget_s", f"must be > 0, got {search.time_budget_s}")
    train = TrialConfig.from_dict(fixed).train
    if search.grace_period < train.val_every:
        fail(
            "search.grace_period",
            f"must be >= fixed.train.val_every ({train.val_every}): "
            "ASHA can only stop a trial at a step where it reports",
        )
    if search.grace_period > train.steps:
        fail("search.grace_period", f"must be <= fixed.train.steps ({train.steps})")

    resources = _parse_section(Resources, raw.get("resources"), "resources", fail)
    if resources.cpus_per_trial <= 0:
        fail("resources.cpus_per_trial", f"must be > 0, got {resources.cpus_per_trial}")
    if not 0 <= resources.gpus_per_trial <= 1:
        fail("resources.gpus_per_trial", f"must be in [0, 1] (a fraction of one GPU), got {resources.gpus_per_trial}")
    return SearchSpace(name, where, sha256, tuple(hyperparameters), fixed, search, resources, points)


def _parse_hyperparameter(name: str, spec: Any, known_paths: dict[str, Any], fail) -> Hyperparameter:
    where = f"hyperparameters.{name}"
    path = SHORT_NAMES.get(name, name)
    if path not in known_paths:
        fail(
            where,
            f"unknown hyperparameter (use one of {', '.join(SHORT_NAMES)} or a config field such as model.dropout)",
        )
    if not isinstance(spec, dict):
        fail(where, "must be a mapping like {type: loguniform, low: 1e-5, high: 1e-2}")
    kind = spec.get("type")
    if kind not in KINDS:
        fail(f"{where}.type", f"must be one of {', '.join(KINDS)}, got {kind!r}")
    allowed = {"type", "values"} if kind == "choice" else {"type", "low", "high"}
    for key in spec:
        if key not in allowed:
            fail(f"{where}.{key}", f"unknown key for type {kind} (known: {', '.join(sorted(allowed))})")
    if kind == "choice":
        values = spec.get("values")
        if not isinstance(values, list) or not values:
            fail(f"{where}.values", "must be a non-empty list")
        hp = Hyperparameter(name, path, kind, values=tuple(values))
        labels = hp.labels()
        if len(set(map(repr, labels))) != len(labels):
            fail(f"{where}.values", f"has duplicates: {values}")
        return hp
    bounds = {}
    for key in ("low", "high"):
        value = spec.get(key)
        if isinstance(value, str):
            try:
                value = float(value)  # YAML 1.1 reads 1e-5 (no dot) as a string
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            fail(f"{where}.{key}", f"must be a finite number, got {spec.get(key)!r}")
        bounds[key] = value
    if kind == "randint" and not all(float(v).is_integer() for v in bounds.values()):
        fail(where, f"randint bounds must be integers, got {bounds['low']} and {bounds['high']}")
    if bounds["low"] >= bounds["high"]:
        fail(f"{where}.low", f"must be < high ({bounds['high']}), got {bounds['low']}")
    if kind == "loguniform" and bounds["low"] <= 0:
        fail(f"{where}.low", f"must be > 0 for a loguniform range, got {bounds['low']}")
    return Hyperparameter(name, path, kind, low=bounds["low"], high=bounds["high"])


def _parse_points(raw: Any, hyperparameters: list[Hyperparameter], fixed: dict[str, Any], fail) -> tuple[dict, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        fail("search.points_to_evaluate", "must be a list of {hyperparameter: value} mappings")
    by_name = {hp.name: hp for hp in hyperparameters}
    points = []
    for i, point in enumerate(raw):
        where = f"search.points_to_evaluate[{i}]"
        if not isinstance(point, dict) or not point:
            fail(where, "must be a non-empty mapping of hyperparameter: value")
        labelled = {}
        for name, value in point.items():
            hp = by_name.get(name)
            if hp is None:
                fail(f"{where}.{name}", f"not a hyperparameter of this space (have: {', '.join(by_name)})")
            if not hp.contains(value):
                fail(
                    f"{where}.{name}",
                    f"{value!r} is not one of the choices {list(hp.values)}"
                    if hp.is_choice
                    else f"must be a number in [{hp.low}, {hp.high}], got {value!r}",
                )
            labelled[name] = hp.label(value)
        # Optuna's warm start needs every hyperparameter; the unnamed ones take a neutral default.
        for hp in hyperparameters:
            labelled.setdefault(hp.name, _default_point(hp, fixed))
        points.append(labelled)
    return tuple(points)


def _default_point(hp: Hyperparameter, fixed: dict[str, Any]) -> Any:
    """The fixed config's value when the range allows it, else the first choice or the range's middle."""
    value = TrialConfig.from_dict(fixed).flat()[hp.path]
    if hp.contains(value):
        return hp.label(value)
    return hp.labels()[0] if hp.is_choice else hp.middle()


def _check_values_fit_the_model(hp: Hyperparameter, fixed: dict[str, Any], fail) -> None:
    """Build a TrialConfig at every choice (or at both bounds) so a bad value fails now, not in trial 17."""
    for value in hp.probes():
        tree = copy.deepcopy(fixed)
        set_dotted(tree, hp.path, value)
        try:
            TrialConfig.from_dict(tree)
        except ConfigError as exc:
            fail(f"hyperparameters.{hp.name}", f"value {value!r} is not usable: {exc}")


def _parse_section(cls, raw: Any, section: str, fail):
    try:
        return build_dataclass(cls, {} if raw is None else raw, f"{section}.")
    except ConfigError as exc:
        fail(*str(exc).split(": ", 1))
