"""Loading what a worker serves: the device TorchServe assigned, the model and tokenizer from the archive's folder.

`from_pretrained` on the unpacked archive folder, `local_files_only`: nothing is
downloaded. The weights go straight onto the device in the serving dtype
(`handler.engine.model.load_gpt2`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from handler.engine.model import CompactGPT2, load_gpt2

logger = logging.getLogger(__name__)


def worker_device(properties) -> torch.device:
    """cuda:<gpu_id> where TorchServe assigned a GPU and CUDA is there, else the CPU.

    The same choice as `BaseHandler.initialize` makes for CUDA and CPU; that method cannot be reused here
    because it goes on to load a TorchScript or eager model file, which this archive does not have.
    """
    gpu_id = properties.get("gpu_id")
    if torch.cuda.is_available() and gpu_id is not None:
        device = torch.device(f"cuda:{gpu_id}")
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


@dataclass
class LoadedModel:
    hf_model: object  # transformers' GPT2LMHeadModel: owns the weights
    model: CompactGPT2  # the engine's forward over the same weights
    tokenizer: object
    eos_ids: tuple[int, ...]

    @property
    def weights_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.hf_model.parameters())


def load_model(model_dir: str, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    hf_model, model = load_gpt2(model_dir, device, dtype)
    return LoadedModel(hf_model, model, tokenizer, eos_ids(model_dir, tokenizer, hf_model.config))


def eos_ids(model_dir, tokenizer, config) -> tuple[int, ...]:
    """The model's end-of-text ids: generation config first, then tokenizer, then model config."""
    from transformers import GenerationConfig

    candidates = None
    if os.path.exists(os.path.join(model_dir, "generation_config.json")):
        candidates = GenerationConfig.from_pretrained(model_dir, local_files_only=True).eos_token_id
    if candidates is None:
        candidates = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else config.eos_token_id
    if candidates is None:
        logger.warning("the model names no end-of-text token: generation stops only at max_new_tokens or a stop string")
        return ()
    return tuple(candidates) if isinstance(candidates, (list, tuple)) else (int(candidates),)
