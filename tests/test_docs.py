"""README.md and docs/*.md against the tree and the code: every repository path they name exists, every link
leads to a page and heading that exist, and the memory tables are what `scripts/plan_memory.py` prints."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.readme import DOCS, README, REPO, pages, words

# what `make` and the server write: named in the docs, never in the tree of a fresh clone
GENERATED = ("artifacts/", "run/", "model_store/", ".venv", ".venv-hf", ".hf455", ".whl", ".gpu-report", "gpu-report.")
TOP = {p.name for p in REPO.iterdir() if p.name != ".git"}
PATH_WORD = re.compile(r"^\.?[\w-]+(\.[\w-]+)*(/[\w.*<>{}-]+)*/?$")


def _prose(text: str) -> str:
    """The text without its fenced blocks (the commands are checked by tests/test_readme_commands.py)."""
    return re.sub(r"^ *```.*?^ *```", "", text, flags=re.M | re.S)


def repository_paths(text: str) -> set[str]:
    """The words of inline code that name a path in this repository: `handler/serving/fields.py`,
    `tests/e2e/test_traps.py::test_x`, `deploy/kubernetes/` (their first part is a top-level entry of the tree)."""
    found = set()
    for span in re.findall(r"(?<!`)`([^`\n]+)`(?!`)", _prose(text)):
        for word in span.split():
            word = word.split("::")[0].rstrip(".,;:)")
            if "/" not in word or not PATH_WORD.match(word) or word.split("/")[0] not in TOP:
                continue
            if word.startswith(GENERATED) or any(c in word for c in "<>{}"):
                continue
            found.add(word)
    return found


def missing_paths(text: str) -> list[str]:
    return sorted(p for p in repository_paths(text)
                  if not ((REPO / p).exists() if "*" not in p else any(REPO.glob(p))))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(m) for m in re.findall(r"^#{1,6} (.+)$", _prose(path.read_text(encoding="utf-8")), flags=re.M)}


def broken_links(text: str, where: Path) -> list[str]:
    """Links of `text` (a page in the folder `where`) to a file that does not exist, or to a heading that the
    file (or, for `#heading`, the text itself) lacks."""
    broken = []
    own = {slug(m) for m in re.findall(r"^#{1,6} (.+)$", _prose(text), flags=re.M)}
    for target in re.findall(r"\]\(([^)\s]+)\)", _prose(text)):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        path = (where / file).resolve() if file else None
        if path is not None and not path.exists():
            broken.append(target)
        elif anchor and anchor not in (own if path is None else anchors(path) if path.suffix == ".md" else {anchor}):
            broken.append(target)
    return broken


PAGES = pages()


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_path_the_docs_name_exists(page):
    text = page.read_text(encoding="utf-8")
    assert repository_paths(text) or page.name in ("quality.md",), f"{page.name} names no path: is the check blind?"
    assert not missing_paths(text), f"{page.name} names paths that are not in the tree: {missing_paths(text)}"


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_link_leads_somewhere(page):
    broken = broken_links(page.read_text(encoding="utf-8"), page.parent)
    assert not broken, f"{page.name}: broken links {sorted(set(broken))}"


def test_the_path_check_fails_on_made_up_paths_and_links(tmp_path):
    text = ("The split (`handler/memory.py`) and `handler/kv_cache.py`, `tests/test_gpu_memory.py::test_x`; "
            "real: `handler/memory/ledger.py`, `tests/memory/test_gpu_memory.py`, `deploy/kubernetes/`, "
            "not ours: `nvidia.com/gpu`, `/home/ts/app/run/`, `run/key_file.json`, `v1/completions`.\n"
            "[a page](nowhere.md), [a heading](api.md#no-such-heading), [fine](api.md#request), [here](#nope)\n"
            "```bash\ncat `handler/in_a_block.py`\n```\n")
    assert missing_paths(text) == ["handler/kv_cache.py", "handler/memory.py", "tests/test_gpu_memory.py"]
    assert broken_links(text, DOCS) == ["nowhere.md", "api.md#no-such-heading", "#nope"]


def test_every_docs_page_is_linked_from_the_readme():
    readme = README.read_text(encoding="utf-8")
    unlinked = [p.name for p in DOCS.glob("*.md") if f"](docs/{p.name}" not in readme]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"


# ---- the memory page's tables: what plan_memory.py prints ----

MEMORY = DOCS / "memory.md"
PYTHON = REPO / ".venv" / "bin" / "python"
PARTS = {  # the per-worker table's label -> plan_memory's part
    "CUDA context": "cuda_context",
    "weights": "weights",
    "KV cache": "kv_cache",
    "context hidden states and slots": "context_hidden_and_slots",
    "activations": "activations",
    "CUDA graphs (the step's activations, capture stream's workspace)": "graphs",
    "cuBLAS workspace": "workspaces",
    "allocator slack": "allocator_slack",
    "total": "total",
}


def plan(*options: str) -> dict[str, float]:
    python = str(PYTHON) if PYTHON.exists() else sys.executable
    proc = subprocess.run([python, "scripts/plan_memory.py", *options, "--json"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode in (0, 1), proc.stderr  # 1: does not fit; the figures still hold
    return json.loads(proc.stdout)["per_worker_mib"]


def cells(line: str) -> list[str]:
    return [c.strip().strip("*").strip() for c in line.strip().strip("|").split("|")]


def number(cell: str) -> float:
    return float(re.match(r"[\d,.]+", cell).group(0).replace(",", ""))


def table_after(text: str, header_start: str) -> list[list[str]]:
    lines = text.splitlines()
    start = next(n for n, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(cells(line))
    return rows


def test_the_per_worker_table_is_what_its_commands_print():
    text = MEMORY.read_text(encoding="utf-8")
    m = re.search(r"```bash\n((?:\.venv/bin/python scripts/plan_memory\.py[^\n]*\n)+)```\s*\n"
                  r"(\| part \(MiB per worker\).*?)\n\n", text, flags=re.S)
    assert m, "memory.md: no plan_memory.py block right before the per-worker table"
    commands = [line for line in m.group(1).splitlines() if line.strip()]
    rows = {r[0]: [number(c) for c in r[1:]] for r in table_after(m.group(2), "| part (MiB per worker)")}
    assert set(rows) == set(PARTS), sorted(rows)
    for column, command in enumerate(commands):
        parts = plan(*words(command)[2:])
        for label, part in PARTS.items():
            assert rows[label][column] == pytest.approx(round(parts[part], 1), abs=0.05), (label, command)


def test_the_seeds_question_is_answered_with_plan_memorys_figures():
    """The first table: the user's 957 MiB against this package's plan with the user's context (--context-mib)."""
    text = MEMORY.read_text(encoding="utf-8")
    command = re.search(r"```bash\n(\.venv/bin/python scripts/plan_memory\.py --shape 110m --context-mib \d+)\n```",
                        text).group(1)
    parts = plan(*words(command)[2:])
    rows = {r[0]: r for r in table_after(text, "| part (MiB) | the user's 957 MiB")}
    assert number(rows["CUDA context"][2]) == parts["cuda_context"] == float(command.rsplit(" ", 1)[1])
    assert number(rows["weights (fp16)"][2]) == pytest.approx(parts["weights"], abs=0.05)
    pool = parts["kv_cache"] + parts["context_hidden_and_slots"]
    assert number(rows["slot pool: KV cache, context states and slots"][2]) == pytest.approx(pool, abs=0.1)
    rest = parts["activations"] + parts["graphs"] + parts["workspaces"] + parts["allocator_slack"]
    assert number(rows["the rest: activations, CUDA graphs, cuBLAS workspace, allocator cache"][2]) == \
        pytest.approx(rest, abs=0.1)
    assert number(rows["total"][2]) == pytest.approx(parts["total"], abs=0.05)
    assert number(rows["total"][1]) == 957


def test_what_reduces_it_is_what_plan_memory_predicts():
    text = MEMORY.read_text(encoding="utf-8")
    assert "`.venv/bin/python scripts/plan_memory.py --shape 110m`" in text
    shipped = plan("--shape", "110m")["total"]
    assert f"from the shipped {shipped:,.1f} MiB per worker" in text
    rows = table_after(text, "| change | options | total MiB | saves MiB |")
    assert len(rows) >= 5
    for change, opts, total, saves in rows:
        predicted = plan("--shape", "110m", *words(opts.strip("`")))["total"]
        assert number(total) == pytest.approx(round(predicted, 1), abs=0.05), (change, opts, predicted)
        assert number(saves) == pytest.approx(round(shipped - predicted, 1), abs=0.15), (change, opts)
