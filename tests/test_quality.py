"""The degeneration metrics of benchmarks/quality.py on hand-worked examples, the benchmark on the tiny model,
and the readability of the tiny model's answers (the `make run` answer and the README's examples)."""

from __future__ import annotations

import pytest
import torch

from benchmarks import quality
from benchmarks.quality import MODES, PROMPTS, diversity, in_corpus, length_to_eos, rep_n
from handler.engine.params import GenerationParams
from tests.readability import letter_share, readability_problems

# ---- metrics, worked by hand ----


def test_rep_n_of_an_alternating_sequence():
    seq = [1, 2, 1, 2, 1, 2]
    # 2-grams: 12 21 12 21 12 -> 5, of which 2 unique; 3-grams: 121 212 121 212 -> 4, 2 unique;
    # 4-grams: 1212 2121 1212 -> 3, 2 unique
    assert rep_n([seq], 2) == pytest.approx(100 * (1 - 2 / 5))
    assert rep_n([seq], 3) == pytest.approx(50.0)
    assert rep_n([seq], 4) == pytest.approx(100 / 3)
    assert diversity([seq]) == pytest.approx((2 / 5) * (2 / 4) * (2 / 3))


def test_no_repetition_is_zero_and_full_diversity():
    assert [rep_n([[1, 2, 3, 4, 5]], n) for n in (2, 3, 4)] == [0.0, 0.0, 0.0]
    assert diversity([[1, 2, 3, 4, 5]]) == 1.0


def test_one_token_repeated_has_no_diversity():
    seq = [7] * 10  # every n-gram is the same one: 1 unique of 10 - n + 1
    assert rep_n([seq], 2) == pytest.approx(100 * (1 - 1 / 9))
    assert rep_n([seq], 4) == pytest.approx(100 * (1 - 1 / 7))
    assert diversity([seq]) == pytest.approx((1 / 9) * (1 / 8) * (1 / 7))


def test_counts_are_summed_over_sequences_and_repeats_across_them_do_not_count():
    # [1 1 1]: 2-grams 11 11 (2, 1 unique); [2 3]: 23 (1, 1 unique) -> 1 - 2/3
    assert rep_n([[1, 1, 1], [2, 3]], 2) == pytest.approx(100 / 3)
    # the same text twice is not a repetition within a generation
    assert rep_n([[1, 2, 3], [1, 2, 3]], 2) == 0.0
    # a sequence shorter than n has no n-gram and weighs nothing
    assert rep_n([[5], [1, 1, 1]], 2) == pytest.approx(50.0)
    assert rep_n([[5], []], 2) == 0.0


def test_in_corpus_and_length_to_eos():
    corpus = {(1, 2, 3, 4), (2, 3, 4, 5)}
    assert in_corpus([[1, 2, 3, 4, 5, 6]], corpus) == pytest.approx(100 * 2 / 3)  # 1234 2345 in, 3456 not
    assert in_corpus([[1, 2, 3]], corpus) == 0.0
    assert length_to_eos([4, 5, 0, 6, 0], (0,)) == 2
    assert length_to_eos([4, 5, 6], (0,)) == 3
    assert length_to_eos([4, 5, 6], ()) == 3


def test_readability_rules():
    assert readability_problems("我是这个项目自带的小模型。I am a small model.") == []
    assert readability_problems("abc\ufffddef")
    assert readability_problems("abc\x07def")
    assert readability_problems("。，!? 1 2 3 ...")  # no words
    assert readability_problems("你好DDDDDDDD")  # a loop
    assert letter_share("ab 12") == 0.5


# ---- the benchmark on the tiny model ----


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return quality.load(tiny_model_dir)


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread, as the benchmark runs (two threads of a tiny model spin when the machine is busy)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_generate_tokens_greedy_is_the_argmax_of_transformers(loaded):
    hf_model, model, tokenizer = loaded
    prompt = tokenizer.encode("The weather")
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(16):
            ids.append(int(hf_model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    params = GenerationParams(decoding="greedy", max_new_tokens=16)
    assert quality.generate_tokens(model, prompt, params, (), seed=0) == ids[len(prompt):]
    eos = tokenizer.eos_token_id
    stopped = quality.generate_tokens(model, prompt, params, (eos,), seed=0)
    expected = ids[len(prompt):]
    assert stopped == (expected[: expected.index(eos) + 1] if eos in expected else expected)


def test_contrastive_search_repeats_far_less_than_greedy_on_the_tiny_model(loaded):
    """The paper's claim, on the shipped model: half of greedy's repeated 2-grams or fewer, more diversity."""
    hf_model, model, tokenizer = loaded
    modes = [m for m in MODES if m.name in ("greedy", "contrastive a=0.6 k=4")]
    greedy, contrastive = quality.run(hf_model, model, tokenizer, modes=modes, max_new_tokens=128)
    assert all(len(g) == 128 for g in greedy.generations + contrastive.generations)
    assert greedy.rep[2] > 10.0, greedy.rep  # the tiny model loops under greedy decoding
    assert contrastive.rep[2] < greedy.rep[2] / 2 and contrastive.diversity > greedy.diversity


def test_benchmark_cli_prints_the_table(tiny_model_dir, capsys):
    argv = ["--model-dir", str(tiny_model_dir), "--prompts", "2", "--max-new-tokens", "12",
            "--modes", "greedy", "contrastive a=0.6 k=4", "--threads", "1"]
    assert quality.main(argv) == 0
    out = capsys.readouterr().out
    assert "cores" in out.splitlines()[0] and "torch" in out.splitlines()[0]  # the machine, in the header
    rows = [line for line in out.splitlines() if line.strip().startswith(("greedy ", "contrastive a=0.6 k=4 "))]
    assert len(rows) == 4  # a table row and a sample per mode
    assert "2 prompts x 12 new tokens" in out and repr(PROMPTS[0]) in out


# ---- readable answers ----


@pytest.fixture(scope="module")
def corpus_grams(loaded):
    return quality.corpus_ngrams(loaded[2], quality.DEFAULT_CORPUS)


@pytest.mark.parametrize("prompt,params", [
    ("你是谁?", GenerationParams()),  # make run (the model-config.yaml defaults: contrastive, alpha 0.6, k 4)
    ("你好", GenerationParams(decoding="greedy", max_new_tokens=32)),  # the README's query examples
    ("Who are you?", GenerationParams(decoding="greedy", max_new_tokens=32)),
    ("Who are you?", GenerationParams()),
])
def test_tiny_model_answers_are_readable(loaded, corpus_grams, prompt, params):
    hf_model, model, tokenizer = loaded
    tokens = quality.generate_tokens(model, tokenizer.encode(prompt), params, (tokenizer.eos_token_id,), seed=0)
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    assert readability_problems(text) == [], text
    assert len(text.strip()) >= 8, text
    # text of the corpus' kind: most of its token 4-grams occur in the corpus (random weights: none do)
    assert in_corpus([tokenizer.encode(prompt) + tokens], corpus_grams) >= 50.0, text
