"""The blocks of README.md and docs/*.md that talk to the `make run` server run as written against a real TorchServe.

The session server stands in for `make run`'s: its run directory and config come in through
$RUN_DIR and $TS_CONFIG (which the scripts read, scripts/keys.py included, as scripts/serve.sh does), and the
literal `http://127.0.0.1:8080` and `:8081` of the curl lines are pointed at it. curl
runs with --fail-with-body, so an HTTP error fails the block. The other blocks (make, the Hub, a GPU,
Docker, benchmarks) are checked for their invocation in tests/test_readme_commands.py.
"""

from __future__ import annotations

import subprocess

import pytest

from gpt2ops.client import read_keys
from gpt2ops.local_server import script_env
from tests.readme import REPO, bash_blocks

TALKS_TO_THE_SERVER = ("curl ", "scripts/keys.py", "scripts/query.py", "scripts/register.py")
LIVE = [b for b in bash_blocks() if b.runnable_here() and any(w in b.text for w in TALKS_TO_THE_SERVER)]
PRELUDE = """set -euo pipefail
curl() { command curl -sS --fail-with-body --max-time 60 "$@"; echo; }
"""


def test_the_readme_has_blocks_to_run():
    assert {(b.page, b.heading) for b in LIVE} >= {("README.md", "Quick start"), ("README.md", "2. Call it from an OpenAI client"),
                                                   ("README.md", "4. Understand the GPU memory"),
                                                   ("security.md", "Keys: which one, where"),
                                                   ("api.md", "OpenAI-compatible API")}, [(b.page, b.heading) for b in LIVE]


@pytest.mark.parametrize("block", LIVE, ids=[f"{b.page}: {b.heading}" for b in LIVE])
def test_readme_block_runs_against_the_server(server, block):
    script = block.text
    for readme, here in [("http://127.0.0.1:8080", server.client.inference_url),
                         ("http://127.0.0.1:8081", server.client.management_url)]:
        script = script.replace(readme, here)
    env = {**script_env(), "RUN_DIR": str(server.run_dir), "TS_CONFIG": str(server.config)}
    before = read_keys(server.run_dir / "key_file.json")
    proc = subprocess.run(["bash", "-c", PRELUDE + script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, f"{block.page} block under {block.heading!r} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    assert "error" not in proc.stderr.lower(), proc.stderr
    assert server.client.ping()
    if "token?type=inference" in script or "keys.py --renew" in script:  # the page's renewal did renew
        assert read_keys(server.run_dir / "key_file.json")["inference"] != before["inference"]
