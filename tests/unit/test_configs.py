"""Config contract: every model/loss/augment/experiment config composes and instantiates."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate

import medtrust.runs.resolvers  # noqa: F401
from medtrust.runs.resolvers import PROJECT_ROOT

CONF = PROJECT_ROOT / "conf"


def names(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml") if not p.stem.startswith("_"))


def cfg(*overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides))


GENERATIVE = {"vae": ["loss=vae"], "latent_diffusion": ["loss=diffusion", "model.allow_untrained_vae=true"]}


@pytest.mark.parametrize("model", names("model"))
def test_every_model_builds_and_forwards_at_32px(model):
    if model in GENERATIVE:  # image-text data; one training step gives a finite, differentiable loss
        c = cfg(f"model={model}", *GENERATIVE[model], "data=phantom_multimodal", "data.image_size=[32,32]")
        task = instantiate(c.model, loss=instantiate(c.loss), _convert_="all")
        batch = {"image": torch.rand(2, 3, 32, 32) * 2 - 1, "text": ["chest X-ray: no opacity", "brain MRI: no lesion"],
                 "modality": torch.tensor([0, 2])}
        if model == "vae":
            assert task(batch["image"]).shape == (2, 3, 32, 32)
        loss = task.training_step(batch, 0)
        loss.backward()
        assert loss.ndim == 0 and torch.isfinite(loss)
        return
    if model in ("ddpm_anomaly", "ae_anomaly"):  # trained on real images only: one step, then a residual map
        exp = "safegen" if model == "ddpm_anomaly" else "safegen_ae"
        c = cfg(f"experiment={exp}", "data.image_size=[32,32]")
        task = instantiate(c.model, loss=instantiate(c.loss), _convert_="all")
        x = torch.rand(2, 1, 32, 32) * 2 - 1
        loss = task.training_step({"image": x}, 0)
        loss.backward()
        assert loss.ndim == 0 and torch.isfinite(loss)
        res, info = task.residuals(x)
        evals = c.model.reconstruction.k * c.model.reconstruction.r if model == "ddpm_anomaly" else 1
        assert res.shape == (2, 32, 32) and info["evaluations_per_image"] == evals
        assert task(x).shape == x.shape  # the differentiable residual the anomaly_score XAI target explains
        return
    cls = "classifier" in model
    data = ["data=phantom_cxr", "loss=ce"] if cls else []
    c = cfg(f"model={model}", *data, "data.image_size=[32,32]")
    task = instantiate(c.model, loss=instantiate(c.loss), _convert_="all")
    out = task.eval().predict_step({"image": torch.rand(2, c.data.channels, 32, 32)})
    if cls:
        assert out["prob"].shape == (2, 2) and out["member_logits"].shape[1:] == (2, 2)
    else:
        assert {"prob", "mask_pred"} <= set(out) and out["prob"].shape[-2:] == (32, 32)


CLASSIFICATION_LOSSES = {"ce", "focal"}


@pytest.mark.parametrize("loss", names("loss"))
def test_every_loss_is_differentiable(loss):
    fn = instantiate(cfg(f"loss={loss}").loss)
    if loss == "vae":  # reconstruction, image, KL per image
        rec = torch.randn(2, 3, 8, 8, requires_grad=True)
        value, parts = fn(rec, torch.rand(2, 3, 8, 8), torch.rand(2))
        value.backward()
        assert value.ndim == 0 and rec.grad is not None and set(parts) == {"rec", "kl"}
        return
    if loss in CLASSIFICATION_LOSSES:  # logits B x C, integer labels B
        logits = torch.randn(4, 2, requires_grad=True)
        value = fn(logits, torch.tensor([0, 1, 1, 0]))
    else:  # segmentation: logits B x 1 x H x W, binary masks
        logits = torch.randn(2, 1, 8, 8, requires_grad=True)
        value = fn(logits, (torch.rand(2, 1, 8, 8) > 0.5).float())
    value.backward()
    assert value.ndim == 0 and logits.grad is not None


@pytest.mark.parametrize("preset", names("data/augment"))
def test_every_augment_preset_builds(preset):
    dm = instantiate(cfg(f"data/augment={preset}", "data.source.n_images=4", "data.source.size=32").data)
    assert dm.augment is not None


@pytest.mark.parametrize("experiment", names("experiment"))
def test_every_experiment_composes(experiment, tmp_path):
    c = cfg(f"experiment={experiment}", f"data.root={tmp_path}" if "glassbox_" in experiment and "ph2" not in experiment else "seed=1")
    if c.get("pipeline"):  # a study of several runs: its stages are other experiments
        loop = instantiate(c.pipeline, _convert_="all")
        assert type(loop).__name__ == "QualityLoop" and c.task_name == "quality_loop"
        for stage in ("base_vae", "base"):
            assert any(o.startswith("experiment=") for o in loop.overrides[stage])
        return
    task = ("ClassificationTask" if experiment.startswith(("tmv_", "minim_selector", "safegen_detector", "audit_"))
            else "SegmentationTask")
    if experiment.startswith("minim") and task != "ClassificationTask":
        task = "AutoencoderTask" if experiment.endswith("_vae") else "GenerationTask"
    if experiment.startswith("safegen") and task != "ClassificationTask":
        task = "AnomalyTask"
    assert c.model._target_.endswith(task)
    instantiate(c.model.unet if task == "GenerationTask" else c.model.net, _convert_="all")  # sizes checked here


@pytest.mark.parametrize("audit", names("audit"))
def test_every_audit_config_composes_with_its_real_data(audit):
    """evaluate.py audit=<name>: the audit's real images instantiate, and its classifier lists exist per finding."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        c = compose("evaluate", overrides=[f"audit={audit}"])
    a = c.audit
    assert {a.finding, a.hallucinated} <= set(a.classifiers) and a.folder
    dm = instantiate(a.real.data)
    assert dm.num_classes == 2 and set(a.real.findings) == {a.finding, a.hallucinated}
    # its prompt set builds: the templates name exactly its declared attributes (a dict inherited from _base
    # would be merged into the audit's own, adding groups its template never names)
    from omegaconf import OmegaConf

    from medtrust.audit.prompts import build_prompt_set

    prompts = build_prompt_set(OmegaConf.to_container(a.prompts, resolve=True))
    assert set(a.prompts.attributes) <= set(prompts.columns) and len(prompts) > 0


def test_default_config_is_the_phantom_segmenter():
    c = cfg()
    assert c.data.source._target_.endswith("PhantomDermSource") and c.loss._target_ == "monai.losses.DiceLoss"
    assert c.task_name == "segmentation" and c.optimized_metric == "val/seg/dice"
    assert Path(c.paths.root_dir) == PROJECT_ROOT


@pytest.mark.parametrize("data", names("data"))
def test_every_data_config_instantiates(data, tmp_path):
    required = {"csv": "data.manifest", "chexpert": "data.manifest", "text_csv": "data.manifest", "isic2018": "data.root", "folder": "data.root",
                "nih_chestxray14": "data.root", "medmnist": "data.path", "ratings": "data.manifest", "generated": "data.root",
                "volumes": "data.root"}
    extra = [f"{required[data]}={tmp_path}"] if data in required else []
    dm = instantiate(cfg(f"data={data}", *extra).data)
    assert dm.channels in (1, 3) and hasattr(dm.source, "records")


@pytest.mark.parametrize("model", names("model"))
def test_model_config_chooses_its_tasks_evaluation_and_callbacks(model):
    """The model config's defaults select conf/evaluation/<task>.yaml and the task's callbacks; the
    task class names the same evaluation file (used when a library caller passes no config)."""
    from hydra.utils import get_class
    from omegaconf import OmegaConf

    c = cfg(f"model={model}")
    task_cls = get_class(c.model._target_)
    own = OmegaConf.load(CONF / "evaluation" / f"{task_cls.evaluation_config}.yaml")
    assert set(c.evaluation) == set(own) and "trust" in c.evaluation
    assert {"model_checkpoint", "on_exception"} <= set(c.callbacks)
    own_callbacks = {"AutoencoderTask": set(), "GenerationTask": {"samples"}, "AnomalyTask": set(),
                     "AutoencoderAnomalyTask": set()}.get(
        task_cls.__name__, {"calibration"})
    assert own_callbacks <= set(c.callbacks)


def test_evaluation_config_is_the_yaml_file_and_refuses_unknown_keys():
    from medtrust.evaluation.config import evaluation_config

    assert evaluation_config("segmentation").calibration_bins == 15
    assert evaluation_config("segmentation", {"bootstrap": 0}).bootstrap == 0
    with pytest.raises(KeyError, match="bootstrapp"):
        evaluation_config("classification", {"bootstrapp": 0})
