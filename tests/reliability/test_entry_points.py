"""The bad-input matrix at the entry points: each script refuses an unknown config key, a value of the wrong
type and bad data with one message naming the key, file or row (no traceback), before any training; the
generator's prompt CSV is checked the same way. Runs in this process (``refused``): a script's own
``__main__``, argument checks, Hydra and error path."""
from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.conftest import TINY, refused
from tests.reliability.matrix import csv_layout, dotdot, mask_values, zero_byte

pytestmark = pytest.mark.integration


def _seg_csv(tmp: Path, corrupt) -> tuple[Path, str]:
    """The matrix's CSV layout with image 0 broken and moved to the test split (every script reads it)."""
    lay = csv_layout(tmp / "seg")
    where = corrupt(lay)
    df = lay.read()
    df["split"] = df["patient_id"].map({"p0": "test", "p1": "val", "p2": "train"})
    lay.write(df)
    return lay.table, where["file"]


def _one_class_val(tmp: Path) -> tuple[Path, str]:
    lay = csv_layout(tmp / "cls")
    df = lay.read()
    df.loc[df["split"] == "val", "label"] = "0"
    lay.write(df)
    return lay.table, "split 'val' holds only class 0"


def _data_cases(tmp: Path) -> dict[str, tuple[list[str], list[str]]]:
    """name -> (data overrides, what the message must name)."""
    out = {}
    for name, corrupt in (("zero_byte_image", zero_byte), ("mask_values", mask_values), ("path_outside_root", dotdot)):
        table, broken = _seg_csv(tmp / name, corrupt)
        named = [str(table), "row 2", "outside the data root"] if name == "path_outside_root" else [broken]
        out[name] = (["data=csv", f"data.manifest={table}", "data.image_size=[16,16]"], named)
    return out


SCRIPT_CASES = [
    # (script, case, overrides (before the data ones), the message must name)
    ("train.py", "unknown_key", [*TINY, "data.imge_size=32"], ["data.imge_size"]),
    ("train.py", "wrong_type", [*TINY, "trainer.max_epochs=abc"], ["trainer.max_epochs", "abc"]),
    ("evaluate.py", "unknown_key", ["run_dir={run}", "splitt=test"], ["splitt"]),
    ("evaluate.py", "wrong_type", ["run_dir={run}", "n_compare=abc"], ["n_compare", "abc"]),
    ("explain.py", "unknown_key", ["run_dir={run}", "n_imagez=2"], ["n_imagez"]),
    ("explain.py", "wrong_type", ["run_dir={run}", "n_images=abc"], ["n_images", "abc"]),
    ("generate.py", "unknown_key", ["run_dir={run}", "nn=3"], ["nn"]),
    ("generate.py", "wrong_type", ["run_dir={run}", "n=abc"], ["n", "abc"]),
    ("evaluate.py", "audit_unknown_key", ["audit=phantom", "audit.prompts.per_cel=3"], ["audit.prompts.per_cel"]),
    ("evaluate.py", "audit_wrong_type", ["audit=phantom", "audit.prompts.per_cell=abc"], ["audit.prompts.per_cell", "abc"]),
]
DATA_CASES = [(script, case) for script in ("train.py", "evaluate.py", "explain.py")
              for case in ("zero_byte_image", "mask_values", "path_outside_root")]


def _check(proc, named: list[str]) -> None:
    err = proc.stderr
    assert proc.returncode != 0
    assert all(n in err for n in named), f"expected {named} in:\n{err[-2000:]}"
    assert "Traceback" not in err, err[-2000:]


@pytest.mark.parametrize("script,case,args,named", SCRIPT_CASES, ids=[f"{s}-{c}" for s, c, _, _ in SCRIPT_CASES])
def test_config_is_refused_by_key(script, case, args, named, tiny_run):
    _check(refused(script, *[a.format(run=tiny_run) for a in args]), named)


@pytest.mark.parametrize("script,case", DATA_CASES, ids=[f"{s}-{c}" for s, c in DATA_CASES])
def test_bad_data_is_refused_by_file_or_row(script, case, tiny_run, tmp_path):
    overrides, named = _data_cases(tmp_path)[case]
    head = ["experiment=tiny", "threads=1"] if script == "train.py" else [f"run_dir={tiny_run}", "split=test"]
    _check(refused(script, *head, *overrides, f"hydra.run.dir={tmp_path / 'out'}"), named)



def test_a_classifier_with_one_class_in_val_is_refused_before_training(tmp_path):
    table, named = _one_class_val(tmp_path)
    out = tmp_path / "run"
    proc = refused("train.py", "experiment=tmv_mc_dropout", "data=csv", f"data.manifest={table}",
                   "data.image_size=[16,16]", "data.channels=1", "data/augment=cxr", "data.normalize.mean=[0.5]",
                   "data.normalize.std=[0.25]", "data.require_mask=false", "data.require_label=true",
                   "data.num_classes=2", "threads=1", f"hydra.run.dir={out}")
    _check(proc, [named, str(table), "the validation AUROC"])
    assert not list(out.glob("checkpoints/*.ckpt")), "refused before training: no checkpoint"


# -- the generator's prompt CSV (generate.py prompts=<csv>), read before any model is built ------------------------
def _prompts(tmp: Path, text: str | bytes) -> Path:
    p = tmp / "prompts.csv"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return p


PROMPT_CASES = {
    "missing_column": ("prompt,modal\nchest X-ray,cxr\n", ["missing column(s) ['modality']"]),
    "semicolon_delimiter": ("prompt;modality\nchest X-ray;cxr\n", ["semicolon-separated", "comma"]),
    "blank_prompt": ("prompt,modality\nchest X-ray,cxr\n,cxr\n", ["row 3", "empty prompt"]),
    "wrong_type": ("prompt,modality,n\nchest X-ray,cxr,two\n", ["row 2", "n"]),
    "long_row": ("prompt,modality\nchest X-ray,cxr,extra\n", ["line 2", "more fields"]),
    "short_row": ("prompt,modality\nchest X-ray,cxr\nchest X-ray\n", ["line 3", "fewer fields"]),
    "empty_file": ("", ["empty"]),
    "no_rows": ("prompt,modality\n", ["no prompt rows"]),
    "not_utf8": (b"prompt,modality\n\xff\xfe chest,cxr\n", ["not UTF-8"]),
}


@pytest.mark.parametrize("case", sorted(PROMPT_CASES))
def test_generator_prompt_csv_is_refused_by_row(case, tmp_path):
    from medtrust.runs.generate import read_prompts

    text, named = PROMPT_CASES[case]
    path = _prompts(tmp_path, text)
    with pytest.raises(ValueError) as err:
        read_prompts(OmegaConf.create({"prompts": str(path), "prompt": None, "modality": None}))
    msg = str(err.value)
    assert str(path) in msg and all(n in msg for n in named), msg


def test_generator_prompt_csv_with_a_bom_is_read(tmp_path):
    from medtrust.runs.generate import read_prompts

    path = _prompts(tmp_path, b"\xef\xbb\xbfprompt,modality\nchest X-ray,cxr\n")
    df = read_prompts(OmegaConf.create({"prompts": str(path), "prompt": None, "modality": None}))
    assert list(df["prompt"]) == ["chest X-ray"] and list(df["modality"]) == ["cxr"]


ENTRY_CASES = len(SCRIPT_CASES) + len(DATA_CASES) + 1 + len(PROMPT_CASES) + 1  # README's count of entry-point cases
