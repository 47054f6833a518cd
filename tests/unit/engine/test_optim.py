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
