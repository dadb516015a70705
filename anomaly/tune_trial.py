"""The trial side of the search: Tune's param space and the function each trial runs.

Each trial is a Ray Tune function trainable that builds its training config from
the sampled values and calls :func:`anomaly.train.launch.run_training`, whose Ray
Train run forwards each epoch's metrics to Tune through :class:`EpochReportCallback`.
"""

from __future__ import annotations

from typing import Any

from ray.tune.integration.ray_train import TuneReportCallback

from anomaly.config import flatten, unflatten
from anomaly.data import storage
from anomaly.tune_space import TuneSpec, trial_config

TRIALS_FOLDER = "trials"  # TUNE_DIR/trials/<trial_id> is each trial's run folder
TIME_ATTR = "epochs_done"  # ASHA's time attribute, added to each epoch's metrics


class EpochReportCallback(TuneReportCallback):
    """Forward rank 0's epoch metrics to Tune, adding ``epochs_done`` for the scheduler.

    ASHA needs a time attribute that keeps counting when a resumed trial starts a
    new process, and Tune's own ``training_iteration`` restarts from 1 in that case.
    """

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if metrics and "epoch" in metrics[0]:
            metrics = [{**metrics[0], TIME_ATTR: int(metrics[0]["epoch"]) + 1}, *metrics[1:]]
        super().after_report(run_context, metrics, checkpoint)


def run_trial(params: dict[str, Any], job: dict[str, Any]) -> None:
    """Train one sampled config into ``TUNE_DIR/trials/<trial_id>``; the Tune function trainable.

    A rerun of an interrupted trial resumes from the run folder's last Ray Train
    checkpoint, because ``run_training`` reuses the run folder's name and storage.
    """
    from ray import tune

    from anomaly.logs import setup_logging
    from anomaly.train.launch import run_training

    setup_logging()
    method = int(params["method"])
    # A sampled value that makes an invalid config raises ConfigError here,
    # and Tune records the trial as ERROR.
    config = trial_config(job["base"], method, flatten(params.get(f"method_{method}") or {}))
    run_dir = storage.join(job["tune_dir"], TRIALS_FOLDER, tune.get_context().get_trial_id())
    run_training(config, job["shards"], run_dir, callbacks=[EpochReportCallback()], start_ray=False)


def trial_dirname(trial: Any) -> str:
    """Name Tune's per-trial folder by the trial id alone, so results map back to ``trials/<id>``."""
    return str(trial.trial_id)


def param_space(spec: TuneSpec) -> dict[str, Any]:
    """Build Tune's param space: a grid over methods, and each method's own sampled keys.

    Every trial samples all methods' keys, but reads only those of its own method.
    """
    from ray import tune

    space: dict[str, Any] = {"method": tune.grid_search(list(spec.search.methods))}
    for method in spec.search.methods:
        space[f"method_{method}"] = unflatten({k: d.to_tune() for k, d in spec.spaces[method].items()})
    return space


__all__ = ["EpochReportCallback", "TIME_ATTR", "TRIALS_FOLDER", "param_space", "run_trial", "trial_dirname"]
