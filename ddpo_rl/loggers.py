"""Send a run's records to the experiment trackers users already have (torchrl's loggers).

Every run writes its own record: metrics.jsonl (one line per epoch), eval.jsonl, sample grids
and curves as PNG files. :class:`RunLogger` mirrors that record into one of torchrl's loggers
(``torchrl.record.loggers``: CSV, TensorBoard, Weights & Biases, MLflow), so the tracker shows
exactly what the files hold:

- each new line of ``metrics.jsonl`` / ``eval.jsonl`` -> one scalar per numeric value, named
  ``metrics/<key>`` / ``eval/<key>``, at step = the line's ``epoch`` (None values are skipped);
- each new or rewritten PNG (``samples/epoch_NNNN.png`` at step NNNN, ``reward_curve.png`` at
  the last epoch) -> an image, where the logger takes images: TensorBoard (``add_image``), W&B
  (``wandb.Image``), MLflow (an artifact). torchrl's ``Logger`` has no image method and the CSV
  logger no image store: there the PNG files of the run directory are the images.

A recipe calls :meth:`RunLogger.sync` after it writes a line; nothing is read from the device.
A resumed run redoes the epochs after its checkpoint, which a killed attempt may have logged
already: TensorBoard (a purge marker) and CSV (the rows rewritten) drop those and show the redone
ones; W&B and MLflow keep what they were sent (their services take nothing back).
The logger's own files go to ``<output_dir>/logs`` (W&B: its run directory, MLflow: a file store).
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import re

LOGGERS = ("none", "csv", "tensorboard", "wandb", "mlflow")
"""Values of the ``logger`` config field: "none" (only the run directory's own files) or a torchrl logger."""

OPTIONS_ARG = {"wandb": "wandb_kwargs", "mlflow": "mlflow_kwargs"}
"""The loggers that take options (``logger_kwargs``), each with the torchrl argument that carries them."""

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
"""The package each tracker needs besides torchrl (the CSV logger needs none)."""

RECORD_FILES = ("metrics.jsonl", "eval.jsonl")
IMAGE_PATTERNS = ("samples/epoch_*.png", "*.png")


def make_logger(kind: str, output_dir: str, logger_kwargs: dict | None = None):
    """torchrl's logger of ``kind`` (one of :data:`LOGGERS`) writing under ``output_dir``; None for "none".

    ``logger_kwargs`` go to the logger's constructor (e.g. ``{"project": "ddpo", "offline": true}``
    for W&B). The experiment is named after the output directory.
    """
    check_logger(kind, logger_kwargs)
    if kind == "none":
        return None
    from torchrl.record.loggers import get_logger

    name = os.path.basename(os.path.normpath(os.path.abspath(output_dir)))
    log_dir = os.path.join(output_dir, "logs")
    extra = {OPTIONS_ARG[kind]: dict(logger_kwargs or {})} if kind in OPTIONS_ARG else {}
    return get_logger(kind, log_dir, name, **extra)


def check_logger(kind: str, logger_kwargs: dict | None = None) -> None:
    """What :func:`make_logger` refuses, found before a recipe changes anything on disk (ValueError
    naming the field): a kind not in :data:`LOGGERS`, options for a logger that takes none, a tracker
    whose package is not installed. The tracker's service itself (a W&B login, an MLflow server) is
    only met when the logger is made."""
    if kind not in LOGGERS:
        raise ValueError(f"logger: {kind!r} is not one of {LOGGERS}")
    if kind == "none":
        return
    if logger_kwargs and kind not in OPTIONS_ARG:
        raise ValueError(f"logger_kwargs: the {kind} logger takes no options, got {dict(logger_kwargs)}")
    package = PACKAGES.get(kind)
    if package is not None and importlib.util.find_spec(package) is None:
        raise ValueError(f"logger: {kind!r} needs the {package} package, which is not installed "
                         f"(pip install {package}); or choose csv, or none")


class RunLogger:
    """Mirror a run directory's records and images into a torchrl ``Logger`` (see the module doc).

    Args:
        logger: a ``torchrl.record.loggers.Logger``.
        output_dir: the run directory.
        start_epoch: None for a fresh run; for a resumed one, the last epoch whose records an earlier
            process logged (0 included: a recipe whose records start at epoch 0; -1: none): they and
            their images are skipped, and what that process logged after it is purged (TensorBoard, CSV).
        hparams: the run's configuration, given to the loggers that keep one (W&B, MLflow).
    """

    def __init__(self, logger, output_dir: str, start_epoch: int | None = None, hparams: dict | None = None):
        self.logger = logger
        self.output_dir = output_dir
        self.start_epoch = start_epoch
        self.last_epoch = max(start_epoch or 0, 0)
        self._offsets = dict.fromkeys(RECORD_FILES, 0)
        self._images: dict[str, float] = {}
        if start_epoch is not None:  # images of the earlier process: already logged
            self._images = {p: os.path.getmtime(p) for p in self._image_paths()}
        if start_epoch is not None and _kind(logger) == "tensorboard":
            _purge_tensorboard_after(logger, start_epoch)
        if start_epoch is not None and _kind(logger) == "csv":
            _purge_csv_after(logger, start_epoch)
        if hparams is not None and _kind(logger) in ("wandb", "mlflow"):
            logger.log_hparams({k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v) for k, v in hparams.items()})

    def sync(self) -> None:
        """Log what was written to the run directory since the last call, then flush."""
        for name in RECORD_FILES:
            path = os.path.join(self.output_dir, name)
            if not os.path.exists(path):
                continue
            with open(path) as f:
                f.seek(self._offsets[name])
                lines = f.readlines()
                if lines and not lines[-1].endswith("\n"):  # a line being written: next time
                    lines.pop()
                self._offsets[name] += sum(len(line.encode()) for line in lines)
            for line in lines:
                if line.strip():
                    self._log_record(name.split(".")[0], json.loads(line))
        for path in self._image_paths():
            mtime = os.path.getmtime(path)
            if self._images.get(path) != mtime:
                self._images[path] = mtime
                match = re.search(r"epoch_(\d+)\.png$", path)
                step = int(match.group(1)) if match else self.last_epoch
                name = "samples" if match else os.path.splitext(os.path.basename(path))[0]
                self._log_image(name, path, step)
        self.logger.flush()

    def close(self) -> None:
        """Log what is left, then close the logger (again: nothing)."""
        if self.logger.is_alive:
            self.sync()
            self.logger.close()

    def _image_paths(self) -> list[str]:
        paths = []
        for pattern in IMAGE_PATTERNS:
            paths += sorted(glob.glob(os.path.join(self.output_dir, pattern)))
        return paths

    def _log_record(self, prefix: str, record: dict) -> None:
        epoch = int(record["epoch"])
        if self.start_epoch is not None and epoch <= self.start_epoch:
            return
        self.last_epoch = max(self.last_epoch, epoch)
        for key, value in record.items():
            if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.logger.log_scalar(f"{prefix}/{key}", float(value), step=epoch)

    def _log_image(self, name: str, path: str, step: int) -> None:
        kind = _kind(self.logger)
        if kind == "tensorboard":
            import numpy as np
            from PIL import Image

            image = np.asarray(Image.open(path).convert("RGB"))
            self.logger.experiment.add_image(name, image, global_step=step, dataformats="HWC")
        elif kind == "wandb":
            import wandb

            self.logger.experiment.log({name: wandb.Image(path)}, step=step)
        elif kind == "mlflow":
            import mlflow

            mlflow.log_artifact(path, artifact_path="images")


def _kind(logger) -> str:
    return type(logger).__name__.lower().replace("logger", "")


def _purge_tensorboard_after(logger, epoch: int) -> None:
    """A resumed run redoes the epochs after its checkpoint, which the killed attempt may already
    have logged: give torchrl's TensorBoard logger a writer that starts with a purge marker, so that
    TensorBoard hides the earlier events of steps after ``epoch`` (``SummaryWriter(purge_step=)``)
    and shows each redone epoch once, as logged by the resumed run."""
    from torch.utils.tensorboard import SummaryWriter

    log_dir = logger.experiment.get_logdir()
    logger.experiment.close()
    logger.experiment = SummaryWriter(log_dir=log_dir, purge_step=epoch + 1)


def _purge_csv_after(logger, epoch: int) -> None:
    """The CSV logger's files (``scalars/<tag>.csv``, "step,value" rows) without the rows of steps
    after ``epoch`` that a killed attempt wrote (rewritten atomically): the resumed run logs them again."""
    from ddpo_rl.atomic import write_text

    def kept(row: str) -> bool:  # a row of a step up to ``epoch``; not a torn last row
        step = row.split(",", 1)[0]
        return row.endswith("\n") and "," in row and step.isdigit() and int(step) <= epoch

    root = os.path.join(logger.experiment.log_dir, "scalars")
    for path in glob.glob(os.path.join(root, "**", "*.csv"), recursive=True):
        with open(path) as f:
            rows = f.readlines()
        keep = [row for row in rows if kept(row)]
        if len(keep) != len(rows):
            write_text(path, "".join(keep))


def make_run_logger(
    kind: str, output_dir: str, logger_kwargs: dict | None = None, start_epoch: int | None = None, hparams: dict | None = None
) -> RunLogger | None:
    """:class:`RunLogger` over :func:`make_logger`'s logger; None for ``kind="none"``."""
    logger = make_logger(kind, output_dir, logger_kwargs)
    return None if logger is None else RunLogger(logger, output_dir, start_epoch, hparams)
