"""A run folder's config may name only trusted ``_target_``s: real configs pass, hostile ones are refused."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from medtrust.runs.resolvers import PROJECT_ROOT
from medtrust.runs.rundir import check_run_dir
from medtrust.runs.security import (
    TargetPolicy,
    UnsafeTargetError,
    check_targets,
    config_tree_targets,
    default_policy,
)

CONF = PROJECT_ROOT / "conf"
TOY = "tests.some.Toy"


def write_run_folder(root: Path, config: dict[str, Any]) -> Path:
    """A minimal fake run folder (``run.json`` + ``.hydra/config.yaml``) holding ``config``; the loader's
    end-to-end tests reuse it with a hostile config."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "run.json").write_text(json.dumps({"created": "2026-01-01T00:00:00", "kind": "train"}))
    (root / ".hydra").mkdir(exist_ok=True)
    (root / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    return root


def hostile_config(target: Any = "torch.load") -> dict[str, Any]:
    """A run config whose ``model.net`` would run a pickle payload (or ``target``) when instantiated."""
    return {"task_name": "segmentation",
            "model": {"_target_": "medtrust.tasks.segmentation.SegmentationTask",
                      "net": {"_target_": target, "f": "evil.pkl", "weights_only": False}}}


def refused(cfg: Any, policy: TargetPolicy | None = None) -> str:
    with pytest.raises(UnsafeTargetError) as err:
        check_targets(cfg, "run/.hydra/config.yaml", policy or default_policy())
    return str(err.value)


def test_every_target_of_the_project_conf_is_allowed():
    policy = default_policy()
    assert {"medtrust.tasks.segmentation.SegmentationTask", "torch.optim.AdamW"} <= policy.exact
    # conf/hydra/ is Hydra's own config: saved to .hydra/hydra.yaml, never in a run's config.yaml,
    # never instantiated by evaluate/explain (it names medtrust.runs.*, which is deny-listed).
    files = [f for f in CONF.rglob("*.yaml") if "hydra" not in f.relative_to(CONF).parts[:1]]
    targets = config_tree_targets(files)
    assert len(targets) > 20 and targets <= policy.exact
    assert not [t for t in targets if not policy.allows(t)]


def _compose(*overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides))


@pytest.mark.parametrize("overrides", [
    (), ("model=resnet_classifier", "data=phantom_cxr", "loss=ce"),
    *[(f"experiment={p.stem}",) for p in sorted((CONF / "experiment").glob("*.yaml"))],
], ids=str)
def test_composed_train_configs_pass(overrides):
    check_targets(_compose(*overrides), "train.yaml", default_policy())  # what .hydra/config.yaml holds


@pytest.mark.parametrize("target", [
    "torch.load", "builtins.print", "pathlib.Path.touch", "numpy.load", "os.system", "pickle.loads",
    "medtrust.utils.io.atomic_write_bytes", "${oc.env:X}", "torch..load", " torch.nn.Identity",
    "subprocess.run", "torch.nn.init.normal_", "torch.nn.functional.relu", "notamodule_xyz.Evil",
])
def test_hostile_target_is_refused(target):
    msg = refused(OmegaConf.create(hostile_config(target)))
    assert "model.net._target_" in msg and target in msg and "run/.hydra/config.yaml" in msg
    assert "hydra.searchpath" in msg and "security.allow_targets" in msg
    assert "notamodule_xyz" not in sys.modules  # never imported to decide


def test_target_in_a_list_and_non_string_target():
    msg = refused({"model": {"blocks": [{"_target_": "torch.nn.Identity"}, {"_target_": "builtins.exec"}]}})
    assert "model.blocks[1]._target_" in msg and "builtins.exec" in msg and "blocks[0]" not in msg
    assert "model.x._target_" in refused({"model": {"x": {"_target_": {"a": 1}}}})
    assert "an interpolation" in refused({"model": {"net": {"_target_": "${oc.env:X}"}}})
    assert "_args_[0]._target_" in refused({"m": {"_target_": "torch.nn.Sequential",
                                                  "_args_": [{"_target_": "os.system"}]}})


@pytest.mark.parametrize("value", [
    "${oc.create:{_target_: builtins.print, _args_: [pwned]}}",
    "${oc.decode:${s}}",
    "${${a}.${b}:${s}}",
    "${oc.select:nope,{_target_: builtins.print}}",
])
def test_interpolation_that_could_build_a_target_is_refused(value):
    cfg = OmegaConf.create({"a": "oc", "b": "create", "s": "{_target_: builtins.print}", "model": {"net": value}})
    assert "model.net=" in refused(cfg)


def test_plain_interpolations_pass():
    cfg = OmegaConf.create({"model": {"_target_": "torch.nn.Identity"}, "t": "${task_from_target:${model._target_}}",
                            "o": "${hydra:runtime.output_dir}", "e": "${oc.env:HOME,/tmp}", "x": "\\${x}",
                            "l": "${oc.select:nope,[1, 2]}", "r": "${model}"})
    check_targets(cfg, "x.yaml", default_policy())


@pytest.mark.parametrize("target", [
    "torch.optim.SGD", "torch.optim.lr_scheduler.StepLR", "torch.optim.lr_scheduler.LambdaLR", "torch.nn.Identity",
    "torch.nn.modules.linear.Linear", "monai.losses.DiceCELoss", "monai.networks.nets.UNet",
    "lightning.pytorch.callbacks.LearningRateMonitor", "medtrust.losses.focal.FocalCrossEntropy",
])
def test_family_class_is_allowed(target):
    assert TargetPolicy().allows(target)  # no exact targets: allowed by its family alone
    assert default_policy().allows(target)


@pytest.mark.parametrize("target", [
    "torch.nn.init.normal_", "torch.nn.functional.relu", "torch.nn.Parameter", "torch.nn.nonexistent_mod.X",
    "torch.nn.Module.load_state_dict", "torch.optim.lr_scheduler.StepLR.step", "medtrust.nets.unet.torch",
])
def test_family_non_class_or_wrong_base_is_refused(target):
    assert not default_policy().allows(target)


def test_deny_list_beats_exact_and_extras():
    assert not TargetPolicy(exact=frozenset({"builtins.print", "torch.load"})).allows("builtins.print")
    with pytest.raises(ValueError, match="deny-listed"):
        default_policy(extra=["torch.load"])


def test_searchpath_dir_allows_its_targets_only_when_passed(tmp_path):
    conf = tmp_path / "conf"
    (conf / "model").mkdir(parents=True)
    (conf / "model" / "toy.yaml").write_text(f"net:\n  blocks:\n    - _target_: {TOY}\n      k: 1\n")
    cfg = OmegaConf.create(hostile_config(TOY))
    assert TOY in refused(cfg)
    for entry in (f"file://{conf}", str(conf)):
        assert default_policy(searchpath=[entry]).allows(TOY)
        check_targets(cfg, "x.yaml", default_policy(searchpath=[entry]))
    assert not default_policy(searchpath=[f"file://{tmp_path / 'other'}"]).allows(TOY)


def test_explicit_extra_target_is_allowed():
    assert not default_policy().allows(TOY)
    check_targets(hostile_config(TOY), "x.yaml", default_policy(extra=[TOY]))
    assert default_policy(extra=[TOY]) is default_policy(extra=[TOY])  # cached


def test_fake_run_folder_with_hostile_config_is_refused(tmp_path):
    run = check_run_dir(write_run_folder(tmp_path / "run", hostile_config()))
    msg = refused(OmegaConf.load(run / ".hydra" / "config.yaml"))
    assert "model.net._target_='torch.load'" in msg
