"""The README's ```bash blocks as commands, and how each one is checked.

Used by tests/test_readme_commands.py (every command's script, options and make targets exist; the
memory table is what its commands print) and tests/e2e/test_readme_live.py (the blocks that talk to
the `make run` server run, as written, against a real TorchServe).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"

# Commands that cannot run here, and why: they are checked for a correct invocation only.
NEEDS_HUB = re.compile(r"IDEA-CCNL|Wenzhong")  # the Hugging Face Hub (no network here), or what it would save
NEEDS_GPU = re.compile(r"--device cuda|--measure-context")
NEEDS_DOCKER = re.compile(r"^docker\b")  # no Docker engine here (the Dockerfile is linted in test_dockerfile.py)
SLOW = re.compile(r"^\.venv/bin/python (-m )?benchmarks[./]")  # minutes: `make bench`; the load test has its own e2e test
NOT_HERE = re.compile(r"^make\b")  # make run/stop use port 8080 and run/, make test is this suite: targets checked


@dataclass
class Block:
    heading: str
    text: str

    def commands(self) -> list[str]:
        """One string per command: continuation lines joined, comment-only and blank lines dropped."""
        joined = re.sub(r"\\\n\s*", " ", self.text)
        return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]

    def runnable_here(self) -> bool:
        """True when every command can run on this machine (no Hub, GPU, Docker, minutes-long benchmark)."""
        return all(not (NEEDS_HUB.search(c) or NEEDS_GPU.search(c) or NEEDS_DOCKER.search(c) or SLOW.search(c)
                        or NOT_HERE.search(c)) for c in self.commands())


def bash_blocks(text: str | None = None) -> list[Block]:
    text = README.read_text(encoding="utf-8") if text is None else text
    blocks, heading = [], ""
    for m in re.finditer(r"^(#{1,6} [^\n]*)$|^```bash\n(.*?)^```", text, flags=re.M | re.S):
        if m.group(1):
            heading = m.group(1).lstrip("#").strip()
        else:
            blocks.append(Block(heading, m.group(2)))
    return blocks


def words(command: str) -> list[str]:
    """The command's words, its trailing comment dropped."""
    return shlex.split(command, comments=True)


def options(command: str) -> list[str]:
    """The --options a command passes (values and `=value` parts dropped)."""
    return [w.split("=", 1)[0] for w in words(command) if w.startswith("--")]


def table_rows(header: str) -> list[str]:
    """The rows of the README's table under the line `header` (its separator line skipped)."""
    lines = README.read_text(encoding="utf-8").splitlines()
    start = lines.index(header)
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(line)
    return rows
