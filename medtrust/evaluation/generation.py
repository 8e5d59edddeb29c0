"""Evaluation of a generator run: what it was asked for, what it made, judged by networks trained
on real images.

Post-fit (:func:`fit_evaluators`, after training, on REAL images only): the evaluator CNN
(modality + finding heads, and the feature network of FID / KID / memorisation) and the
image–text alignment model are trained on the train split and their accuracy is measured on val;
both go to ``<run>/evaluator/`` (``evaluator.pt``, weights only, and ``evaluator.json``).

Evaluation of a split (:func:`evaluate_generator`): prompts are the texts of that split's records
(so what each prompt asked for -- modality, finding, side, sex, age -- is known), each sampled
``samples_per_prompt`` times with fixed seeds, with the run's guidance and (for the ablation)
without it. Reported per modality and overall in ``metrics/<split>_generation.json`` (and
``metrics/generation.json`` for the report's split): FID and KID against the split's real images,
MS-SSIM between repeated samples of a prompt, alignment with the prompt (with vs without guidance,
matching vs shuffled prompts), modality and finding accuracy against the prompt, and the share of
near copies of training images.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from medtrust.evaluation.config import evaluation_config, to_plain
from medtrust.generation.evaluator import (EvaluatorNet, FeatureModule, accuracy_by_group, head_accuracy, predict,
                                          train_evaluator_checked)
from medtrust.metrics import generation as gm
from medtrust.tasks.base import EvalResult, RunModel
from medtrust.utils.io import load_tensors, read_json, write_csv, write_json
from medtrust.utils.logging import get_logger

log = get_logger(__name__)

EVALUATOR_DIR = "evaluator"


# -- real images of a split --------------------------------------------------------------------
def split_items(dm: Any, split: str) -> dict[str, Any]:
    """Display images ([0, 1]), texts, modalities, labels and records of ``split``, in record order."""
    ds = dm.dataset(split)
    recs = ds.records
    imgs, texts, mods, labels = [], [], [], []
    for i in range(len(ds)):
        it = ds[i]
        imgs.append(it["image"])
        texts.append(str(it.get("text", "")))
        mods.append(int(it.get("modality", 0)))
        labels.append(it.get("label"))
    x = dm.to_display(torch.stack(imgs)).clamp(0, 1) if imgs else torch.empty(0)
    return {"images": x, "texts": texts, "modality": torch.tensor(mods), "records": list(recs),
            "label": None if any(v is None for v in labels) else torch.tensor([int(v) for v in labels])}


def _targets(items: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    t = {"modality": items["modality"]}
    if items["label"] is not None:
        t["finding"] = items["label"]
    return t


# -- post-fit ------------------------------------------------------------------------------------
def fit_evaluators(task: Any, dm: Any, run_dir: Path, evaluation: Any = None) -> dict[str, Any]:
    """Train the evaluator and the alignment model on real train images; measure them on val."""
    ev = evaluation if evaluation is not None else evaluation_config("generation")
    ec, ac = ev.evaluator, ev.alignment
    folder = run_dir / EVALUATOR_DIR
    if ec.get("from_run"):
        other = load_evaluators(Path(str(ec.from_run)))
        if other is None:
            raise FileNotFoundError(f"evaluation.evaluator.from_run={ec.from_run}: no {EVALUATOR_DIR}/evaluator.pt there")
        if other["modalities"] != list(task.modalities):
            raise ValueError(f"evaluation.evaluator.from_run={ec.from_run}: its modalities {other['modalities']} differ "
                             f"from this run's {list(task.modalities)}")
        return other
    train = split_items(dm, "train")
    val = split_items(dm, "val")
    net, attempts = train_evaluator_checked(
        train["images"], _targets(train), train["modality"], float(ec.get("min_train_accuracy", 0.9)),
        int(ec.get("attempts", 3)), epochs=int(ec.epochs), batch_size=int(ec.batch_size), lr=float(ec.lr),
        width=int(ec.width), seed=int(ec.seed), head_grid=int(ec.get("head_grid", 2)))
    names = list(task.modalities)
    for a in attempts:  # group index -> modality name
        a["group"] = names[a["group"]] if isinstance(a["group"], int) and a["group"] < len(names) else a["group"]
    pv = predict(net, val["images"])
    acc = {k: head_accuracy(pv[k], v) for k, v in _targets(val).items()}
    per_mod = {names[m]: v for m, v in accuracy_by_group(pv, _targets(val), val["modality"]).items() if m < len(names)}
    _, _, pooled_train = task.encode_text(train["texts"])
    _, _, pooled_val = task.encode_text(val["texts"])
    align = gm.train_alignment_model(train["images"], pooled_train.cpu(), epochs=int(ac.epochs),
                                     batch_size=int(ac.batch_size), lr=float(ac.lr), seed=int(ec.seed))
    real_match = gm.alignment_scores(align, val["images"], pooled_val.cpu())
    perm = _derangement(len(val["texts"]), int(ec.seed))
    real_shuffled = gm.alignment_scores(align, val["images"], pooled_val.cpu()[perm])
    info = {"fitted_on": f"train ({len(train['images'])} real images)", "reported_on": f"val ({len(val['images'])} real images)",
            "modalities": list(task.modalities), "heads": dict(net.head_sizes), "width": int(ec.width),
            "head_grid": int(net.head_grid), "epochs": int(ec.epochs),
            "seed": int(next(a["seed"] for a in attempts if a["kept"])),
            "attempts": attempts, "min_train_accuracy": float(ec.get("min_train_accuracy", 0.9)),
            "feature_dim": int(net.feature_dim), "accuracy_real_val": acc, "accuracy_real_val_modalities": per_mod,
            "alignment_real_val": {"matching": float(np.mean(real_match)), "shuffled": float(np.mean(real_shuffled))},
            "alignment_config": align.config() if hasattr(align, "config") else {},
            "text_encoder": task.text_encoder.name,
            "feature_network": f"medtrust evaluator CNN (width {int(ec.width)}) trained on the real train images of this "
                               "run's data; FID/KID in its feature space are not comparable to published (Inception) FID"}
    folder.mkdir(parents=True, exist_ok=True)
    from medtrust.utils.io import atomic_write_bytes
    import io

    buf = io.BytesIO()
    torch.save({"evaluator": net.state_dict(), "alignment": align.state_dict()}, buf)
    atomic_write_bytes(folder / "evaluator.pt", buf.getvalue())
    write_json(folder / "evaluator.json", info)
    log.info(f"evaluator on real val images: {acc}; alignment matching {info['alignment_real_val']}")
    return {**info, "_evaluator": net, "_alignment": align}


def _derangement(n: int, seed: int) -> np.ndarray:
    """A permutation with no fixed point (each image paired with another's prompt)."""
    if n < 2:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    return np.roll(perm, 1)[np.argsort(perm)]


def load_evaluators(run_dir: Path) -> dict[str, Any] | None:
    """What :func:`fit_evaluators` wrote into ``run_dir`` (weights loaded with ``weights_only=True``)."""
    folder = Path(run_dir) / EVALUATOR_DIR
    if not (folder / "evaluator.json").is_file() or not (folder / "evaluator.pt").is_file():
        return None
    info = read_json(folder / "evaluator.json")
    state = load_tensors(folder / "evaluator.pt", "evaluator.pt")
    net = EvaluatorNet(info["heads"], 3, int(info["width"]), int(info.get("head_grid", 1)))
    net.load_state_dict(state["evaluator"])
    align = gm.AlignmentModel(**info.get("alignment_config", {}))
    align.load_state_dict(state["alignment"])
    return {**info, "_evaluator": net.eval(), "_alignment": align.eval()}


def public(fitted: Mapping[str, Any] | None) -> dict[str, Any]:
    """``fitted`` without the networks (for JSON)."""
    return {k: v for k, v in dict(fitted or {}).items() if not k.startswith("_")}


# -- evaluation -----------------------------------------------------------------------------------
def choose_prompts(items: Mapping[str, Any], modalities: Sequence[str], per_modality: int, seed: int) -> list[int]:
    """Indices of up to ``per_modality`` records of each modality (a seeded choice)."""
    rng = np.random.default_rng(seed)
    chosen = []
    mods = items["modality"].numpy()
    for m in range(len(modalities)):
        idx = np.flatnonzero(mods == m)
        if len(idx):
            chosen += sorted(rng.choice(idx, size=min(per_modality, len(idx)), replace=False).tolist())
    return chosen


def evaluate_generator(task: Any, dm: Any, split: str, out_dir: Path, evaluation: Any = None,
                       extra: Mapping[str, Any] | None = None, fitted: Mapping[str, Any] | None = None) -> EvalResult:
    """Generate for the prompts of ``split`` and measure; see the module docstring."""
    ev = evaluation if evaluation is not None else evaluation_config("generation")
    if not fitted or "_evaluator" not in fitted:
        raise ValueError("the generator's evaluator is missing (post_fit writes <run>/evaluator/); evaluate a finished run")
    net, align = fitted["_evaluator"], fitted["_alignment"]
    items = split_items(dm, split)
    chosen = choose_prompts(items, task.modalities, int(ev.prompts_per_modality), int(ev.seed))
    k = max(1, int(ev.samples_per_prompt))
    prompts = [items["texts"][i] for i in chosen for _ in range(k)]
    mods = [int(items["modality"][i]) for i in chosen for _ in range(k)]
    seeds = [int(ev.seed) + j for j in range(len(prompts))]
    sampling = task.sampling_record(**to_plain(ev.sampling))
    gen_kw = {key: sampling[key] for key in ("sampler", "steps", "guidance", "guidance_schedule", "min_guidance",
                                             "negative_prompt")}
    fake = task.generate(prompts, mods, seeds, **gen_kw)
    unguided = None
    if bool(ev.guidance_ablation) and sampling["guidance"] != 1.0:
        unguided = task.generate(prompts, mods, seeds, **{**gen_kw, "guidance": 1.0})
    pf = predict(net, fake)
    asked = {"modality": torch.tensor(mods)}
    if "finding" in net.heads and items["label"] is not None:
        asked["finding"] = torch.tensor([int(items["label"][i]) for i in chosen for _ in range(k)])
    _, _, pooled = task.encode_text(prompts)
    pooled = pooled.cpu()
    align_fake = gm.alignment_scores(align, fake, pooled)
    align_shuffled = gm.alignment_scores(align, fake, pooled[_derangement(len(prompts), int(ev.seed))])
    align_unguided = gm.alignment_scores(align, unguided, pooled) if unguided is not None else None
    # memorisation against the train images
    train = split_items(dm, "train")
    mt = int(ev.memorisation.max_train_images)
    train_imgs = train["images"][:mt]
    pt = predict(net, train_imgs)
    copy_cal = copy_thresholds(task, dm, split, items, net, train_imgs, pt["features"], ev.memorisation)
    if copy_cal is None:
        cos_thr, ssim_thr = float(ev.memorisation.cos_threshold), float(ev.memorisation.ssim_threshold)
    else:
        cos_thr, ssim_thr = (torch.from_numpy(a) for a in _thresholds_for(copy_cal, [task.modalities[m] for m in mods]))
    mem = gm.nearest_training(pf["features"], pt["features"], fake, train_imgs, cos_threshold=cos_thr,
                              ssim_threshold=ssim_thr, topk_ssim=int(ev.memorisation.topk))
    feature = FeatureModule(net)
    real_feats = items["images"]
    per_image = pd.DataFrame({"prompt": prompts, "modality": [task.modalities[m] for m in mods], "seed": seeds,
                              "prompt_record": [items["records"][i]["id"] for i in chosen for _ in range(k)],
                              "modality_pred": [task.modalities[int(m)] for m in pf["modality"]],
                              "modality_correct": (pf["modality"] == asked["modality"]).numpy().astype(float),
                              "alignment": align_fake, "alignment_shuffled": align_shuffled})
    if "finding" in asked:
        per_image["finding_asked"] = asked["finding"].numpy()
        per_image["finding_pred"] = pf["finding"].numpy()
        per_image["finding_correct"] = (pf["finding"] == asked["finding"]).numpy().astype(float)
    if align_unguided is not None:
        per_image["alignment_unguided"] = align_unguided
    mem_rows = pd.DataFrame(mem["rows"])
    per_image["nearest_train_cosine"] = mem_rows["cosine"].to_numpy()
    per_image["nearest_train_ssim"] = mem_rows["ssim"].to_numpy()
    per_image["near_copy"] = mem_rows["near_copy"].to_numpy().astype(float)
    attrs = pd.DataFrame([dict(items["records"][i].get("attrs", {})) for i in chosen for _ in range(k)])
    for c in attrs.columns:
        if c not in per_image:
            per_image[f"asked_{c}"] = attrs[c].astype(str).to_numpy()
    n_boot = int(ev.bootstrap)

    def block(sel: np.ndarray) -> dict[str, Any]:
        idx = np.flatnonzero(sel)
        real_m = _real_of(items, [task.modalities.index(m) for m in set(per_image["modality"].iloc[idx])])
        fk = gm.fid_kid(items["images"][real_m], fake[idx], feature, int(ev.kid_subset_size))
        groups = [fake[idx][j * k:(j + 1) * k] for j in range(len(idx) // k)] if k >= 2 else []
        div = gm.ms_ssim_diversity(groups) if groups else {"ms_ssim": None, "reason": "samples_per_prompt < 2"}
        out = {"n_images": int(len(idx)), "n_real": int(len(real_m)), "fid": fk.get("fid"), "kid": fk.get("kid_mean"),
               "kid_std": fk.get("kid_std"), "ms_ssim": div.get("ms_ssim"), "ms_ssim_ci": div.get("ci95"),
               **_acc(per_image, idx, "modality_correct", "modality_accuracy", n_boot),
               **_acc(per_image, idx, "finding_correct", "finding_accuracy", n_boot),
               **_share(per_image, idx, n_boot)}
        a = per_image["alignment"].to_numpy()[idx]
        out["alignment"] = float(a.mean())
        out["alignment_vs_shuffled"] = gm.alignment_contrast(a, per_image["alignment_shuffled"].to_numpy()[idx])
        if "alignment_unguided" in per_image:
            out["alignment_unguided"] = float(per_image["alignment_unguided"].to_numpy()[idx].mean())
            out["alignment_guided_vs_unguided"] = gm.alignment_contrast(a, per_image["alignment_unguided"].to_numpy()[idx])
        notes = [n for n in (fk.get("reason"), div.get("reason")) if n]
        if notes:
            out["notes"] = notes
        return out

    all_sel = np.ones(len(per_image), bool)
    result = {"overall": block(all_sel),
              "modalities": {m: block((per_image["modality"] == m).to_numpy()) for m in task.modalities
                             if (per_image["modality"] == m).any()}}
    out_dir = Path(out_dir)
    table = write_csv(out_dir / "metrics" / f"{split}_generated.csv", per_image)
    figures = _figures(task, per_image, fake, train_imgs, mem_rows, out_dir / "figures" / split, int(ev.n_show), k)
    ov = result["overall"]
    metrics: dict[str, Any] = {
        "split": split, "task": task.task_name, "metric_group": task.metric_group, "metric_groups": ["gen"],
        "n_images": int(len(per_image)), "n_prompts": len(chosen), "samples_per_prompt": k,
        "gen": {key: ov[key] for key in ("fid", "kid", "ms_ssim", "alignment", "alignment_unguided", "modality_accuracy",
                                         "finding_accuracy", "memorised_share") if ov.get(key) is not None},
        "generation": result, "memorisation": copy_cal or {"thresholds": "fixed", "cosine": float(ev.memorisation.cos_threshold),
                                                          "ssim": float(ev.memorisation.ssim_threshold)},
        "sampling": sampling, "prompts_from": f"{split} records ({len(chosen)} prompts)",
        "evaluator": public(fitted), "data": dm.summary(), "tables": {"generated": str(table)},
        "trust_thresholds": to_plain(ev.trust), **dict(extra or {})}
    attr_cols = [c for c in per_image.columns if c.startswith("asked_") and c not in ("asked_modality",)]
    if attr_cols:
        from medtrust.metrics.subgroups import segmentation_subgroups

        cols = [c for c in ("modality_correct", "finding_correct") if c in per_image]
        metrics["subgroups"] = segmentation_subgroups(per_image.rename(columns={c: c[6:] for c in attr_cols}),
                                                      [c[6:] for c in attr_cols if c[6:] not in ("text", "finding",
                                                                                                   "side", "size")],
                                                      cols, int(ev.subgroups.min_group_size), int(ev.subgroups.bootstrap))
    summary = {"split": split, **result, "memorisation": metrics["memorisation"], "sampling": sampling,
               "feature_network": public(fitted).get("feature_network")}
    write_json(out_dir / "metrics" / f"{split}_generation.json", summary)
    if split == "test" or not dm.has_split("test"):
        write_json(out_dir / "metrics" / "generation.json", summary)
    write_json(out_dir / "metrics" / f"{split}.json", metrics)
    return EvalResult(split, task.task_name, task.metric_group, metrics, {"generated": table}, figures)


def copy_thresholds(task: Any, dm: Any, split: str, items: Mapping[str, Any], net: EvaluatorNet,
                    train_imgs: torch.Tensor, train_feats: torch.Tensor, mc: Any) -> dict[str, Any] | None:
    """Near-copy thresholds per modality fitted on the real images of ``mc.calibrate_on`` (a split
    held out from training) against the training images; ``None`` when ``calibrate_on`` is null
    (the fixed ``cos_threshold`` / ``ssim_threshold`` then apply).

    Also the share of real images flagged: on the calibration images themselves (in-sample, about
    ``2 (1 - quantile)`` by construction) and, when another split is evaluated, on its real images
    (out-of-sample: the null rate a generator that never copies would show).
    """
    cal_split = mc.get("calibrate_on")
    if not cal_split:
        return None
    cal_split = str(cal_split)
    if cal_split == "train":
        raise ValueError("evaluation.memorisation.calibrate_on=train: the thresholds must come from real images held "
                         "out from the generator's training set (val)")
    if not dm.has_split(cal_split):
        raise ValueError(f"evaluation.memorisation.calibrate_on={cal_split}: the data has no such split")
    cal_items = items if cal_split == split else split_items(dm, cal_split)
    topk = int(mc.topk)

    def real_rows(it: Mapping[str, Any]) -> pd.DataFrame:
        r = gm.nearest_training(predict(net, it["images"])["features"], train_feats, it["images"], train_imgs,
                                cos_threshold=float("inf"), ssim_threshold=float("inf"), topk_ssim=topk)
        df = pd.DataFrame(r["rows"])
        df["modality"] = [task.modalities[int(m)] for m in it["modality"]]
        return df

    rows = real_rows(cal_items)
    cal = gm.calibrate_copy_thresholds(rows["cosine"], rows["ssim"], rows["modality"], quantile=float(mc.quantile),
                                       min_images=int(mc.min_images))
    for m in task.modalities:  # a modality without real calibration images takes the pooled thresholds
        cal["groups"].setdefault(m, {**cal["pooled"], "n": 0, "pooled": True})

    def flagged(df: pd.DataFrame) -> np.ndarray:
        cos_t, ssim_t = _thresholds_for(cal, df["modality"])
        return (df["cosine"].to_numpy() >= cos_t) | (df["ssim"].to_numpy() >= ssim_t)

    cal.update(fitted_on=f"{cal_split} ({len(rows)} real images, each against its nearest of {len(train_imgs)} train images)",
               real_flag_rate_in_sample=float(flagged(rows).mean()))
    if cal_split != split:
        other = real_rows(items)
        share = gm.share_with_ci(flagged(other), n_boot=200, seed=0)
        cal["real_flag_rate"] = {"split": split, "value": share["value"], "ci95": share["ci95"], "n": share["n"]}
    return cal


def _thresholds_for(cal: Mapping[str, Any], modalities: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per-image (cosine, SSIM) near-copy thresholds of :func:`copy_thresholds` for their modalities."""
    t = [cal["groups"].get(m, cal["pooled"]) for m in modalities]
    return (np.array([x["cosine"] for x in t], dtype=np.float64), np.array([x["ssim"] for x in t], dtype=np.float64))


def _real_of(items: Mapping[str, Any], mods: Sequence[int]) -> np.ndarray:
    return np.flatnonzero(np.isin(items["modality"].numpy(), list(mods)))


def _acc(df: pd.DataFrame, idx: np.ndarray, col: str, name: str, n_boot: int) -> dict[str, Any]:
    if col not in df:
        return {name: None}
    r = gm.attribute_accuracy(df[col].to_numpy()[idx].astype(bool), np.ones(len(idx), bool), n_boot=n_boot)
    return {name: r["accuracy"], f"{name}_ci": r.get("ci95")}


def _share(df: pd.DataFrame, idx: np.ndarray, n_boot: int) -> dict[str, Any]:
    v = df["near_copy"].to_numpy()[idx]
    from medtrust.metrics.stats import bootstrap_mean_ci

    return {"memorised_share": float(v.mean()) if len(v) else None,
            "memorised_share_ci": bootstrap_mean_ci(v, n_boot=n_boot) if len(v) > 1 and v.std() > 0 else
            ((float(v.mean()), float(v.mean())) if len(v) else None)}


def _figures(task: Any, per: pd.DataFrame, fake: torch.Tensor, train_imgs: torch.Tensor, mem: pd.DataFrame,
             folder: Path, n_show: int, k: int) -> list[Path]:
    from medtrust.report.figures import plot_image_grid

    out = []
    groups: dict[str, list] = {}
    for i, row in per.iterrows():
        g = groups.setdefault(str(row["modality"]), [])
        if len(g) < n_show:
            g.append((fake[i].permute(1, 2, 0).numpy(), str(row["prompt"])[:38]))
    out.append(plot_image_grid(groups, folder / "samples.png", "generated samples per modality (prompts of the split)"))
    order = mem.sort_values("cosine", ascending=False).head(n_show)
    pairs = {"generated": [(fake[int(r.fake)].permute(1, 2, 0).numpy(), f"cos {r.cosine:.3f} ssim {r.ssim:.2f}")
                           for r in order.itertuples()],
             "nearest train": [(train_imgs[int(r.nearest)].permute(1, 2, 0).numpy(), f"train #{int(r.nearest)}")
                               for r in order.itertuples()]}
    out.append(plot_image_grid(pairs, folder / "closest_pairs.png", "memorisation: generated images closest to training images"))
    return out


def compare_generators(runs: Sequence[RunModel], dm: Any, split: str, out_dir: Path, evaluation: Any = None) -> list[dict[str, Any]]:
    """One row per run: its validation denoising loss on this data (fixed noise and timesteps) and
    the overall figures of its own ``metrics/generation.json``."""
    rows = []
    for r in runs:
        losses = []
        for bi, batch in enumerate(dm.dataloader(split)):
            b = len(batch["image"])
            with torch.no_grad():
                for t in r.task.val_timesteps:
                    g = torch.Generator().manual_seed(1000 * bi + t)
                    losses.append(float(r.task._loss(batch, g, torch.full((b,), t), None, r.task.net())))
        own = r.run_dir / "metrics" / "generation.json"
        ov = read_json(own).get("overall", {}) if own.is_file() else {}
        rows.append({"run": r.label, "run_dir": str(r.run_dir), "denoising_loss": float(np.mean(losses)),
                     **{f"own_{k}": ov.get(k) for k in ("fid", "kid", "modality_accuracy", "finding_accuracy",
                                                       "alignment", "memorised_share")}})
    return rows
