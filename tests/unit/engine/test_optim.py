"""The optimizers the solver builds: parameter groups and what one step does."""

import pytest
import torch
from torch import nn

from dynaseg.config.schema import SolverConfig
from dynaseg.engine.optim import build_optimizer


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3))


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_norm_parameters_get_their_own_weight_decay(kind):
    model = _model()
    cfg = SolverConfig(optimizer=kind, base_lr=0.1, weight_decay=0.05, weight_decay_norm=0.0)
    opt = build_optimizer(model, cfg)
    assert isinstance(opt, torch.optim.AdamW if kind == "adamw" else torch.optim.SGD)
    decays = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert [decays[id(p)] for p in model[0].parameters()] == [0.05, 0.05]
    assert [decays[id(p)] for p in model[1].parameters()] == [0.0, 0.0]


def test_adamw_decay_is_decoupled_from_the_gradient():
    # With a zero gradient Adam's normalised step is 0, so only the decoupled decay moves a weight:
    # w <- w (1 - lr wd). L2 decay inside the gradient would instead take a step of about lr.
    model = _model()
    weight = model[0].weight
    before = weight.detach().clone()
    opt = build_optimizer(model, SolverConfig(optimizer="adamw", base_lr=0.1, weight_decay=0.05))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    torch.testing.assert_close(weight.detach(), before * (1 - 0.1 * 0.05))


def test_fused_adamw_matches_the_reference_loop():
    # AdamW is the fused one on the CPU (one kernel per step), and three steps of it move the
    # weights as the for-loop implementation with the same groups does. (No bias before the norm: its
    # gradient is rounding noise, which Adam's normalised step would amplify differently.)
    def model() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(2, 3, 1, bias=False), nn.BatchNorm2d(3), nn.Conv2d(3, 1, 1))

    cfg = SolverConfig(optimizer="adamw", base_lr=0.1, weight_decay=0.05, weight_decay_norm=0.01)
    fused_model, loop_model = model(), model()
    fused = build_optimizer(fused_model, cfg)
    assert fused.defaults["fused"] is True
    twin = dict(zip(fused_model.parameters(), loop_model.parameters()))
    loop = type(fused)(
        [
            {
                **{k: v for k, v in g.items() if k not in ("params", "fused", "foreach")},
                "params": [twin[p] for p in g["params"]],
            }
            for g in fused.param_groups
        ],
        fused=False,
        foreach=False,
    )
    assert not any(g["fused"] or g["foreach"] for g in loop.param_groups)
    x = torch.randn(4, 2, 5, 5, generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        for m, opt in ((fused_model, fused), (loop_model, loop)):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
    for a, b in zip(fused_model.parameters(), loop_model.parameters()):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_a_parameter_whose_gradients_start_later_is_updated(kind):
    # DynaMask's MSM gets no gradient in phase 1: its first one comes after many steps.
    model = _model()
    opt = build_optimizer(model, SolverConfig(optimizer=kind, base_lr=0.1, weight_decay=0.0))
    late = model[1].weight
    before = late.detach().clone()
    for step in range(3):
        opt.zero_grad()
        for p in model.parameters():
            p.grad = None if (p is late and step == 0) else torch.ones_like(p)
        opt.step()
    assert (late.detach() < before).all()
