"""What "readable" means for the tiny model's answers: no broken or control characters, mostly letters."""

from __future__ import annotations

import re
import unicodedata


def letter_share(text: str) -> float:
    """Share of letters (any script: Han characters count) among the characters that are not spaces."""
    chars = [c for c in text if not c.isspace()]
    return sum(unicodedata.category(c).startswith("L") for c in chars) / len(chars) if chars else 0.0


def readability_problems(text: str, min_letters: float = 0.75) -> list[str]:
    """Why `text` is not a readable answer (empty list: it is)."""
    problems = []
    if not text.strip():
        problems.append("empty")
    if "\ufffd" in text:
        problems.append("replacement character U+FFFD (a token split inside a character)")
    controls = sorted({hex(ord(c)) for c in text if unicodedata.category(c) in ("Cc", "Cf", "Co", "Cn")})
    if controls:
        problems.append(f"control or unassigned characters {controls}")
    run = re.search(r"(.)\1{3,}", text)
    if run:
        problems.append(f"{run.group(1)!r} {len(run.group(0))} times in a row")
    if letter_share(text) < min_letters:
        problems.append(f"only {letter_share(text):.0%} letters")
    return problems
