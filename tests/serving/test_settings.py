"""Start-up checks of the handler's settings, and the tiny model's determinism and shape."""

from __future__ import annotations

import hashlib
from dataclasses import replace

import pytest
import torch
import yaml

from handler.serving.settings import HandlerSettings
from gpt2ops.tiny_model import TINY_DEFAULTS, TRAINING, build_tiny_model
from gpt2ops.local_server import REPO


def test_shipped_model_config_is_valid():
    config = yaml.safe_load((REPO / "model-config.yaml").read_text())
    settings = HandlerSettings.from_model_config(config)
    assert settings.max_batch_size == config["batchSize"] > 1
    assert config["maxBatchDelay"] > 0
    assert settings.defaults.decoding == "contrastive"
    assert (settings.defaults.penalty_alpha, settings.defaults.top_k) == (0.6, 4)
    assert settings.torch_dtype(torch.device("cuda", 0)) == torch.float16
    assert settings.torch_dtype(torch.device("cpu")) == torch.float32


@pytest.mark.parametrize("handler,words", [
    ({"dtype": "float64"}, "handler.dtype"),
    ({"stop_check_interval": 0}, "stop_check_interval"),
    ({"warmup": "yes"}, "handler.warmup"),
    ({"timeout_fraction": 1.5}, "timeout_fraction"),
    ({"kv_budget_mib": -1}, "kv_budget_mib"),
    ({"fault_injection": 1}, "fault_injection"),
    ({"batch": 3}, "unknown handler keys"),
    ({"defaults": {"top_k": 100}}, "handler.defaults: top_k must be <= 16"),
    ({"limits": {"max_top_k": 0}}, "handler.limits.max_top_k"),
    ({"limits": {"max_logprobs": 21}}, "handler.limits.max_logprobs must be at most 20"),
    ({"defaults": {"repetition_penalty": 0}}, "handler.defaults: repetition_penalty must be > 0"),
])
def test_wrong_settings_stop_the_worker_with_the_key_named(handler, words):
    with pytest.raises(ValueError, match=words):
        HandlerSettings.from_model_config({"batchSize": 4, "handler": handler})


def digest(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


# The whole training path (tokenizer, data order, initial weights, AdamW, learning-rate schedule, export)
# on a few steps: a run of the shipped plan takes ~25 s, and the session's model is one already. Saved in
# float32, where a difference in the last bit of a sum still shows (fp16 rounding could hide it).
SHORT = replace(TRAINING, steps=12, warmup=4)


def test_tiny_model_training_is_deterministic(tmp_path):
    corpus = REPO / "data" / "corpus.txt"
    seed = TINY_DEFAULTS["seed"]
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    build_tiny_model(tmp_path / "a", corpus=corpus, seed=seed, plan=SHORT, dtype_name="float32")
    build_tiny_model(tmp_path / "b", corpus=corpus, seed=seed, plan=SHORT, dtype_name="float32")
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    build_tiny_model(tmp_path / "other-seed", corpus=corpus, seed=seed + 1, plan=SHORT, dtype_name="float32")
    assert digest(tmp_path / "other-seed")["model.safetensors"] != digest(tmp_path / "a")["model.safetensors"]
    build_tiny_model(tmp_path / "untrained", corpus=corpus, seed=seed, plan=replace(SHORT, steps=0),
                     dtype_name="float32")
    assert digest(tmp_path / "untrained")["model.safetensors"] != digest(tmp_path / "a")["model.safetensors"]
    # training leaves torch's settings as it found them
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == (threads, deterministic)


def test_tiny_model_is_shaped_like_gpt2(tiny_model_dir):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_model_dir)
    assert config.model_type == "gpt2" and config.n_positions >= 256 and config.n_layer >= 2
    assert {p.name for p in tiny_model_dir.iterdir()} >= {"model.safetensors", "tokenizer.json", "config.json",
                                                         "generation_config.json", "tokenizer_config.json"}


def test_tiny_tokenizer_round_trips_chinese_and_english(tokenizer):
    for text in ("你是谁?", "Who are you? 我是一个语言模型。", "春眠不觉晓，处处闻啼鸟。"):
        assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.eos_token == "<|endoftext|>"
    assert len(tokenizer.encode("你是谁?")) < len("你是谁?".encode())  # BPE merged the corpus' characters


def test_weights_are_saved_in_float16(tiny_model_dir):
    from safetensors import safe_open

    with safe_open(str(tiny_model_dir / "model.safetensors"), framework="pt") as f:
        assert {f.get_tensor(name).dtype for name in f.keys()} == {torch.float16}


# ---- model-config.yaml as YAML 1.1 reads it: on/off/yes/no are booleans unless quoted ----


@pytest.mark.parametrize("line, compile_setting", [
    ("compile: on", "on"),  # as the README and model-config.yaml's comment show it
    ("compile: off", "off"),
    ("compile: yes", "on"),
    ("compile: no", "off"),
    ("compile: true", "on"),
    ("compile: 'on'", "on"),
    ('compile: "off"', "off"),
    ("compile: auto", "auto"),
])
def test_compile_written_as_the_docs_show_it_means_what_it_says(line, compile_setting):
    config = yaml.safe_load(f"handler:\n  {line}\n")
    assert HandlerSettings.from_model_config(config).compile == compile_setting


@pytest.mark.parametrize("text, field, example", [
    ("handler:\n  dtype: on\n", "handler.dtype", 'dtype: "float16"'),
    ("handler:\n  dtype: no\n", "handler.dtype", 'dtype: "float16"'),
    ("handler:\n  pool:\n    decode_shapes: yes\n", "handler.pool.decode_shapes", 'decode_shapes: "fixed"'),
    ("handler:\n  pool:\n    decode_shapes: off\n", "handler.pool.decode_shapes", 'decode_shapes: "fixed"'),
    ("handler:\n  defaults:\n    decoding: on\n", "handler.defaults.decoding", 'decoding: "greedy"'),
])
def test_a_yaml_boolean_in_a_word_field_is_refused_naming_the_field_and_the_quoting(text, field, example):
    config = yaml.safe_load(text)
    with pytest.raises(ValueError) as err:
        HandlerSettings.from_model_config(config)
    message = str(err.value)
    assert message.startswith(f"{field} must be a word, got the YAML boolean"), message
    assert "quote the value" in message and example in message, message


@pytest.mark.parametrize("word", ["auto", "on", "off"])
def test_model_config_yaml_with_each_documented_compile_word_unquoted(word):
    """The shipped file with its `compile:` line set to each word its comment lists, unquoted, loads."""
    text = (REPO / "model-config.yaml").read_text()
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("compile:"))
    assert "| on | off" in line, "model-config.yaml's compile comment no longer lists on and off"
    changed = text.replace(line, line.replace("compile: auto", f"compile: {word}", 1))
    assert HandlerSettings.from_model_config(yaml.safe_load(changed)).compile == word
