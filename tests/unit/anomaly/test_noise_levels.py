"""Several noise levels (``reconstruction.t0: [..]``) in the DDPM anomaly task, and evaluation-time
settings that need the statistics fitted again."""
from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from tests.unit.test_configs import cfg


def _task(*over: str):
    c = cfg("experiment=safegen", "data.image_size=[16,16]", "model.net.block_out_channels=[16,16,16]",
            "model.net.norm_num_groups=8", *over)
    torch.manual_seed(0)
    return instantiate(c.model, loss=instantiate(c.loss), _convert_="all").eval()


def test_a_list_of_t0_gives_one_residual_map_per_level_at_the_summed_cost():
    one, two = _task("model.reconstruction.t0=20"), _task("model.reconstruction.t0=[80,20]")
    two.load_state_dict(one.state_dict())
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    r1, i1 = one.residuals(x)
    r2, i2 = two.residuals(x)
    assert r1.shape == (3, 16, 16) and r2.shape == (3, 2, 16, 16)
    assert two.recon_cfg["t0"] == [20, 80]                       # sorted: the first level is the smallest
    assert torch.allclose(r2[:, 0], r1, atol=1e-6)                # level 20 is the single-level residual
    assert not torch.allclose(r2[:, 1], r1)
    assert i2["evaluations_per_image"] == 2 * i1["evaluations_per_image"] and i2["t_start"][1] <= 80
    assert two.reconstruction_summary()["t0"] == [20, 80] and one.reconstruction_summary()["t0"] == 20
    assert two(x).shape == (3, 2, 16, 16)                         # the XAI target sees both levels
    assert torch.equal(two.embeddings(x), one.embeddings(x))     # the contrastive embedding at the first level


@pytest.mark.parametrize("t0, msg", [("[20,20]", "distinct"), ("[20,1000]", "0 < t0 < 1000"), ("abc", "integer")])
def test_bad_noise_levels_are_named(t0, msg):
    with pytest.raises(Exception, match=msg) as err:
        _task(f"model.reconstruction.t0={t0}")
    assert "model.reconstruction.t0" in str(err.value)


def test_evaluation_scoring_overrides_apply_and_an_unknown_key_is_named():
    task = _task()
    task.use_evaluation_reconstruction({"scoring": {"image_score": "top_k", "excess_z": None},
                                        "reconstruction": {"t0": [10, 40]}})
    assert task.score_cfg["image_score"] == "top_k" and task.recon_cfg["t0"] == [10, 40]
    with pytest.raises(ValueError, match="evaluation.scoring.*unknown key.*'topk'"):
        task.use_evaluation_reconstruction({"scoring": {"topk": 2}})
    with pytest.raises(ValueError, match="evaluation.scoring.image_score='mean'"):
        task.use_evaluation_reconstruction({"scoring": {"image_score": "mean"}})


def test_the_phanes_mode_regenerates_only_what_its_coarse_stage_flags():
    task = _task("model.reconstruction.t0=20", "model.reconstruction.mode=phanes", "model.reconstruction.phanes_t=100",
                 "model.reconstruction.phanes_k=3", "model.reconstruction.phanes_mask_percent=10",
                 "model.reconstruction.phanes_dilate=0", "model.reconstruction.r=1")
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    res, info = task.residuals(x)
    ph = info["reconstruction"]
    changed = (ph != x).float().mean().item()
    assert res.shape == (2, 16, 16) and 0 < changed <= 26 / 256        # only the flagged 10 % (26 px) is regenerated
    assert info["mode"] == "phanes" and info["evaluations_per_image"] == 3 + task.recon_cfg["k"]
    s = task.reconstruction_summary()
    assert s["mode"] == "phanes" and s["phanes_t"] == 100 and s["phanes_coarse"] == "self"
    assert "phanes_t" not in _task().reconstruction_summary()             # other modes' statistics stay valid
    with pytest.raises(ValueError, match="evaluation.reconstruction.mode='inpaint'"):
        task.use_evaluation_reconstruction({"reconstruction": {"mode": "inpaint"}})
    with pytest.raises(Exception, match="safegen_ae"):
        task.use_evaluation_reconstruction({"reconstruction": {"phanes_coarse": "/nonexistent/run"}})
        task.residuals(x)
