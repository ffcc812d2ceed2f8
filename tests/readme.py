"""The ```bash blocks of README.md and every docs/*.md page as commands, and how each one is checked.

Used by tests/test_readme_commands.py (every command's script, options and make targets exist),
tests/e2e/test_readme_live.py (the blocks that talk to the `make run` server run, as written, against a real
TorchServe) and the tests that bind a page's table to the code (`table_rows`). Blocks may be indented (inside a
numbered step): their lines are dedented.
"""

from __future__ import annotations

import re
import shlex
import textwrap
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = REPO / "docs"


def pages() -> list[Path]:
    """README.md and every docs/*.md page."""
    return [README, *sorted(DOCS.glob("*.md"))]


def page(name: str) -> Path:
    """A page by its name: "README.md" or "api.md" (under docs/)."""
    return README if name == "README.md" else DOCS / name


# Commands that cannot run here, and why: they are checked for a correct invocation only.
NEEDS_HUB = re.compile(r"IDEA-CCNL|Wenzhong|my-gpt2")  # the Hugging Face Hub (no network here), or what it would save
NEEDS_GPU = re.compile(r"--device cuda|--measure-context")
NEEDS_DOCKER = re.compile(r"(^|\$\(|\bthen\b|;\s*)docker\b|\bdocker inspect\b")  # no Docker engine here
NEEDS_CLUSTER = re.compile(r"(^|\$\()(kubectl|helm)\b")  # no Kubernetes cluster here (manifests: test_k8s_manifests.py)
SLOW = re.compile(r"^\.venv/bin/python (-m )?benchmarks[./]")  # minutes: `make bench`; the load test has its own e2e test
NOT_HERE = re.compile(r"^make\b")  # make run/stop use port 8080 and run/, make test is this suite: targets checked


@dataclass
class Block:
    heading: str
    text: str
    page: str = "README.md"

    def commands(self) -> list[str]:
        """One string per command: continuation lines joined, comment-only and blank lines dropped."""
        joined = re.sub(r"\\\n\s*", " ", self.text)
        return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]

    def runnable_here(self) -> bool:
        """True when every command can run on this machine (no Hub, GPU, Docker, cluster, minutes-long benchmark)."""
        return all(not (NEEDS_HUB.search(c) or NEEDS_GPU.search(c) or NEEDS_DOCKER.search(c) or NEEDS_CLUSTER.search(c)
                        or SLOW.search(c) or NOT_HERE.search(c)) for c in self.commands())


def bash_blocks(text: str | None = None, name: str = "README.md") -> list[Block]:
    """The ```bash blocks of `text` (one page), or of every page when `text` is None."""
    if text is None:
        return [b for p in pages() for b in bash_blocks(p.read_text(encoding="utf-8"), p.name)]
    blocks, heading = [], ""
    for m in re.finditer(r"^(#{1,6} [^\n]*)$|^( *)```bash\n(.*?)^\2```", text, flags=re.M | re.S):
        if m.group(1):
            heading = m.group(1).lstrip("#").strip()
        else:
            blocks.append(Block(heading, textwrap.dedent(m.group(3)), name))
    return blocks


def words(command: str) -> list[str]:
    """The command's words, its trailing comment dropped."""
    return shlex.split(command, comments=True)


def options(command: str) -> list[str]:
    """The --options a command passes (values and `=value` parts dropped)."""
    return [w.split("=", 1)[0] for w in words(command) if w.startswith("--")]


def table_rows(header: str, name: str | None = None) -> list[str]:
    """The rows of the table under the line `header` (its separator line skipped), on the page `name`, or on the
    one page of README.md and docs/*.md that has it."""
    found = [p for p in ([page(name)] if name else pages()) if header in p.read_text(encoding="utf-8").splitlines()]
    assert len(found) == 1, f"the table {header!r} is on {len(found)} pages: {[p.name for p in found]}"
    lines = found[0].read_text(encoding="utf-8").splitlines()
    start = lines.index(header)
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(line)
    return rows
