"""Small file helpers of the sweep runner: atomic writes, forgiving JSON reads and log tails."""

from __future__ import annotations

import json
import os
import threading
from typing import Any

TAIL_LINES = 15


def write_atomic(path: str, text: str) -> None:
    """Writes ``text`` so that a reader (another point, a Slurm task, a user) never sees half a file."""
    tmp = f"{path}.tmp.{os.getpid()}.{threading.get_ident()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def read_json(path: str, default: Any = None) -> Any:
    """The file's JSON, or ``default`` when it is missing or unreadable (e.g. being replaced right now)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


def tail(path: str, lines: int = TAIL_LINES) -> list[str]:
    """The last non-blank lines of a log (read from its end, so a long log costs nothing)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64_000))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if line.strip()][-lines:]


def failure_reason(tail_lines: list[str]) -> str:
    """The most telling line of a failed run's log: the last exception-looking line (or a program's own
    ``error: ...`` line), else the last line."""
    for line in reversed(tail_lines):
        stripped = line.strip()
        head = stripped.split(":", 1)[0]
        if head.endswith(("Error", "Exception", "Exit", "Interrupt")) or stripped.startswith(("FATAL", "error: ")):
            return stripped[:400]
    return tail_lines[-1].strip()[:400] if tail_lines else "no output"
