"""Learning-rate schedules (values at key steps, pure functions of the step) and AdamW setup."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lingua.args import ConfigError, from_dict
from lingua.optim import SCHEDULERS, OptimArgs, _fused_supported, build_optimizer, lr_at, lr_factor, set_lr
from lingua.transformer import TransformerArgs, build_model

TOTAL = 100


def args(scheduler: str, **kw) -> OptimArgs:
    base = {"lr": 1.0, "warmup": 10, "lr_min_ratio": 0.1, "scheduler": scheduler}
    return OptimArgs(**{**base, **kw})


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_warmup_is_linear_from_first_step_to_peak(scheduler):
    a = args(scheduler)
    assert lr_factor(1, a, TOTAL) == pytest.approx(0.1)  # 1/warmup, not 0: the first step trains
    assert lr_factor(5, a, TOTAL) == pytest.approx(0.5)
    assert lr_factor(10, a, TOTAL) == pytest.approx(1.0)


def test_cosine_key_steps():
    a = args("cosine")
    assert lr_factor(10, a, TOTAL) == pytest.approx(1.0)
    assert lr_factor(55, a, TOTAL) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the decay
    assert lr_factor(40, a, TOTAL) == pytest.approx(0.1 + 0.45 * 1.5)  # 1/3 of the way: cos = 1/2
    assert lr_factor(100, a, TOTAL) == pytest.approx(0.1)
    assert lr_factor(150, a, TOTAL) == pytest.approx(0.1)  # past the end: stays at the floor


def test_linear_key_steps():
    a = args("linear")
    assert lr_factor(10, a, TOTAL) == pytest.approx(1.0)
    assert lr_factor(55, a, TOTAL) == pytest.approx(0.55)
    assert lr_factor(100, a, TOTAL) == pytest.approx(0.1)


def test_wsd_stable_then_linear_decay_over_last_fraction():
    a = args("wsd", decay_fraction=0.2)
    assert lr_factor(10, a, TOTAL) == 1.0
    assert lr_factor(80, a, TOTAL) == 1.0  # decay starts after step 80 (last 20 steps)
    assert lr_factor(90, a, TOTAL) == pytest.approx(1.0 - 0.9 * 0.5)
    assert lr_factor(100, a, TOTAL) == pytest.approx(0.1)
    assert lr_factor(50, args("wsd", decay_fraction=0.0), TOTAL) == 1.0
    assert lr_factor(100, args("wsd", decay_fraction=0.0), TOTAL) == 1.0  # no decay at all


def test_constant_and_no_warmup():
    assert lr_factor(1, args("constant", warmup=0), TOTAL) == 1.0
    assert lr_factor(100, args("constant"), TOTAL) == 1.0
    assert lr_factor(1, args("cosine", warmup=0), TOTAL) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 100)))


def test_lr_at_scales_peak_and_rejects_step_zero():
    assert lr_at(10, args("cosine", lr=3e-4), TOTAL) == pytest.approx(3e-4)
    with pytest.raises(ValueError, match="1-based"):
        lr_factor(0, args("cosine"), TOTAL)


@settings(max_examples=60, deadline=None)
@given(
    scheduler=st.sampled_from(SCHEDULERS),
    warmup=st.integers(0, 50),
    total=st.integers(1, 400),
    low=st.floats(0.0, 1.0),
    frac=st.floats(0.0, 1.0),
)
def test_schedule_is_bounded_and_never_rises_after_warmup(scheduler, warmup, total, low, frac):
    a = OptimArgs(lr=1.0, scheduler=scheduler, warmup=warmup, lr_min_ratio=low, decay_fraction=frac)
    values = [lr_factor(s, a, total) for s in range(1, total + 20)]
    assert all(0.0 < v <= 1.0 for v in values[: max(warmup - 1, 0)])
    after = values[max(warmup, 1) - 1 :]
    assert all(low - 1e-12 <= v <= 1.0 for v in after)
    assert all(b <= a_ + 1e-12 for a_, b in zip(after, after[1:]))
    # a pure function of the step: same value whatever was computed before
    assert lr_factor(total, a, total) == values[total - 1]


def test_bad_optim_config_is_a_config_error():
    with pytest.raises(ConfigError, match="scheduler"):
        from_dict(OptimArgs, {"scheduler": "cosine_annealing"})
    with pytest.raises(ConfigError, match="lr_min_ratio"):
        from_dict(OptimArgs, {"lr_min_ratio": 1.5})


def test_adamw_groups_decay_only_matrices_and_steps():
    model = build_model(TransformerArgs(dim=32, n_layers=1, n_heads=2, vocab_size=64, max_seqlen=16))
    opt = build_optimizer(model, OptimArgs(weight_decay=0.1))
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decayed["params"]) and all(p.ndim == 1 for p in plain["params"])
    n_params = sum(1 for _ in model.parameters())
    assert len(decayed["params"]) + len(plain["params"]) == n_params
    assert opt.defaults["fused"] == _fused_supported(list(model.parameters()))
    before = model.output.weight.detach().clone()
    model(torch.randint(0, 64, (2, 8))).sum().backward()
    set_lr(opt, 1e-2)
    opt.step()
    assert all(g["lr"] == 1e-2 for g in opt.param_groups)
    assert not torch.equal(before, model.output.weight)
