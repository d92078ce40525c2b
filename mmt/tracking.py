"""Experiment tracking through accelerate's trackers (``train.report_to: tensorboard | wandb | ...``).

The run's own ``log.jsonl`` and loss plot are always written; trackers are extra sinks. TensorBoard writes
to ``<train.output_dir>/tracking``; hosted trackers (wandb, comet_ml, ...) use their own configuration (API
keys, projects) from the environment. A tracker whose package is missing is an error naming the package,
raised before the run starts, so that no run trains for hours with its metrics going nowhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from mmt.errors import ConfigError, require

# tracker name -> (module to import, package to install, extra of mmt that installs it)
TRACKERS: dict[str, tuple[str, str, str | None]] = {
    "tensorboard": ("tensorboard", "tensorboard", "track"),
    "wandb": ("wandb", "wandb", None),
    "comet_ml": ("comet_ml", "comet-ml", None),
    "mlflow": ("mlflow", "mlflow", None),
    "aim": ("aim", "aim", None),
    "clearml": ("clearml", "clearml", None),
    "dvclive": ("dvclive", "dvclive", None),
    "swanlab": ("swanlab", "swanlab", None),
    "trackio": ("trackio", "trackio", None),
}


def tracker_names(train_cfg: Any) -> list[str]:
    """``train.report_to`` as a checked list ("none" or empty: no tracker; "all": every installed one)."""
    raw = train_cfg.report_to
    names = [raw] if isinstance(raw, str) else list(raw or [])
    names = [str(n).strip().lower() for n in names if str(n).strip().lower() not in ("", "none")]
    if names == ["all"]:
        return [n for n, (mod, _, _) in TRACKERS.items() if _installed(mod)]
    for n in names:
        if n not in TRACKERS:
            raise ConfigError(f"train.report_to: unknown tracker {n!r}; known: {', '.join(TRACKERS)}, all, none")
    for n in names:
        mod, package, extra = TRACKERS[n]
        require(mod, package, extra, purpose=f"train.report_to={n}")
    return list(dict.fromkeys(names))


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def tracking_dir(train_cfg: Any) -> Path:
    return Path(train_cfg.output_dir) / "tracking"


def accelerator_kwargs(train_cfg: Any) -> dict[str, Any]:
    """Keyword arguments for ``Accelerator(...)``: the trackers and where file-based ones write."""
    names = tracker_names(train_cfg)
    if not names:
        return {}
    return {"log_with": names, "project_dir": str(tracking_dir(train_cfg))}


def flat_config(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as ``{"train.lr": 5e-06, ...}`` of scalars (TensorBoard's hparams take nothing else)."""
    out: dict[str, Any] = {}
    for k, v in values.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flat_config(v, key + "."))
        elif isinstance(v, (bool, int, float, str)):
            out[key] = v
        else:
            out[key] = "None" if v is None else str(v)
    return out


def init_trackers(accelerator: Any, train_cfg: Any, config: Mapping[str, Any] | None = None) -> bool:
    """Start the trackers of ``accelerator`` (built with :func:`accelerator_kwargs`); ``config`` is the run's
    config as a dict (``RunConfig.to_dict()``), recorded flat as hyperparameters. Returns whether any is active."""
    if not getattr(accelerator, "log_with", None):
        return False
    name = Path(train_cfg.output_dir).resolve().name or "mmt"
    accelerator.init_trackers(name, config=flat_config(config or {}))
    return True


def log_metrics(accelerator: Any, metrics: Mapping[str, Any], step: int) -> None:
    """Send the numeric entries of a log record (loss, lr, tokens/s, ...) to the trackers, if any."""
    if not getattr(accelerator, "trackers", None):
        return
    values = {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"
    }
    if values:
        accelerator.log(values, step=step)


def end_trackers(accelerator: Any) -> None:
    """Flush and close the trackers (TensorBoard writes its event file on close)."""
    if getattr(accelerator, "trackers", None):
        accelerator.end_training()
