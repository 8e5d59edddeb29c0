"""Rating-driven fine-tuning, LoRA weights on their own, QLoRA on a CPU and a base with other modalities."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from medtrust.generation.lora import LoraMismatchError, apply_lora, base_fingerprint, read_lora, save_lora
from medtrust.losses.diffusion import DiffusionLoss
from tests.unit.tasks.test_generation import MODS, tiny_task

BATCH = {"image": torch.rand(4, 3, 32, 32) * 2 - 1, "text": ["chest X-ray: no opacity"] * 2 + ["fundus photograph: x"] * 2,
         "modality": torch.tensor([0, 0, 1, 1]), "reward": torch.tensor([1.0, 2.0, 3.0, 2.5])}


def _lora(**kw):
    return tiny_task(lora={"enabled": True, "rank": 4, "train_condition_encoder": False}, **kw)


def _fake_dm(rewards, modalities=None):
    recs = [{"reward": r, "modality": m} for r, m in zip(rewards, modalities or [0] * len(rewards))]
    return SimpleNamespace(dataset=lambda split: SimpleNamespace(records=recs))


def test_weighted_diffusion_loss_is_the_weighted_mean_of_per_sample_losses():
    pred, target = torch.zeros(3, 2, 2, 2), torch.stack([torch.full((2, 2, 2), v) for v in (1.0, 2.0, 3.0)])
    loss = DiffusionLoss()
    assert float(loss(pred, target)) == pytest.approx((1 + 4 + 9) / 3)
    assert float(loss(pred, target, weights=torch.tensor([0.0, 1.0, 2.0]))) == pytest.approx((0 + 4 + 18) / 3)
    with pytest.raises(ValueError, match="weights for"):
        loss(pred, target, weights=torch.ones(2))


def test_reward_weights_are_exp_of_the_centred_reward_with_mean_one_and_clipped():
    t = _lora(reward={"enabled": True, "temperature": 0.5, "max_weight": 2.0})
    info = t.fit_reward_weights(_fake_dm([1.0, 2.0, 3.0]))
    assert info["reward_mean"] == pytest.approx(2.0)
    z = (math.exp(-2) + 1 + math.exp(2)) / 3  # the weights' mean over the training set is 1 before clipping
    w = t.reward_weights(torch.tensor([1.0, 2.0, 3.0]))
    assert w.tolist() == pytest.approx([math.exp(-2) / z, 1 / z, 2.0], rel=1e-5)  # exp(2) / z = 2.6: clipped to 2
    assert info["weight_max"] == pytest.approx(2.0)
    thr = _lora(reward={"enabled": True, "weighting": "threshold", "threshold": 2.5})
    thr.fit_reward_weights(_fake_dm([1.0, 2.0, 3.0, 3.0]))
    assert thr.reward_weights(torch.tensor([1.0, 3.0])).tolist() == pytest.approx([0.0, 2.0])  # kept share 1/2 -> 2
    with pytest.raises(ValueError, match="have no reward"):
        t.fit_reward_weights(_fake_dm([1.0, None]))


def test_a_per_modality_baseline_keeps_each_modalitys_share_of_the_weight():
    """Rewards of fundus (modality 1) are all low: a global baseline drops it, a per-modality one does not."""
    rewards, mods = [2.8, 3.0, 2.9, 1.2, 1.6, 1.4], [0, 0, 0, 1, 1, 1]
    glob = _lora(reward={"enabled": True, "temperature": 0.25})
    glob.fit_reward_weights(_fake_dm(rewards, mods))
    wg = glob.reward_weights(torch.tensor(rewards))
    assert float(wg[3:].sum()) < 0.01 * float(wg[:3].sum())  # fundus all but vanishes
    per = _lora(reward={"enabled": True, "temperature": 0.25, "baseline": "modality"})
    info = per.fit_reward_weights(_fake_dm(rewards, mods))
    wp = per.reward_weights(torch.tensor(rewards), torch.tensor(mods))
    assert float(wp[:3].sum()) == pytest.approx(3.0) and float(wp[3:].sum()) == pytest.approx(3.0)
    assert float(wp[4]) > float(wp[5]) > float(wp[3])  # within fundus the better samples weigh more
    assert info["groups"]["fundus"]["reward_mean"] == pytest.approx(1.4)
    with pytest.raises(ValueError, match="needs each sample's modality"):
        per.reward_weights(torch.tensor(rewards))
    with pytest.raises(ValueError, match="model.reward.baseline='prompt'"):
        _lora(reward={"enabled": True, "baseline": "prompt"})


@pytest.mark.parametrize("reward, lora, message", [
    ({"enabled": True, "weighting": "softmax"}, True, "model.reward.weighting='softmax'"),
    ({"enabled": True, "temperature": 0}, True, "temperature must be > 0"),
    ({"enabled": True, "weighting": "threshold"}, True, "needs model.reward.threshold"),
    ({"enabled": True, "kl_weight": 0.5}, False, "kl_weight > 0 needs model.lora.enabled=true"),
])
def test_bad_reward_settings_are_refused(reward, lora, message):
    with pytest.raises(ValueError, match=message):
        tiny_task(reward=reward, lora={"enabled": lora})


def test_reward_weighted_step_trains_only_the_adapters_and_the_kl_term_is_zero_at_the_start():
    t = _lora(reward={"enabled": True, "kl_weight": 1.0})
    t.fit_reward_weights(_fake_dm([1.0, 2.0, 3.0, 2.5]))
    parts = {}
    loss = t._loss(BATCH, torch.Generator().manual_seed(0), torch.tensor([100, 300, 500, 700]), None, t.denoiser,
                   weights=t.reward_weights(BATCH["reward"]), kl_weight=1.0, parts=parts)
    assert float(parts["kl"]) < 1e-10  # LoRA B starts at zero: the adapted UNet is the base
    loss.backward()
    trained = {n for n, p in t.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert trained and all("lora_" in n for n in trained)  # the condition encoder and the base stay frozen
    with torch.no_grad():  # move the adapters: the KL term now measures the distance to the base
        for n, p in t.denoiser.unet.named_parameters():
            if "lora_B" in n:
                p.add_(0.05)
    parts = {}
    t._loss(BATCH, torch.Generator().manual_seed(0), torch.tensor([100, 300, 500, 700]), None, t.denoiser,
            kl_weight=1.0, parts=parts)
    assert float(parts["kl"]) > 1e-6
    with pytest.raises(KeyError, match="no 'reward'"):
        t.training_step({k: v for k, v in BATCH.items() if k != "reward"}, 0)


def test_ema_keeps_frozen_weights_bit_identical():
    t = _lora()
    before = base_fingerprint(t.net().unet)
    for _ in range(3):
        with torch.no_grad():
            for n, p in t.denoiser.unet.named_parameters():
                if "lora_B" in n:
                    p.add_(0.01)
        t.ema.update_parameters(t.denoiser)
    assert base_fingerprint(t.net().unet) == before
    assert any(not torch.equal(a, b) for (n, a), (_, b) in zip(t.net().unet.named_parameters(),
                                                               t.denoiser.unet.named_parameters()) if "lora_B" in n)


def test_lora_folder_applied_to_its_base_gives_the_runs_images_and_refuses_other_bases(tmp_path):
    base = tiny_task()
    ckpt = tmp_path / "base.ckpt"
    torch.save({"state_dict": base.state_dict(), "hyper_parameters": {"modalities": MODS}}, ckpt)
    tuned = tiny_task(init_from=str(ckpt), lora={"enabled": True, "rank": 4})
    with torch.no_grad():
        for n, p in tuned.ema.module.unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
        tuned.ema.module.cond.fusion.linear.bias.add_(0.1)  # the condition encoder was trained too
    folder = save_lora(tuned, tmp_path / "lora", "run")
    info, tensors = read_lora(folder)
    assert info["condition_encoder"] and info["bytes"] < 2 * 2**20 and info["base"]["fingerprint"] == base_fingerprint(base.net().unet)
    assert all(k.startswith(("unet.", "cond.")) for k in tensors) and not list(folder.glob("*.bin"))
    with pytest.raises(FileExistsError):
        save_lora(tuned, folder)
    fresh = tiny_task()
    fresh.load_state_dict(base.state_dict())
    apply_lora(fresh, folder)
    a = fresh.generate(["chest X-ray: no opacity"], ["cxr"], [3], guidance=2.0)
    b = tuned.generate(["chest X-ray: no opacity"], ["cxr"], [3], guidance=2.0)
    assert torch.allclose(a, b, atol=1e-5) and not torch.allclose(a, base.generate(["chest X-ray: no opacity"], ["cxr"], [3], guidance=2.0), atol=1e-3)
    other = tiny_task()  # same shapes, other weights
    with torch.no_grad():
        next(other.net().unet.parameters()).add_(1.0)
    with pytest.raises(LoraMismatchError, match="trained on other base weights"):
        apply_lora(other, folder)
    apply_lora(other, folder, allow_other_base=True)  # the user may insist
    from medtrust.nets.diffusion import autoencoder_kl, conditional_unet
    from medtrust.tasks.generation import GenerationTask
    from functools import partial

    wide = GenerationTask(conditional_unet(16, 4, (32, 32), 1, 384, 8, (False, True), 8, 384),
                          autoencoder_kl(3, 4, (16, 32), 1, 8, 32), DiffusionLoss(), partial(torch.optim.AdamW, lr=1e-3),
                          MODS, allow_untrained_vae=True)
    with pytest.raises(LoraMismatchError, match="different base UNet: config differs in block_out_channels"):
        apply_lora(wide, folder)
    with pytest.raises(LoraMismatchError, match="already has LoRA adapters"):
        apply_lora(tuned, folder)
    with pytest.raises(FileNotFoundError, match="not a LoRA folder"):
        apply_lora(fresh, tmp_path)


def test_lora_targets_missing_from_the_base_are_named(tmp_path):
    tuned = _lora()
    folder = save_lora(tuned, tmp_path / "lora")
    import json

    info = json.loads((folder / "lora.json").read_text())
    info["targeted"]["down_blocks.9.attentions.0.proj_out"] = [64, 64]
    (folder / "lora.json").write_text(json.dumps(info))
    with pytest.raises(LoraMismatchError, match="target module 'down_blocks.9.attentions.0.proj_out' does not exist"):
        apply_lora(tiny_task(), folder)


def test_qlora_on_a_cpu_stops_with_a_message():
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: QLoRA is allowed")
    with pytest.raises(ValueError, match=r"model.lora.quantize=nf4 \(QLoRA\).*needs a CUDA GPU"):
        tiny_task(lora={"enabled": True, "quantize": "nf4"})
    with pytest.raises(ValueError, match="model.lora.quantize='int3'"):
        tiny_task(lora={"enabled": True, "quantize": "int3"})


def test_init_from_a_base_with_other_modalities_keeps_shared_ones_by_name(tmp_path):
    base = tiny_task()
    with torch.no_grad():
        base.denoiser.cond.fusion.embedding.weight.copy_(torch.arange(3.0)[:, None].expand(3, 384))  # cxr 0, fundus 1, null 2
    base.ema.module.load_state_dict(base.denoiser.state_dict())  # init_from takes the EMA weights
    ckpt = tmp_path / "base.ckpt"
    torch.save({"state_dict": base.state_dict(), "hyper_parameters": {"modalities": MODS}}, ckpt)
    from functools import partial

    from medtrust.nets.diffusion import autoencoder_kl, conditional_unet
    from medtrust.tasks.generation import GenerationTask

    t = GenerationTask(conditional_unet(16, 4, (32, 64), 1, 384, 8, (False, True), 8, 384),
                       autoencoder_kl(3, 4, (16, 32), 1, 8, 32), DiffusionLoss(), partial(torch.optim.AdamW, lr=1e-3),
                       ["dermoscopy", "cxr"], init_from=str(ckpt))
    emb = t.denoiser.cond.fusion.embedding.weight[:, 0].tolist()
    assert emb == pytest.approx([0.5, 0.0, 2.0])  # new = mean of the base's modalities, cxr kept, null kept
    assert t.init_report["modalities"] == {"base": MODS, "shared": ["cxr"], "new": ["dermoscopy"], "dropped": ["fundus"]}
    assert "denoiser.cond.fusion.embedding.weight" in t.init_report["loaded"]
