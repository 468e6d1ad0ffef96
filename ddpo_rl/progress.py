"""A rich progress display for training runs: a bar with live reward statistics."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class RunProgress:
    """Progress over epochs; ``update`` shows the latest reward mean/std, loss and clip fraction."""

    def __init__(self, total: int, start: int = 0, enabled: bool = True, title: str = "training"):
        self.enabled = enabled
        self.console = Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold blue]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[stats]}"),
            console=self.console,
            disable=not enabled,
        )
        self.task = self.progress.add_task(title, total=total, completed=start, stats="")

    def __enter__(self) -> RunProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def update(self, epoch: int, record: dict) -> None:
        parts = [f"reward {record['reward_mean']:.4g}±{record['reward_std']:.3g}"]
        if record.get("loss") is not None:
            parts.append(f"loss {record['loss']:.3g}")
        if record.get("clip_fraction") is not None:
            parts.append(f"clip {record['clip_fraction']:.2f}")
        if record.get("kl_to_reference") is not None:
            parts.append(f"KL {record['kl_to_reference']:.3g}")
        parts.append(f"{record['seconds']:.1f}s/ep")
        self.progress.update(self.task, completed=epoch, stats=" | ".join(parts))

    def log_eval(self, ev) -> None:
        if self.enabled:
            from ddpo_rl.reporting import format_or_na as num

            monitors = "".join(
                f"; {name} {num(m['train_mean'], '.3g')} / {num(m['eval_mean'], '.3g')}"
                for name, m in getattr(ev, "monitors", {}).items()
            )
            eval_n = getattr(ev, "eval_n", None)
            counts = f"n={ev.n}" if eval_n in (None, ev.n) else f"n={ev.n} / {eval_n}"
            self.progress.console.log(
                f"eval after {ev.epoch} epochs: train prompts {num(ev.train_mean, '.4g')}±{num(ev.train_std, '.3g')}, "
                f"held-out {num(ev.eval_mean, '.4g')}±{num(ev.eval_std, '.3g')} ({counts}){monitors}"
            )

    def log_alarm(self, message: str) -> None:
        """An over-optimisation alarm: in the display when it is on, else on stderr (called once per run)."""
        if self.enabled:
            self.progress.console.log(f"[bold red]{message}[/]")
        else:
            import sys

            print(message, file=sys.stderr, flush=True)
