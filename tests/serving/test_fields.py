"""The request-field table: it is docs/api.md's table, and every field in it is parsed by the table's rules."""

from __future__ import annotations

import pytest
import yaml

from gpt2ops import REPO
from handler.engine.params import GenerationParams, InvalidParameter
from handler.serving.fields import BY_NAME, FIELDS, PROMPT, markdown_rows
from handler.serving.limits import RequestLimits
from handler.serving.settings import HandlerSettings
from tests.readme import table_rows


def readme_request_rows() -> list[str]:
    return table_rows("| field | type | default | range / rule |", "api.md")


def test_the_readme_table_is_the_field_table_with_the_shipped_config():
    settings = HandlerSettings.from_model_config(yaml.safe_load((REPO / "model-config.yaml").read_text()))
    assert readme_request_rows() == markdown_rows(settings.defaults, settings.limits)


def test_every_parameter_of_the_engine_is_a_request_field():
    assert [f.name for f in FIELDS] == [f for f in GenerationParams.__dataclass_fields__]
    assert PROMPT not in BY_NAME


@pytest.mark.parametrize("fields,field", [
    (dict(top_k=1), "top_k"), (dict(decoding="sample", top_k=-1, do_sample=True), "top_k"),
    (dict(penalty_alpha=2.0), "penalty_alpha"), (dict(temperature=0.0), "temperature"),
    (dict(decoding="greedy", do_sample=True), "do_sample"), (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(seed=2**32), "seed"), (dict(eos_token_id=()), "eos_token_id"), (dict(stop=("",)), "stop"),
])
def test_generation_params_check_themselves_wherever_they_are_built(fields, field):
    """Parameters built in code (the warm-up, benchmarks) are checked like a request's."""
    with pytest.raises(InvalidParameter) as err:
        GenerationParams(**fields)
    assert err.value.field == field and field in err.value.message


def test_limits_narrow_the_engine_ranges():
    limits = RequestLimits(max_top_k=8, max_new_tokens=32)
    assert BY_NAME["top_k"].range("contrastive", limits, 1000).high == 8
    assert BY_NAME["top_k"].range("sample", limits, 1000).high == 1000
    assert BY_NAME["max_new_tokens"].range("greedy", limits, 1000).high == 32
    assert BY_NAME["penalty_alpha"].range("contrastive", limits, 1000).high == 1.0  # no operator limit
