"""Hyperparameter search with Ray Tune, each trial a data-parallel Ray Train run of the training loop.

Ray 2.60's Train V2 cannot be passed to ``Tuner`` directly, so every trial is a
function trainable (:mod:`anomaly.tune_trial`) that runs the training loop on Ray
Train and forwards each epoch's metrics to Tune. Trials are ranked by ``objective`` on the val split, where
higher is better. The test split is read once, after the search, to evaluate the
best trial.

``TUNE_DIR`` (a local folder or an ``s3://`` URL) contains::

    tune_config.yaml       the validated search, compared on a rerun
    search/                Tune's experiment state (used to resume)
    trials/<trial_id>/     one training run folder per trial
    results.csv            one row per trial
    best.yaml              the best trial's training config, for python -m jobs.train
    val_by_trial.png       each trial's val metric, grouped by method
    best_test/             the test report of the best trial
"""

from __future__ import annotations

import logging
import math
import os
import posixpath
import time
from dataclasses import dataclass
from typing import Any

import yaml

from anomaly.config import Config, ConfigError, flatten
from anomaly.data import storage
from anomaly.data.stream import read_index
from anomaly.tune_report import (
    UNFINISHED,
    TrialRecord,
    best_by_method,
    best_trial,
    epoch_summary,
    plot_val_by_trial,
    short_error,
    trial_status,
    val_metric_text,
    write_best_config,
    write_results_csv,
)
from anomaly.tune_space import TuneSpec, trial_config
from anomaly.tune_trial import TIME_ATTR, TRIALS_FOLDER, param_space, run_trial, trial_dirname

log = logging.getLogger(__name__)

SEARCH_NAME = "search"  # Tune's experiment folder inside TUNE_DIR
SPEC_FILE = "tune_config.yaml"
TRIAL_DRIVER_CPUS = 1.0  # the Tune trial process that runs the Ray Train driver
METRIC = "objective"  # reported by the training loop each epoch, higher is better


@dataclass(frozen=True)
class SearchOutcome:
    """Outcome of :func:`run_search`."""

    records: list[TrialRecord]
    best: TrialRecord | None
    test_metrics: dict[str, Any] | None  # the best trial's test report, None without a best trial
    wall_seconds: float  # of Tuner.fit in this call, so a resumed search counts only this call
    max_concurrent_trials: int


def _probe_configs(spec: TuneSpec) -> list[Config]:
    """The base config of every method, and one config per searched ``ray.*`` value."""
    configs = []
    for method in spec.search.methods:
        configs.append(trial_config(spec.base, method, {}))
        for key, distribution in spec.spaces[method].items():
            if key.startswith("ray."):
                configs += [trial_config(spec.base, method, {key: v}) for v in distribution.probes()]
    return configs


def trial_request(spec: TuneSpec) -> dict[str, float]:
    """Resources of the largest possible trial: its driver CPU plus its Train workers."""
    configs = _probe_configs(spec)
    workers = max(c.ray.num_workers for c in configs)
    cpus_per_worker = max(c.ray.cpus_per_worker for c in configs)
    request = {"CPU": TRIAL_DRIVER_CPUS + workers * cpus_per_worker}
    if any(c.ray.use_gpu for c in configs):
        request["GPU"] = float(workers)
    return request


def fitting_trials(request: dict[str, float], total: dict[str, float]) -> int:
    """Count the trials of ``request`` that fit in ``total`` at once (at least 1 after check_resources)."""
    counts = [math.floor(total.get(name, 0.0) / amount + 1e-9)
              for name, amount in request.items() if amount > 0]
    return max(1, min(counts)) if counts else 1


def _describe_request(spec: TuneSpec, request: dict[str, float]) -> str:
    configs = _probe_configs(spec)
    workers = max(c.ray.num_workers for c in configs)
    gpus = ", 1 GPU each" if "GPU" in request else ""
    return (f"one search trial ({TRIAL_DRIVER_CPUS:g} CPU for its Tune driver + {workers} Train worker(s) "
            f"of {max(c.ray.cpus_per_worker for c in configs):g} CPU{gpus})")


def _concurrency(spec: TuneSpec, request: dict[str, float], autoscaling: bool) -> int:
    """Check that one trial fits the cluster and return how many trials run at once.

    Each trial's driver keeps its CPU while its Train workers wait for theirs, so more
    trials at once than the cluster fits would leave every trial waiting forever.
    """
    import ray

    from anomaly.ray_cluster import check_resources

    total = ray.cluster_resources()
    if autoscaling:
        # The cluster can grow, so neither the check nor the count can use the nodes up now.
        wanted = spec.search.max_concurrent_trials or fitting_trials(request, total)
        log.info("ray.autoscaling=true: not checking %s against the nodes up now; running %d trial(s) "
                 "at once (set search.max_concurrent_trials to change this)", request, wanted)
        return wanted
    check_resources(request, _describe_request(spec, request))
    fitting = fitting_trials(request, total)
    wanted = spec.search.max_concurrent_trials
    if wanted > fitting:
        log.warning("search.max_concurrent_trials=%d lowered to %d, the number of trials that fit the "
                    "cluster at once", wanted, fitting)
    return min(wanted, fitting) if wanted else fitting


def _spec_tree(spec: TuneSpec) -> dict[str, Any]:
    # Through YAML once, so tuples and lists compare equal with what a file contains.
    return yaml.safe_load(yaml.safe_dump(spec.to_tree(), sort_keys=True))


def _check_same_search(spec: TuneSpec, tune_dir: str) -> None:
    """Raise ConfigError if ``tune_dir`` contains a search started with other settings."""
    url = storage.join(tune_dir, SPEC_FILE)
    if not storage.exists(url):
        return
    previous, current = yaml.safe_load(storage.read_bytes(url)), _spec_tree(spec)
    if previous == current:
        return
    old, new = flatten(previous or {}), flatten(current)
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:5])
    raise ConfigError(
        f"{tune_dir} contains a search with other settings ({shown}). A search resumes only with the "
        "same config and --set overrides, so rerun it unchanged or pass a new --output folder"
    )


def _absolute(location: str) -> str:
    # Tune runs each trial in its own working folder, so local paths must not be relative.
    return location if storage.is_s3(location) else os.path.abspath(location)


def _make_tuner(spec: TuneSpec, job: dict[str, Any], max_concurrent: int) -> Any:
    """Build a new ``Tuner``, or restore the one whose experiment state is in ``TUNE_DIR/search``."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from anomaly.train.launch import storage_for

    trainable = tune.with_resources(tune.with_parameters(run_trial, job=job), {"cpu": TRIAL_DRIVER_CPUS})
    where = storage_for(job["tune_dir"])
    filesystem = where.get("storage_filesystem")
    join = posixpath.join if storage.is_s3(job["tune_dir"]) else os.path.join
    experiment = join(where["storage_path"], SEARCH_NAME)
    if tune.Tuner.can_restore(experiment, storage_filesystem=filesystem):
        # NOTE: Tune restores its saved TuneConfig, so the concurrency limit of the first run
        # applies again. A rerun on a smaller cluster can leave trials waiting for workers.
        log.info("resuming the search in %s (finished trials are kept)", experiment)
        return tune.Tuner.restore(experiment, trainable, resume_unfinished=True,
                                  resume_errored=spec.search.retry_errored, storage_filesystem=filesystem)

    scheduler = None
    if spec.search.scheduler == "asha" and spec.search.grace_period < spec.max_epochs:
        # ASHA's last rung is at max_t. A trial stopped there has already done all its work,
        # and the stop kills its Ray Train controller while it shuts the workers down, leaving
        # their placement group to Ray's cleaner. So the rungs end one epoch early.
        # NOTE: a trial whose searched train.epochs is below the maximum can still be stopped
        # after its own last epoch.
        scheduler = ASHAScheduler(time_attr=TIME_ATTR, max_t=spec.max_epochs - 1,
                                  grace_period=spec.search.grace_period,
                                  reduction_factor=spec.search.reduction_factor, stop_last_trials=False)
    elif spec.search.scheduler == "asha":
        log.info("search.grace_period=%d leaves ASHA no epoch to stop a trial before its last one (%d); "
                 "every trial runs to the end", spec.search.grace_period, spec.max_epochs)
    return tune.Tuner(
        trainable,
        param_space=param_space(spec),
        tune_config=tune.TuneConfig(
            metric=METRIC, mode="max", scheduler=scheduler, num_samples=spec.search.num_samples,
            trial_dirname_creator=trial_dirname,
            # Tune ignores TuneConfig.max_concurrent_trials when given a generator, so it goes here.
            search_alg=BasicVariantGenerator(max_concurrent=max_concurrent, random_state=spec.search.seed),
        ),
        run_config=tune.RunConfig(
            name=SEARCH_NAME, verbose=1,
            # A failed trial is recorded with its error; the others go on.
            failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
            **where,
        ),
    )


def collect_records(results: Any, spec: TuneSpec, tune_dir: str) -> list[TrialRecord]:
    """Build one :class:`TrialRecord` per trial of a Tune ``ResultGrid``, ordered by trial id."""
    from ray.tune import ExperimentAnalysis

    # A Result carries its trial's config only when the trial reported something, and no status.
    analysis = ExperimentAnalysis(results.experiment_path, storage_filesystem=results.filesystem)
    configs = analysis.get_all_configs()
    tune_status = {trial.trial_id: trial.status for trial in analysis.trials}
    records = []
    for result in results:
        trial_id = posixpath.basename(str(result.path).rstrip("/"))
        trial_params = configs[trial_id]
        method = int(trial_params["method"])
        params = flatten(trial_params.get(f"method_{method}") or {})
        try:
            max_epochs = trial_config(spec.base, method, params).train.epochs
        except ConfigError:
            max_epochs = trial_config(spec.base, method, {}).train.epochs
        run_dir = storage.join(tune_dir, TRIALS_FOLDER, trial_id)
        summary = epoch_summary(run_dir)
        error = short_error(str(result.error)) if result.error is not None else ""
        seconds = (result.metrics or {}).get("time_total_s")
        records.append(TrialRecord(
            trial_id=trial_id, method=method, params=params,
            status=trial_status(tune_status.get(trial_id, ""), error, summary["epochs"], max_epochs),
            max_epochs=max_epochs,
            trial_seconds=None if seconds is None else float(seconds), error=error, run_dir=run_dir,
            **summary,
        ))
    return sorted(records, key=lambda r: r.trial_id)


def run_search(spec: TuneSpec, shards: str, tune_dir: str) -> SearchOutcome:
    """Run (or resume) the search, then write the summaries and evaluate the best trial on test.

    Raises:
        ConfigError: If ``tune_dir`` contains a search with other settings.
        anomaly.ray_cluster.ClusterResourceError: If one trial can never fit the cluster.
        anomaly.data.stream.ShardIndexError: If ``shards`` has no shard index.
    """
    from anomaly.evaluate import evaluate_run
    from anomaly.ray_cluster import init_ray

    shards, tune_dir = _absolute(shards), _absolute(tune_dir)
    read_index(shards)  # fail now, not in every trial, when the shards are missing
    _check_same_search(spec, tune_dir)
    first = trial_config(spec.base, spec.search.methods[0], {})
    init_ray(first.ray.address, first.ray.num_cpus)
    request = trial_request(spec)
    max_concurrent = _concurrency(spec, request, first.ray.autoscaling)
    # Written only once the search can start, so a failed check leaves nothing to compare with.
    spec_url = storage.join(tune_dir, SPEC_FILE)
    if not storage.exists(spec_url):
        storage.write_bytes(spec_url, yaml.safe_dump(_spec_tree(spec), sort_keys=True).encode())

    trials = spec.search.num_samples * len(spec.search.methods)
    log.info("searching %d trials over methods %s, %d at a time, each requesting %s; output in %s",
             trials, list(spec.search.methods), max_concurrent, request, tune_dir)
    job = {"base": spec.base, "shards": shards, "tune_dir": tune_dir}
    tuner = _make_tuner(spec, job, max_concurrent)
    started = time.perf_counter()
    results = tuner.fit()
    wall_seconds = time.perf_counter() - started

    records = collect_records(results, spec, tune_dir)
    unfinished = [r.trial_id for r in records if r.status == UNFINISHED]
    if unfinished:
        log.warning("%d trial(s) did not finish (%s), for example because the search was interrupted; "
                    "rerun the same command to resume them", len(unfinished), ", ".join(unfinished))
    best = best_trial(records)
    write_results_csv(records, spec.searched_keys(), storage.join(tune_dir, "results.csv"))
    plot_val_by_trial(records, storage.join(tune_dir, "val_by_trial.png"), best)
    if best is None:
        log.error("no trial finished an epoch, so there is no best trial; see the error column of %s",
                  storage.join(tune_dir, "results.csv"))
        return SearchOutcome(records, None, None, wall_seconds, max_concurrent)

    write_best_config(best, storage.join(tune_dir, "best.yaml"))
    for method, record in best_by_method(records).items():
        log.info("best of method %d: trial %s, %s at epoch %s, params %s", method, record.trial_id,
                 val_metric_text(record), record.best_epoch, record.params)
    # The first and only time the search reads the test split.
    test_metrics = evaluate_run(best.run_dir, shards, "test", storage.join(tune_dir, "best_test"))
    log.info("best trial %s (method %d): %s, test AUROC %.4f", best.trial_id, best.method,
             val_metric_text(best), test_metrics["auroc"])
    return SearchOutcome(records, best, test_metrics, wall_seconds, max_concurrent)


__all__ = ["SearchOutcome", "collect_records", "fitting_trials", "run_search", "trial_request"]
