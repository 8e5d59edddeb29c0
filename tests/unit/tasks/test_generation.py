"""The latent-diffusion generator: seeded sampling, schedules, LoRA share, pipeline export, generate.py plans."""
from __future__ import annotations

import json
from functools import partial

import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from medtrust.generation.pipeline import MedtrustLatentDiffusionPipeline, PipelineFolderError, export_pipeline
from medtrust.generation.sampling import (diffusion_target, guidance_scale, sampling_scheduler, sampling_settings,
                                          training_scheduler)
from medtrust.losses.diffusion import DiffusionLoss
from medtrust.nets.diffusion import autoencoder_kl, conditional_unet
from medtrust.runs.generate import plan_images, read_prompts
from medtrust.tasks.generation import GenerationTask

MODS = ["cxr", "fundus"]


def tiny_task(**kw) -> GenerationTask:
    torch.manual_seed(0)
    vae = autoencoder_kl(3, 4, (16, 32), 1, 8, 32)
    unet = conditional_unet(16, 4, (32, 64), 1, 384, 8, (False, True), 8, 384)
    return GenerationTask(unet, vae, DiffusionLoss(5.0), partial(torch.optim.AdamW, lr=1e-3), MODS,
                          sampling={"steps": 4}, **{"allow_untrained_vae": True, **kw})


def test_stage_two_refuses_a_random_autoencoder_without_being_told():
    with pytest.raises(ValueError, match="model.vae_run is not set"):
        tiny_task(allow_untrained_vae=False)


@pytest.fixture(scope="module")
def task():
    return tiny_task()


def test_training_step_is_finite_and_updates(task):
    batch = {"image": torch.rand(4, 3, 32, 32) * 2 - 1, "text": ["chest X-ray: no opacity", "fundus photograph: x",
                                                                "", "chest X-ray: large opacity in the left lower lung"],
             "modality": torch.tensor([0, 1, 0, 0])}
    loss = task.training_step(batch, 0)
    loss.backward()
    grads = [p.grad for p in task.denoiser.parameters() if p.requires_grad]
    assert torch.isfinite(loss) and any(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in task.vae.parameters())  # the autoencoder is frozen in stage 2


def test_same_seed_same_image_whatever_the_batch(task):
    a = task.generate(["chest X-ray: no opacity", "fundus photograph: no haemorrhage"], MODS, [5, 6], guidance=2.0)
    b = task.generate(["fundus photograph: no haemorrhage"], ["fundus"], [6], guidance=2.0)
    c = task.generate(["fundus photograph: no haemorrhage"], ["fundus"], [7], guidance=2.0)
    assert a.shape == (2, 3, 32, 32) and a.std() > 0.01  # not a constant (e.g. all-clamped) image
    # the image depends on its seed, not on its batch (up to float summation order across batch sizes)
    assert torch.allclose(a[1], b[0], atol=1e-4) and (b - c).abs().max() > 0.01
    assert torch.equal(b, task.generate(["fundus photograph: no haemorrhage"], ["fundus"], [6], guidance=2.0))
    for sampler in ("dpmsolver++", "ddpm"):
        x1 = task.generate(["x"], [0], [3], sampler=sampler)
        assert torch.equal(x1, task.generate(["x"], [0], [3], sampler=sampler))
    with pytest.raises(ValueError, match="unknown modality 'ct'"):
        task.generate(["x"], ["ct"], [0])


def test_schedules_and_targets():
    assert guidance_scale(0, 10, 5.0, "linear", 1.0) == 5.0 and guidance_scale(9, 10, 5.0, "linear", 1.0) == 1.0
    assert guidance_scale(9, 10, 5.0, "cosine", 2.0) == pytest.approx(2.0)
    assert guidance_scale(4, 10, 5.0) == 5.0
    for beta in ("linear", "scaled_linear", "cosine"):
        for pred, name in (("epsilon", "epsilon"), ("v", "v_prediction"), ("x0", "sample")):
            s = training_scheduler(100, beta, pred)
            assert s.config.prediction_type == name
            assert sampling_scheduler(s, "dpmsolver++").config.prediction_type == name
    # every sampler keeps the training scheduler's timestep spacing (from_config alone gave DPM-Solver++
    # its own "linspace" default: 10-step samples at FID 52 against DDIM's 3.5)
    s = training_scheduler(1000, "cosine", "epsilon")
    ddim, dpm = sampling_scheduler(s, "ddim"), sampling_scheduler(s, "dpmsolver++")
    assert {ddim.config.timestep_spacing, dpm.config.timestep_spacing, sampling_scheduler(s, "ddpm").config.timestep_spacing} \
        == {s.config.timestep_spacing}
    ddim.set_timesteps(10), dpm.set_timesteps(10)
    assert int(dpm.timesteps[0]) == int(ddim.timesteps[0]) < 999
    s = training_scheduler(100, "cosine", "v")
    z, n, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([10, 90])
    assert torch.allclose(diffusion_target(s, z, n, t), s.get_velocity(z, n, t))
    with pytest.raises(ValueError, match="beta_schedule"):
        training_scheduler(100, "sigmoid")
    with pytest.raises(ValueError, match="sampler"):
        sampling_settings({"sampler": "euler"})


def test_lora_trains_under_five_percent_of_the_default_unet():
    from hydra.utils import instantiate

    from tests.unit.test_configs import cfg

    c = cfg("model=latent_diffusion", "loss=diffusion", "data=phantom_multimodal", "model.lora.enabled=true",
            "model.allow_untrained_vae=true")
    t = instantiate(c.model, loss=instantiate(c.loss), _convert_="all")
    share = t.lora_params["share"]
    trainable_unet = sum(p.numel() for p in t.denoiser.unet.parameters() if p.requires_grad)
    assert 0 < share <= 0.05 and trainable_unet == t.lora_params["trainable"]
    w = t.lora_weights()
    assert w and all("lora" in k for k in w)


def test_pipeline_round_trip_and_hostile_index(task, tmp_path):
    folder = export_pipeline(task, tmp_path / "pipe")
    pipe = MedtrustLatentDiffusionPipeline.from_pretrained(folder)
    a = pipe("chest X-ray: no opacity", "fundus", seed=1, num_inference_steps=4, guidance_scale=2.0,
             guidance_schedule="linear", output_type="pt").images
    b = task.generate(["chest X-ray: no opacity"], ["fundus"], [1], guidance=2.0, guidance_schedule="linear", steps=4)
    assert torch.allclose(a, b, atol=1e-5)
    assert not list(folder.rglob("*.bin")) and not list(folder.rglob("*.pkl"))  # safetensors + JSON only
    with pytest.raises(FileExistsError):
        export_pipeline(task, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["unet"] = ["os", "system"]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(PipelineFolderError, match="component 'unet'"):
        MedtrustLatentDiffusionPipeline.from_pretrained(folder)


def _prompts_cfg(**kw):
    return OmegaConf.create({"prompt": None, "modality": None, "prompts": None, **kw})


def test_generate_plan_shards_keep_every_seed(tmp_path):
    csv = tmp_path / "p.csv"
    pd.DataFrame({"prompt": [f"p{i}" for i in range(5)], "modality": ["cxr"] * 5, "n": ["2", "", "1", "3", ""],
                  "sex": list("FMFMF")}).to_csv(csv, index=False)
    df = read_prompts(_prompts_cfg(prompts=str(csv)))
    whole = plan_images(df, 2, 10, 0, 1)
    shards = [p for k in range(3) for p in plan_images(df, 2, 10, k, 3)]
    key = lambda p: (p["row"], p["sample"])  # noqa: E731
    assert sorted(whole, key=key) == sorted(shards, key=key)
    assert len({p["seed"] for p in whole}) == len(whole) == 10 and whole[0]["sex"] == "F"


@pytest.mark.parametrize("rows, message", [
    ({"prompt": ["a"], "text": ["x"]}, r"missing column\(s\) \['modality'\]"),
    ({"prompt": ["a", " "], "modality": ["cxr", "cxr"]}, "row 3: empty prompt"),
    ({"prompt": ["a"], "modality": ["cxr"], "seed": ["-1"]}, "row 2: seed=-1"),
    ({"prompt": ["a"], "modality": ["cxr"], "n": ["many"]}, "row 2: n='many'"),
])
def test_generate_prompt_csv_errors_name_the_row(tmp_path, rows, message):
    csv = tmp_path / "p.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    with pytest.raises(ValueError, match=message):
        read_prompts(_prompts_cfg(prompts=str(csv)))
    with pytest.raises(ValueError, match="needs modality"):
        read_prompts(_prompts_cfg(prompt="a"))


class _FakeData:
    """The two things the latent cache asks of a data module."""

    def __init__(self, images: torch.Tensor, fixed: bool = True) -> None:
        self.images, self.train_images_fixed = images, fixed

    def dataloader(self, split: str, train: bool = False):
        assert split == "train" and not train  # the fixed pixels, in index order
        items = [{"image": im, "index": i} for i, im in enumerate(self.images)]
        return torch.utils.data.DataLoader(items, batch_size=3)


def test_latent_cache_gives_the_loss_of_encoding_every_batch():
    images = torch.rand(5, 3, 32, 32) * 2 - 1
    task = tiny_task()
    task.train()
    assert task.build_latent_cache(_FakeData(images)) and len(task._posteriors[0]) == 5
    idx = torch.tensor([4, 1, 2])
    batch = {"image": images[idx], "index": idx, "text": ["chest X-ray: no opacity"] * 3,
             "modality": torch.tensor([0, 0, 1])}
    mean, std = task.posterior(batch)
    dist = task.vae.encode(images[idx]).latent_dist
    assert torch.allclose(mean, dist.mean, atol=1e-5) and torch.allclose(std, dist.std, atol=1e-5)
    t = torch.tensor([10, 500, 900])
    cached = task._loss(batch, torch.Generator().manual_seed(3), t, None, task.denoiser)
    task._posteriors = None  # encode every batch: the same posterior, the same draws, the same loss
    encoded = task._loss(batch, torch.Generator().manual_seed(3), t, None, task.denoiser)
    assert torch.allclose(cached, encoded, atol=1e-5)
    # a batch of other pixels under a cached index would be caught by nothing but this: the cache is read
    task.build_latent_cache(_FakeData(images))
    other = {**batch, "image": torch.zeros_like(batch["image"])}
    assert torch.allclose(task.posterior(other)[0], mean)
    task.eval()  # validation encodes its own images
    assert not torch.allclose(task.posterior(other)[0], mean)


def test_latent_cache_is_refused_or_skipped_when_it_would_be_wrong():
    images = torch.rand(4, 3, 32, 32)
    with pytest.raises(ValueError, match="data.augment"):
        tiny_task(latent_cache=True).build_latent_cache(_FakeData(images, fixed=False))
    assert not tiny_task().build_latent_cache(_FakeData(images, fixed=False))  # auto: off with augmentation
    assert not tiny_task(latent_cache_max_mb=1e-6).build_latent_cache(_FakeData(images))  # over the memory cap
    assert not tiny_task(latent_cache=False).build_latent_cache(_FakeData(images))
    with pytest.raises(ValueError, match="model.latent_cache='sometimes'"):
        tiny_task(latent_cache="sometimes")
