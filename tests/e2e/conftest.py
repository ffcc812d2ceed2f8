"""Fixtures of the end-to-end tests: archives built once, one real TorchServe per session."""

from __future__ import annotations

import pytest

from gpt2ops.local_server import build_archive, java_available, model_config, start_server

MODEL = "tiny-gpt2"
# variants of the archive for the fault tests, each with its own model-config.yaml
VARIANTS = {
    # fault injection on, and limits wider than the model's 512 positions
    "tiny-faults": {"fault_injection": True, "limits": {"max_prompt_tokens": 500, "max_new_tokens": 400}},
    # a slot pool of at most 1 MiB: short slots, longer requests get 507
    "tiny-budget": {"pool": {"budget_mib": 1}},
    # requests must finish within 0.1% of the response timeout: long ones are refused up front
    "tiny-hurried": {"timeout_fraction": 0.001},
    # short generations, so that the valid requests among fuzzed ones cost little (tests/e2e/test_fuzz_live.py)
    "tiny-fuzz": {"defaults": {"max_new_tokens": 8}, "limits": {"max_new_tokens": 16}},
}

if not java_available():  # TorchServe's frontend is Java; CI machines have Java 17
    pytest.skip("TorchServe's Java frontend needs `java` on PATH", allow_module_level=True)


@pytest.fixture(scope="session")
def model_store(tmp_path_factory, tiny_model_dir):
    """model_store/ with the standard archive (the repo's model-config.yaml) and variants for fault tests."""
    root = tmp_path_factory.mktemp("store")
    store = root / "model_store"
    store.mkdir()
    build_archive(tiny_model_dir, MODEL, store)
    for name, overrides in VARIANTS.items():
        build_archive(tiny_model_dir, name, store, model_config(**overrides))
    return store


@pytest.fixture(scope="session")
def server(tmp_path_factory, model_store):
    """A real TorchServe with the tiny model registered through the management API, with the key."""
    srv = start_server(tmp_path_factory.mktemp("ts"), model_store)
    try:
        srv.client.register(f"{MODEL}.mar", MODEL, workers=1)
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def client(server):
    return server.client
