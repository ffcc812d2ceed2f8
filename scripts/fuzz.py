"""`make fuzz`: explore fresh fuzz inputs for a time budget; every failure is kept as a regression example.

Runs the fuzz tests (in-process: tests/serving/test_fuzz.py; live TorchServe: tests/e2e/test_fuzz_live.py)
round after round under the hypothesis profile `fuzz` (tests/fuzz_profile.py): a fresh seed each round, and
every failing input written to tests/fuzz-examples/, which CI replays (profile `ci`) once it is committed.
Prints each round and the new example files; exit status 1 when a round failed.

    FUZZ_MINUTES=10 make fuzz                  # the budget (default 10 minutes)
    FUZZ_SCALE=2 make fuzz                     # more examples per round
    python scripts/fuzz.py --minutes 3 tests/serving/test_fuzz.py
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "tests" / "fuzz-examples"
TESTS = ["tests/serving/test_fuzz.py", "tests/e2e/test_fuzz_live.py"]
GRACE_S = 60  # after the budget: pytest's own teardown (a live TorchServe stops) before it is killed


def stored() -> set[Path]:
    return {p for p in EXAMPLES.rglob("*") if p.is_file()} if EXAMPLES.exists() else set()


def run_round(tests: list[str], seconds_left: float) -> tuple[str, list[str], str]:
    """One pytest run under the fuzz profile: (outcome, failed test ids, output tail)."""
    env = {**os.environ, "HYPOTHESIS_PROFILE": "fuzz"}
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=max(1.0, seconds_left))
        outcome = {0: "passed", 1: "FAILED"}.get(proc.returncode, f"error (exit {proc.returncode})")
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGINT)  # pytest stops where it is and runs its fixtures' teardown
        try:
            out, _ = proc.communicate(timeout=GRACE_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
        outcome = "FAILED" if re.search(r"^FAILED ", out, re.M) else "budget spent"
    failed = re.findall(r"^FAILED (\S+)", out, re.M)
    return outcome, failed, out[-4000:]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tests", nargs="*", default=TESTS)
    parser.add_argument("--minutes", type=float, default=float(os.environ.get("FUZZ_MINUTES", "10")))
    args = parser.parse_args()
    EXAMPLES.mkdir(parents=True, exist_ok=True)
    before = stored()
    end = time.monotonic() + 60 * args.minutes
    rounds, failures = 0, []
    while time.monotonic() < end:
        rounds += 1
        start = time.monotonic()
        outcome, failed, tail = run_round(args.tests, end - time.monotonic())
        summary = [line for line in tail.splitlines() if re.search(r"\d+ (passed|failed|error)", line)]
        print(f"round {rounds}: {outcome} in {time.monotonic() - start:.0f} s"
              f"{': ' + summary[-1].strip('= ') if summary else ''}", flush=True)
        if failed or outcome.startswith(("FAILED", "error")):
            failures.append((rounds, failed))
            print(tail, flush=True)
    new = sorted(stored() - before)
    print(f"\n{rounds} rounds in {args.minutes:g} min of {' '.join(args.tests)}")
    for number, failed in failures:
        print(f"round {number} failed: {', '.join(failed) or 'see its output above'}")
    print(f"new regression examples in {EXAMPLES.relative_to(REPO)}: {len(new)}")
    for path in new:
        print(f"  {path.relative_to(REPO)}")
    if new:
        print("commit them: CI replays each one (profile ci)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
