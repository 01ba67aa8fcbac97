"""The live progress bar of `--wait`, drawn with rich on stderr (stdout stays for results)."""

from __future__ import annotations

from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn

from imgpipe.render import format_eta, format_rate


class ProgressBar:
    """`status ━━━━━━━━━━━━━━━ final/total  rate  ETA`, fed with the events' JSON.

    Rate and ETA are the server's (observed since the upload), not guessed from the events.
    Use it as a context manager; `update()` takes a progress or final event's data.
    """

    def __init__(self, console: Console | None = None) -> None:
        self._progress = Progress(
            TextColumn("{task.description}"),
            # Explicit colours: rich's default green turns grey on 16-colour terminals.
            BarColumn(complete_style="magenta", finished_style="green"),
            MofNCompleteColumn(),
            TextColumn("images"),
            TextColumn("{task.fields[rate]}"),
            TextColumn("{task.fields[eta]}"),
            console=console or Console(stderr=True),
        )
        self._task: TaskID | None = None

    def __enter__(self) -> ProgressBar:
        self._progress.start()
        self._task = self._progress.add_task("Pending", total=None, rate="", eta="")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._progress.stop()

    def update(self, event: dict[str, Any]) -> None:
        if self._task is None:
            return
        progress = event.get("progress") or {}
        failed = progress.get("images_failed", 0)
        description = str(event.get("status", ""))
        if failed:
            description += f" ({failed} failed)"
        self._progress.update(
            self._task,
            description=description,
            total=progress.get("images_total") or None,
            completed=progress.get("images_done", 0) + failed,
            rate=format_rate(progress.get("images_per_second")),
            eta=format_eta(progress.get("eta_seconds")),
        )
