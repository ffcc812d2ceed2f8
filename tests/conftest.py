"""Shared fixtures: the tiny model is built once per test session, from the repo's corpus, with no network."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests import fuzz_profile

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
fuzz_profile.load()  # hypothesis: the fixed seed and the stored examples (ci), or fresh inputs (make fuzz)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The tiny GPT-2 of `make run`, trained on the corpus (~25 s on one core) and saved in fp16 like a real one."""
    from gpt2ops.tiny_model import TINY_DEFAULTS, build_tiny_model

    out = tmp_path_factory.mktemp("models") / "tiny-gpt2"
    build_tiny_model(out, corpus=REPO / "data" / "corpus.txt", seed=TINY_DEFAULTS["seed"])
    return out


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def fp32_model(tiny_model_dir):
    """(hf_model, CompactGPT2) in float32 on the CPU: the setting where outputs must agree exactly."""
    import torch

    from handler.engine.model import load_gpt2

    torch.manual_seed(0)
    return load_gpt2(tiny_model_dir, torch.device("cpu"), torch.float32)
