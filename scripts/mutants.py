"""Mutation check: small, plausible bugs, each applied to a copy of the tree; the tests meant to catch it
must fail. `make mutants` (not part of `make test`; about 15 minutes on two cores).

Each mutant replaces one exact piece of code (it must occur exactly once, so a refactor that moves the code
makes the check fail loudly instead of testing nothing) in a temporary copy of the working tree (the files
git tracks, and those it would track), runs its tests there with this venv's Python, and counts as killed when
they fail. The working tree is never touched. Exit status 1 when a mutant survives.

    python scripts/mutants.py            # all
    python scripts/mutants.py deadline   # those whose name contains "deadline"
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]  # pytest arguments: the tests that must catch it
    why: str


MUTANTS = (
    # the five of issue 25 (the gaps its tests close)
    Mutant("deadline-wall-clock", "handler/serving/admission.py",
           "return (time.monotonic() if now is None else now) + self.request_budget_s",
           "return (time.time() if now is None else now) + self.request_budget_s",
           ("tests/serving/test_deadline.py",), "the deadline lands 1.8e9 s ahead: nothing times out"),
    Mutant("warm-up-per-look", "handler/engine/core.py",
           "looks.append(1000 * (time.perf_counter() - start) / self.sync_every)",
           "looks.append(1000 * (time.perf_counter() - start))",
           ("tests/engine/test_warm_up.py",), "ms per look, not per step: admission refuses what could finish"),
    Mutant("logits-pad-sign", "handler/engine/model.py",
           "pad = -n % MATMUL_ROW_MULTIPLE", "pad = n % MATMUL_ROW_MULTIPLE",
           ("tests/engine/test_logits_rows.py",), "1-slot logits from a 2-row matmul: other bits"),
    Mutant("stream-last-not-final", "handler/serving/openai/call.py",
           "text = echo + choice.generation.text.increment(final=True)",
           "text = echo + choice.generation.text.increment()",
           ("tests/serving/test_openai_stream_tail.py",), "held-back text never sent"),
    Mutant("seed-is-the-step", "handler/engine/step.py",
           "p.top_k, p.top_p, p.seed, view.state.generated)",
           "p.top_k, p.top_p, view.state.generated, view.state.generated)",
           ("tests/engine/test_sampling_seeds.py",), "rows at the same step share their draws"),
    # the field-name fix of issue 25
    Mutant("field-name-raw", "handler/serving/errors.py",
           "self.field = field_label(field)", "self.field = field",
           ("tests/serving/test_error_field_names.py",), "a surrogate field name makes the answer unencodable"),
    # stopping
    Mutant("stop-after-device-reason", "handler/engine/stopping.py",
           "keep = self.text.add(new_tokens)\n        if keep is not None:\n            return FinishReason.STOP, keep\n"
           "        if device_reason is not None:\n            return device_reason, None\n",
           "keep = self.text.add(new_tokens)\n        if device_reason is not None:\n            return device_reason, None\n"
           "        if keep is not None:\n            return FinishReason.STOP, keep\n",
           ("tests/engine/test_stopping.py",), "an eos in the same look hides the stop string"),
    Mutant("deadline-never-checked", "handler/engine/stopping.py",
           "(time.monotonic() if now is None else now) > self.deadline",
           "(time.monotonic() if now is None else now) > self.deadline + 1e9",
           ("tests/engine/test_scheduler.py", "-k", "deadline"), "requests never time out"),
    Mutant("stop-latest-not-earliest", "handler/engine/text.py",
           "return min(hits) if hits else -1", "return max(hits) if hits else -1",
           ("tests/engine/test_text.py",), "the text is cut at the last stop string"),
    Mutant("cut-character-streamed", "handler/engine/text.py",
           "safe = len(text.rstrip(REPLACEMENT))", "safe = len(text)",
           ("tests/engine/test_text.py",), "half a character is streamed as U+FFFD"),
    Mutant("max-new-tokens-off-by-one", "handler/engine/step.py",
           "st.finished |= eos | (st.generated >= p.max_new)", "st.finished |= eos | (st.generated > p.max_new)",
           ("tests/engine/test_scheduler.py",), "one token too many"),
    # the scheduler alone (no model: tests/engine/test_scheduler_pure.py runs in well under a second)
    Mutant("admit-newest-first", "handler/engine/scheduler.py",
           "gen = self.waiting.popleft()", "gen = self.waiting.pop()",
           ("tests/engine/test_scheduler_pure.py",), "the last request to arrive is served first"),
    Mutant("ended-slot-never-free", "handler/engine/scheduler.py",
           "            heapq.heappush(self.free, gen.slot)\n", "",
           ("tests/engine/test_scheduler_pure.py",), "a finished or cancelled request keeps its slot for ever"),
    Mutant("ended-slot-not-released", "handler/engine/scheduler.py",
           "            self._released.append(gen.slot)\n", "",
           ("tests/engine/test_scheduler_pure.py",), "the device keeps generating into a slot whose request ended"),
    # ranking and sampling
    Mutant("penalty-added", "handler/engine/ranking.py",
           "return (1.0 - a) * cand_prob - a * penalty", "return (1.0 - a) * cand_prob + a * penalty",
           ("tests/engine/test_ranking.py", "tests/engine/test_reference.py"), "repetition rewarded"),
    Mutant("penalty-mean-not-max", "handler/engine/ranking.py",
           "return cosine.max(dim=-1).values", "return cosine.nan_to_num(neginf=0.0).mean(dim=-1)",
           ("tests/engine/test_ranking.py", "tests/engine/test_reference.py"), "penalty is the mean similarity"),
    Mutant("top-k-keeps-one-more", "handler/engine/sampling.py",
           "keep = rank < k[:, None]", "keep = rank <= k[:, None]",
           ("tests/engine/test_sampling_seeds.py", "-k", "sampler"), "top-k draws k+1 tokens"),
    Mutant("contrastive-sampling-ignores-temperature", "handler/engine/ranking.py",
           "sampled = scores / temperature[:, None] + noise", "sampled = scores + noise",
           ("tests/engine/test_ranking.py",), "contrastive sampling at temperature 1 always"),
    # admission and fields
    Mutant("pool-length-check-off-by-one", "handler/serving/admission.py",
           "if prompt_tokens + new > self.pool.max_len:", "if prompt_tokens + new > self.pool.max_len + 1:",
           ("tests/serving/test_admission.py",), "a request one position too long for its slot is admitted"),
    Mutant("prompt-limit-ignored", "handler/serving/admission.py",
           "if prompt_tokens > limits.max_prompt_tokens:", "if prompt_tokens > 10 * limits.max_prompt_tokens:",
           ("tests/serving/test_handler.py",), "prompts over max_prompt_tokens admitted"),
    Mutant("operator-limit-not-applied", "handler/serving/fields.py",
           "if rng is not None and BY_NAME[name].bound is not None:", "if False:",
           ("tests/serving/test_fields.py", "tests/serving/test_params.py"), "max_new_tokens beyond the limit"),
)


def tree_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                         capture_output=True, check=True).stdout
    return [p for p in out.decode().split("\0") if p and (REPO / p).is_file()]


def copy_tree(dest: Path) -> None:
    for rel in tree_files():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, target)


def apply(root: Path, mutant: Mutant) -> None:
    path = root / mutant.path
    text = path.read_text()
    count = text.count(mutant.old)
    if count != 1:
        raise SystemExit(f"mutant {mutant.name}: the code to change occurs {count} times in {mutant.path} "
                         "(expected once): update the table")
    path.write_text(text.replace(mutant.old, mutant.new))


def run_tests(root: Path, tests: tuple[str, ...], timeout: int) -> tuple[bool, float]:
    """Whether the tests passed in `root`, and how long they took."""
    env = {**os.environ, "PYTHONPATH": str(root), "PYTHONDONTWRITEBYTECODE": "1"}
    start = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                              cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, time.monotonic() - start  # a hang is a failure the suite would show (by its timeout)
    if proc.returncode not in (0, 1):
        raise SystemExit(f"pytest could not run {tests} (exit {proc.returncode}):\n{proc.stdout[-3000:]}"
                         f"{proc.stderr[-3000:]}")
    return proc.returncode == 0, time.monotonic() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("only", nargs="*", help="run the mutants whose name contains one of these")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per mutant's tests")
    parser.add_argument("--no-baseline", action="store_true", help="skip running each test set unmutated first")
    args = parser.parse_args()
    chosen = [m for m in MUTANTS if not args.only or any(word in m.name for word in args.only)]
    if not chosen:
        raise SystemExit(f"no mutant matches {args.only}; known: {[m.name for m in MUTANTS]}")
    rows, survivors = [], 0
    with tempfile.TemporaryDirectory(prefix="mutants-") as tmp:
        clean = Path(tmp) / "clean"
        copy_tree(clean)
        if not args.no_baseline:  # a test set that fails unmutated would count every mutant as killed
            for tests in sorted({m.tests for m in chosen}):
                passed, _ = run_tests(clean, tests, args.timeout)
                if not passed:
                    raise SystemExit(f"the unmutated tree fails {' '.join(tests)}: fix that first")
        for mutant in chosen:
            work = Path(tmp) / mutant.name
            shutil.copytree(clean, work)
            apply(work, mutant)
            passed, seconds = run_tests(work, mutant.tests, args.timeout)
            shutil.rmtree(work)
            survivors += passed
            rows.append((mutant.name, mutant.path, "SURVIVED" if passed else "killed", f"{seconds:.0f}",
                         " ".join(mutant.tests)))
            print(f"{mutant.name}: {rows[-1][2]} ({seconds:.0f} s)", flush=True)
    print()
    print("| mutant | where | result | s | tests |")
    print("|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\n{len(rows) - survivors} of {len(rows)} killed, {survivors} survived")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
