"""Summaries of a finished search: one record per trial, results.csv, the plot and best.yaml.

Per-trial numbers come from the trial's run folder (``metrics.jsonl``), which the
training loop rewrites to match its checkpoint. They stay right after the search
was killed and resumed, when Tune's own last result of a trial may be stale.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")  # no display on cluster nodes
import matplotlib.pyplot as plt  # noqa: E402

from anomaly.config import ConfigError, dump_yaml, from_dict  # noqa: E402
from anomaly.data import storage  # noqa: E402
from anomaly.train.launch import read_history  # noqa: E402

log = logging.getLogger(__name__)

TERMINATED = "TERMINATED"
STOPPED_EARLY = "STOPPED_EARLY"  # stopped by the ASHA scheduler before its last epoch
ERROR = "ERROR"
UNFINISHED = "UNFINISHED"  # not ended by Tune, e.g. pending or running when the search was interrupted
FIELDS = ("trial_id", "method", "status", "epochs", "max_epochs", "best_epoch", "selection_metric",
          "best_val_objective", "val_auroc", "train_seconds", "trial_seconds", "error", "run_dir")


@dataclass(frozen=True)
class TrialRecord:
    """Sampled values and val results of one trial, for results.csv and the choice of the best trial."""

    trial_id: str
    method: int
    params: dict[str, Any]  # dotted key -> sampled value, only the keys this method reads
    status: str  # TERMINATED, STOPPED_EARLY, ERROR or UNFINISHED
    epochs: int  # epochs trained and recorded in metrics.jsonl
    max_epochs: int  # train.epochs of the trial's config
    best_epoch: int | None
    selection_metric: str  # val_auroc, or val_recon_loss when val has no anomalous image
    best_val_objective: float | None  # higher is better: val AUROC, or minus the val reconstruction loss
    val_auroc: float | None  # at the best epoch
    train_seconds: float  # sum of the epochs' training-step time
    trial_seconds: float | None  # Tune's wall time of the trial, start-up included
    error: str
    run_dir: str


def epoch_summary(run_dir: str) -> dict[str, Any]:
    """Epoch count, best epoch and its val numbers from a run folder's ``metrics.jsonl``."""
    epochs = [row for row in read_history(run_dir) if "epoch" in row and "event" not in row]
    if not epochs:
        return {"epochs": 0, "best_epoch": None, "selection_metric": "", "best_val_objective": None,
                "val_auroc": None, "train_seconds": 0.0}
    best_epoch = epochs[-1]["best_epoch"]
    best = next(row for row in epochs if row["epoch"] == best_epoch)
    return {
        "epochs": len(epochs),
        "best_epoch": best_epoch,
        "selection_metric": best["selection_metric"],
        "best_val_objective": float(best["objective"]),
        "val_auroc": None if best.get("val_auroc") is None else float(best["val_auroc"]),
        "train_seconds": float(sum(row.get("train_seconds", 0.0) for row in epochs)),
    }


def short_error(text: str | None) -> str:
    """Reduce a trial's error text (often a remote traceback) to its last informative line."""
    if not text:
        return ""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    # A Ray task error ends with the original exception's "Type: message" line.
    candidates = [line for line in lines if ": " in line and not line.startswith(("File ", "^"))]
    return (candidates or lines)[-1][:500]


def trial_status(tune_status: str, error: str, epochs: int, max_epochs: int) -> str:
    """Classify a trial from Tune's status, its error text and the epochs it recorded."""
    if error or tune_status == "ERROR":
        return ERROR
    if tune_status != "TERMINATED":
        return UNFINISHED
    # Tune marks a trial that ASHA stopped as TERMINATED too, so only its epoch count shows the stop.
    return TERMINATED if epochs >= max_epochs else STOPPED_EARLY


def best_trial(records: Sequence[TrialRecord]) -> TrialRecord | None:
    """Return the trial with the highest val objective among those that did not fail, or None."""
    candidates = [r for r in records if r.status != ERROR and r.best_val_objective is not None
                  and math.isfinite(r.best_val_objective)]
    if not candidates:
        return None
    return max(candidates, key=lambda r: (r.best_val_objective, -r.epochs, r.trial_id))


def write_results_csv(records: Sequence[TrialRecord], param_keys: Sequence[str], url: str) -> None:
    """Write one row per trial: the fixed fields, then every searched key (blank where not searched)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*FIELDS[:3], *param_keys, *FIELDS[3:]])
    for record in records:
        row = asdict(record)
        values = [row[name] for name in FIELDS]
        params = [record.params.get(key, "") for key in param_keys]
        cells = [*values[:3], *params, *values[3:]]
        writer.writerow([_cell(v) for v in cells])
    storage.write_bytes(url, buffer.getvalue().encode())


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def val_metric_text(record: TrialRecord) -> str:
    """Format the selection metric of a trial's best epoch, e.g. ``val_auroc 0.6286``."""
    if record.best_val_objective is None:
        return "no val metric"
    # The objective is minus the reconstruction loss when that is the selection metric.
    value = record.best_val_objective
    if record.selection_metric == "val_recon_loss":
        value = -value
    return f"{record.selection_metric} {value:.4f}"


def write_best_config(record: TrialRecord, url: str) -> None:
    """Copy the best trial's resolved training config, checked to load, to ``url`` (best.yaml)."""
    import yaml

    source = storage.join(record.run_dir, "config.yaml")
    tree = yaml.safe_load(storage.read_bytes(source))
    try:
        config = from_dict(tree)
    except ConfigError as exc:
        raise ConfigError(f"{source} no longer loads as a training config: {exc}") from exc
    header = (f"# Best trial {record.trial_id} of the search: method {record.method}, "
              f"{val_metric_text(record)} at epoch {record.best_epoch}.\n"
              "# Train it with: python -m jobs.train --config best.yaml --shards DST --output RUN_DIR\n")
    storage.write_bytes(url, (header + dump_yaml(config)).encode())


def plot_val_by_trial(records: Sequence[TrialRecord], url: str, best: TrialRecord | None) -> None:
    """Plot each trial's best val objective, one column of points per method."""
    use_auroc = all(r.selection_metric in ("", "val_auroc") for r in records)
    label = "val AUROC at the best epoch" if use_auroc else "val objective (AUROC, or minus recon. loss)"
    methods = sorted({r.method for r in records})
    fig, ax = plt.subplots(figsize=(1.4 * len(methods) + 3, 4))

    markers = {
        TERMINATED: ("o", "tab:blue"), STOPPED_EARLY: ("v", "tab:orange"), UNFINISHED: ("s", "tab:gray"),
    }
    for status, (marker, colour) in markers.items():
        points = [(methods.index(r.method), r.best_val_objective) for r in records
                  if r.status == status and r.best_val_objective is not None]
        if points:
            xs, ys = zip(*points)
            ax.scatter(xs, ys, marker=marker, color=colour, alpha=0.8, label=status.lower().replace("_", " "))

    failed = [r for r in records if r.status == ERROR]
    for record in failed:
        ax.annotate("x", (methods.index(record.method), 0.0), color="tab:red", ha="center", va="bottom",
                    xycoords=("data", "axes fraction"))
    if failed:
        ax.scatter([], [], marker="$x$", color="tab:red", label=f"error ({len(failed)}, at the bottom)")
    if best is not None and best.best_val_objective is not None:
        ax.scatter([methods.index(best.method)], [best.best_val_objective], s=160, facecolors="none",
                   edgecolors="black", label=f"best: {best.trial_id}")

    ax.set_xticks(range(len(methods)), [f"method {m}" for m in methods])
    ax.set_xlim(-0.6, len(methods) - 0.4)
    ax.set_ylabel(label)
    ax.set_title(f"Search: {len(records)} trials")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    storage.write_bytes(url, buffer.getvalue())


def best_by_method(records: Sequence[TrialRecord]) -> dict[int, TrialRecord]:
    """Return the best trial of each method that has one."""
    found: dict[int, TrialRecord] = {}
    for method in sorted({r.method for r in records}):
        best = best_trial([r for r in records if r.method == method])
        if best is not None:
            found[method] = best
    return found


__all__ = [
    "ERROR", "STOPPED_EARLY", "TERMINATED", "UNFINISHED", "TrialRecord", "best_by_method", "best_trial",
    "epoch_summary", "plot_val_by_trial", "short_error", "trial_status", "val_metric_text",
    "write_best_config", "write_results_csv",
]
