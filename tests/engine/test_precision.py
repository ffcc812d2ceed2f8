"""Float32 matmul precision is the package's: TorchServe's import turns TF32 on for capability >= 8.0, the
handler's `own_matmul_precision` turns it off again and says so. The GPU is faked (named below): on this CPU
machine torch.cuda.is_available and get_device_capability are replaced before TorchServe's module runs."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from handler.engine.precision import ENGINE_PRECISION, own_matmul_precision


@pytest.fixture
def restore_precision():
    before = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(before)


def run_torchserve_base_handler_import(monkeypatch, capability):
    """Execute ts/torch_handler/base_handler.py's module code as an import would, on a fake GPU of `capability`
    (a fresh module object: the imported one is left alone)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # fake GPU
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: capability)  # fake GPU
    spec = importlib.util.find_spec("ts.torch_handler.base_handler")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)


@pytest.mark.parametrize("capability,after_import,changed", [((9, 0), "high", True), ((8, 0), "high", True),
                                                             ((7, 5), "highest", False)])
def test_the_handler_undoes_torchserves_tf32(monkeypatch, restore_precision, capability, after_import, changed):
    torch.set_float32_matmul_precision("highest")
    run_torchserve_base_handler_import(monkeypatch, capability)
    assert torch.get_float32_matmul_precision() == after_import  # what TorchServe's import leaves
    report = own_matmul_precision()
    assert torch.get_float32_matmul_precision() == ENGINE_PRECISION == "highest"
    assert report == {"float32_matmul_precision": "highest", "found": after_import, "changed": changed}


def test_the_ranking_matmul_is_float32_again(monkeypatch, restore_precision):
    """What "high" would do to the ranking's cosine matmul is what the setting controls; after the handler's
    call the matmul backend is asked for full float32 (the flag Inductor and cuBLAS read)."""
    run_torchserve_base_handler_import(monkeypatch, (9, 0))
    own_matmul_precision()
    assert torch.backends.cuda.matmul.allow_tf32 is False
