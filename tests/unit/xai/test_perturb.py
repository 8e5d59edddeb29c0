"""MC-dropout explanation stability is undefined (not perfect) without a dropout module with p > 0."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from timm.layers import DropPath

from medtrust.xai.methods import ExplainInputs, ExplanationMethod
from medtrust.xai.perturb import (
    PerturbedMaps,
    active_dropout_modules,
    dropout_modules,
    mc_dropout_maps,
    perturbed_maps,
)
from medtrust.xai.targets import Target


class Tiny(nn.Module):
    """A 1×1 conv, then the given dropout-like module."""

    def __init__(self, drop: nn.Module) -> None:
        super().__init__()
        self.conv, self.drop = nn.Conv2d(1, 1, 1), drop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.conv(x))


class Output(ExplanationMethod):
    """The model's output as the 'map' (what dropout does to it is what MC stability sees)."""

    gradient = False

    def __call__(self, x: ExplainInputs) -> dict[str, torch.Tensor]:
        return {"out": x.task(x.images)[:, 0]}


def inputs(task: nn.Module) -> ExplainInputs:
    torch.manual_seed(0)
    return ExplainInputs(task.eval(), torch.rand(2, 1, 8, 8) + 1, Target(task, "region_logit", None), seed=0)


@pytest.mark.parametrize("drop, active", [
    (nn.Dropout(p=0.0), False), (nn.Dropout2d(p=0.0), False), (DropPath(drop_prob=0.0), False),
    (nn.Dropout(p=0.5), True), (nn.Dropout2d(p=0.5), True), (DropPath(drop_prob=0.5), True),
    (nn.Identity(), False),
])
def test_active_dropout_modules_need_a_positive_rate(drop, active):
    model = Tiny(drop)
    assert active_dropout_modules(model) == ([drop] if active else [])
    assert dropout_modules(model) == ([] if isinstance(drop, nn.Identity) else [drop])  # any rate


def test_p_zero_gives_no_mc_dropout_entry_and_the_reason():
    x = inputs(Tiny(nn.Dropout(p=0.0)))
    res = perturbed_maps(Output(), x, {"mc_dropout": 3, "tta": ["hflip"]})
    assert isinstance(res, PerturbedMaps) and set(res) == {"tta"}
    assert res.undefined == {"mc_dropout": "undefined: no dropout module with p > 0 in Tiny (1 dropout module(s) "
                                           "with p = 0); every MC pass would be identical"}
    with pytest.raises(ValueError, match="undefined: no dropout module with p > 0 in Tiny"):
        mc_dropout_maps(Output(), x, 3)
    assert perturbed_maps(Output(), x, {"mc_dropout": 0}).undefined == {}  # not asked for: nothing to report


def test_p_half_gives_t_different_maps_and_restores_eval():
    model = Tiny(nn.Dropout(p=0.5))
    x = inputs(model)
    res = perturbed_maps(Output(), x, {"mc_dropout": 4})
    maps = res["mc_dropout"]["out"]
    assert res.undefined == {} and maps.shape == (4, 2, 8, 8)
    assert all(not torch.equal(maps[i], maps[j]) for i in range(4) for j in range(i + 1, 4))
    assert torch.equal(maps, mc_dropout_maps(Output(), x, 4)["out"])  # seeded by x.seed
    assert not model.drop.training
