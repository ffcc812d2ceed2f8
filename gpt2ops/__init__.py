"""The operator's library of this project: a TorchServe client, a local server for tests and benchmarks,
the tiny model builder and the command-line tools (installed by pyproject.toml; never part of a model archive).
"""

from pathlib import Path

# The checkout this library runs from: default locations of config.properties, run/, data/ and model_store/.
REPO = Path(__file__).resolve().parents[1]
