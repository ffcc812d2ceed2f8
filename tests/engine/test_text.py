"""Stop strings and streamed increments: the chunks always join to the final text."""

from __future__ import annotations

import pytest

from handler.engine.text import IncrementalText, detokenizer, find_stop


def test_find_stop_takes_the_earliest():
    assert find_stop("abc###def", ("def", "###")) == 3
    assert find_stop("abc", ("x",)) == -1


def stream_all(tokenizer, tokens, stops, step):
    row = IncrementalText(detokenizer(tokenizer), stops)
    chunks, keep = [], None
    for i in range(0, len(tokens), step):
        keep = row.add(tokens[i:i + step])
        chunks.append(row.increment())
        if keep is not None:
            break
    chunks.append(row.increment(final=True))
    return row, chunks, keep


@pytest.mark.parametrize("step", [1, 2, 5])
def test_chinese_split_across_tokens_is_never_streamed_half(tokenizer, step):
    text = "你是谁？我是一个语言模型。龘春天来了，花开了。😀"  # 龘 and 😀: not in the tiny vocabulary, split in bytes
    tokens = tokenizer.encode(text)
    detokenize = detokenizer(tokenizer)
    assert any(detokenize(tokens[:n]).endswith("\ufffd") for n in range(1, len(tokens)))  # the premise: a cut
    row, chunks, keep = stream_all(tokenizer, tokens, (), step)
    assert keep is None
    assert "".join(chunks) == text == row.text()
    assert not any("\ufffd" in c for c in chunks)


@pytest.mark.parametrize("step", [1, 3])
def test_stop_string_cuts_before_it_and_is_never_streamed(tokenizer, step):
    text = "Hello there. The weather is nice today, let us take a walk in the park."
    tokens = tokenizer.encode(text)
    row, chunks, keep = stream_all(tokenizer, tokens, ("nice today", "zzz"), step)
    assert row.text() == "Hello there. The weather is "
    assert "".join(chunks) == row.text()
    assert keep == len(row.tokens) < len(tokens)
    assert "nice today" in detokenizer(tokenizer)(tokens[:keep]) and "nice today" not in detokenizer(tokenizer)(tokens[:keep - 1])


def test_text_that_could_grow_into_a_stop_string_is_held_back(tokenizer):
    row = IncrementalText(detokenizer(tokenizer), ("world!",))
    row.add(tokenizer.encode("hello wor"))
    assert row.increment() == "hello "
    row.add(tokenizer.encode("ds"))
    assert row.increment() == "words"
