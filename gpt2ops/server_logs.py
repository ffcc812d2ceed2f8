"""The lines of TorchServe's logs that say why something failed.

`scripts/serve.sh` runs TorchServe from a run directory: the launcher's and the Java frontend's
console output go to `<run-dir>/logs/torchserve.out`, the frontend's log to `logs/ts_log.log` and
every worker's stdout/stderr to `logs/model_log.log`, one line each, tagged `W-<port>-<model>_<version>`.
A failure is rarely in the place a user looks first (a port clash is only in torchserve.out; a
handler that cannot start answers registration with a bare 500 "Failed to start workers" while its
own message is in model_log.log), so the tools read these files and quote the one line that matters.
"""

from __future__ import annotations

import re
from pathlib import Path

# files under <run-dir>/logs
CONSOLE = "torchserve.out"
FRONTEND_LOG = "ts_log.log"
MODEL_LOG = "model_log.log"

# Start-up failures, most telling first. Each pattern's first match wins.
_STARTUP_PATTERNS = [
    re.compile(r"Failed to bind to address: \S+"),
    re.compile(r"Invalid configuration: .*"),
    re.compile(r"(?:--ts-config|--model-store|--log-config) .*not found.*"),
    re.compile(r"java not found.*"),
    re.compile(r"TorchServe is already running.*"),
    re.compile(r"^Caused by: (.*)"),
    re.compile(r"^(?:\S+\.)?\w*(?:Exception|Error)\b:? .*"),
    re.compile(r"\[(?:ERROR|FATAL)\s*\] .*"),
]
# noise that looks like an error but never is the cause
_NOISE = re.compile(r"nvidia-smi not available|xpu-smi not available|SnapshotManager|sun\.reflect|"
                    r"Exception in thread \"Thread-0\"")
# "ValueError: ...", "handler.errors.SettingsError: ...", "SyntaxError: expected ':'"
_EXCEPTION = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?[A-Za-z_]\w*(?:Error|Exception|Exit|Interrupt|Warning)\b(?::.*)?$")
_LOCATION = re.compile(r'^\s*File "([^"]+)", line (\d+)')


def read_from(path: Path, offset: int = 0) -> str:
    """The text of `path` from byte `offset` on ('' when it does not exist; all of it when it has shrunk)."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            f.seek(offset if 0 <= offset <= size else 0)
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def size_of(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def startup_error(console: str, frontend_log: str = "") -> str | None:
    """The line of TorchServe's console output or frontend log that says why it did not start."""
    lines = [line.strip() for line in (console + "\n" + frontend_log).splitlines()]
    lines = [line for line in lines if line and not _NOISE.search(line) and not line.startswith("at ")]
    for pattern in _STARTUP_PATTERNS:
        for line in lines:
            m = pattern.search(line)
            if m:
                found = m.group(1) if m.groups() else m.group(0)
                if "Failed to bind" in found and any("Address already in use" in x for x in lines):
                    found += " (address already in use)"
                return found.strip()
    return None


def worker_lines(model_log: str, model_name: str) -> list[str]:
    """The messages the workers of `model_name` wrote (the part after `MODEL_LOG - `), in order."""
    tag = re.compile(rf"W-\d+-{re.escape(model_name)}_\S*-(?:stdout|stderr)\s+MODEL_LOG - ?(.*)$")
    return [m.group(1) for m in map(tag.search, model_log.splitlines()) if m]


def worker_error(model_log: str, model_name: str) -> str | None:
    """The last exception a worker of `model_name` logged, with its file and line for a SyntaxError."""
    lines = worker_lines(model_log, model_name)
    for n in range(len(lines) - 1, -1, -1):
        text = lines[n].strip()
        if not _EXCEPTION.match(text):
            continue
        if text.startswith(("SyntaxError", "IndentationError", "TabError")):
            for before in reversed(lines[max(0, n - 4):n]):
                where = _LOCATION.match(before)
                if where:
                    text += f" ({Path(where.group(1)).name}, line {where.group(2)})"
                    break
        return text
    return None
