"""Progress bars for long measurements (tqdm; off by default in the library)."""

from __future__ import annotations

import sys
from typing import Any


def progress_bar(total: int | None, enabled: bool, desc: str, unit: str = "it") -> Any:
    """A tqdm bar on stderr, or None when disabled or tqdm is missing.

    ``disable=None`` lets tqdm switch itself off when stderr is not a terminal,
    so logs of batch jobs stay clean.
    """
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # progress bars are optional
        return None
    return tqdm(total=total, desc=desc, unit=unit, disable=None, leave=False, file=sys.stderr)


class Ticker:
    """Counts an operator's products into a bar as they happen."""

    def __init__(self, op: Any, enabled: bool, desc: str, total: int | None = None) -> None:
        self.op = op
        self.bar = progress_bar(total, enabled, desc, unit="HVP")
        self.start = getattr(op, "n_matvecs", 0)
        self.seen = self.start
        self.path: str | None = None

    def update(self) -> None:
        if self.bar is None:
            return
        now = getattr(self.op, "n_matvecs", self.seen)
        if now > self.seen:
            self.bar.update(now - self.seen)
            self.seen = now
        self._show_path()

    def _show_path(self) -> None:
        """The product path (eager / compiled, the compile's first-call time) as the bar's postfix."""
        inner = getattr(self.op, "op", self.op)  # through a counting wrapper
        info = getattr(inner, "product_info", None)
        if not info:
            return
        text = info["path"]
        if info["compile_seconds"] is not None:
            text += f", compile {info['compile_seconds']:.1f} s"
        setter = getattr(self.bar, "set_postfix_str", None)
        if text != self.path and setter is not None:
            self.path = text
            setter(text, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.update()
            self.bar.close()
