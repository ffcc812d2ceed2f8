"""The warm-up's step time is per decode step, whatever `sync_every` (how many steps run between looks).

Admission sizes the longest generation that can finish in time from this figure
(handler.serving.admission.Admission.set_step_time): a figure per look instead of per step would refuse
requests that could finish.
"""

from __future__ import annotations

from handler.engine import Engine, PoolShape


def step_ms(model, sync_every: int) -> float:
    engine = Engine(model, PoolShape(max_slots=2, max_len=64, max_top_k=4), sync_every=sync_every)
    return engine.warm_up(prompt_len=8, steps=32)


def test_warm_up_gives_the_same_step_time_whatever_sync_every(fp32_model):
    _, model = fp32_model
    step_ms(model, 1)  # the first engine of the process pays one-time costs (kernel selection, allocations)
    every_step, every_8 = step_ms(model, 1), step_ms(model, 8)
    assert every_step > 0 and every_8 > 0
    assert 0.5 <= every_8 / every_step <= 2.0, (every_step, every_8)
