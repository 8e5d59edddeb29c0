"""Figures for run folders (matplotlib, Agg backend; every function writes one PNG and returns its path)."""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

GT_COLOUR, PRED_COLOUR = "#00e000", "#ff2a6d"


DPI_ENV = "MEDTRUST_FIGURE_DPI"


def figure_dpi() -> int:
    """Resolution of every saved figure: 110 dpi, or ``MEDTRUST_FIGURE_DPI`` (e.g. 40 for draft figures;
    the test suite uses it: a tiny run draws ~25 figures, and at 40 dpi each saves in about two thirds of the time).

    Raises:
        ValueError: the variable is not an integer in 20..600.
    """
    raw = os.environ.get(DPI_ENV, "110")
    try:
        dpi = int(raw)
    except ValueError:
        dpi = -1
    if not 20 <= dpi <= 600:
        raise ValueError(f"{DPI_ENV}={raw!r}: expected an integer number of dots per inch in 20..600")
    return dpi


def _save(fig: plt.Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=figure_dpi(), bbox_inches="tight")
    plt.close(fig)
    return path


def _show(ax: plt.Axes, image: np.ndarray) -> None:
    ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray" if image.shape[-1] == 1 else None,
              vmin=0, vmax=1)
    ax.set_xticks([])
    ax.set_yticks([])


def overlay_axes(ax: plt.Axes, image: np.ndarray, gt: np.ndarray | None, pred: np.ndarray | None,
                 title: str = "", fill: bool = True) -> None:
    """Draw ``image`` with the ground-truth contour (green) and the prediction (magenta, dimmed fill)."""
    _show(ax, image)
    if pred is not None and fill:
        ax.imshow(np.ma.masked_where(pred < 0.5, pred), cmap="spring", alpha=0.3, vmin=0, vmax=1)
    if gt is not None and gt.any():
        ax.contour(gt, levels=[0.5], colors=GT_COLOUR, linewidths=1.2)
    if pred is not None and pred.any():
        ax.contour(pred, levels=[0.5], colors=PRED_COLOUR, linewidths=1.2)
    if title:
        ax.set_title(title, fontsize=7)


def plot_overlay_grid(images: Sequence[np.ndarray], gts: Sequence[np.ndarray], preds: Sequence[np.ndarray],
                      titles: Sequence[str], path: str | Path, suptitle: str = "") -> Path:
    """Rows of (image, ground truth, prediction, overlay) for each sample."""
    n = len(images)
    fig, axes = plt.subplots(n, 4, figsize=(8, 2.1 * n), squeeze=False)
    for i in range(n):
        _show(axes[i, 0], images[i])
        axes[i, 0].set_title(titles[i], fontsize=7)
        axes[i, 1].imshow(gts[i], cmap="gray", vmin=0, vmax=1)
        axes[i, 1].set_title("ground truth", fontsize=7)
        axes[i, 2].imshow(preds[i], cmap="gray", vmin=0, vmax=1)
        axes[i, 2].set_title("prediction", fontsize=7)
        overlay_axes(axes[i, 3], images[i], gts[i], preds[i], "overlay (green GT, pink pred)")
        for ax in axes[i, 1:3]:
            ax.set_xticks([])
            ax.set_yticks([])
    if suptitle:
        fig.suptitle(suptitle, fontsize=9)
    return _save(fig, path)


def plot_batch(images: Sequence[np.ndarray], gts: Sequence[np.ndarray], preds: Sequence[np.ndarray],
               titles: Sequence[str], path: str | Path, suptitle: str) -> Path:
    """One row of overlays (GlassBox batch view)."""
    n = len(images)
    fig, axes = plt.subplots(1, n, figsize=(2.0 * n, 2.4), squeeze=False)
    for i in range(n):
        overlay_axes(axes[0, i], images[i], gts[i], preds[i], titles[i])
    fig.suptitle(suptitle, fontsize=9)
    return _save(fig, path)


def plot_confusion(counts: Mapping[str, float], path: str | Path, title: str = "pixel confusion matrix") -> Path:
    """2×2 pixel confusion matrix as fractions of all pixels (with counts)."""
    tp, fp, tn, fn = (float(counts[k]) for k in ("tp", "fp", "tn", "fn"))
    total = max(tp + fp + tn + fn, 1.0)
    mat = np.array([[tn, fp], [fn, tp]])
    fig, ax = plt.subplots(figsize=(3.4, 3.0))
    ax.imshow(mat / total, cmap="Blues", vmin=0, vmax=1)
    for (r, c), v in np.ndenumerate(mat):
        ax.text(c, r, f"{v / total:.2%}\n({int(v):,})", ha="center", va="center", fontsize=8,
                color="white" if v / total > 0.5 else "black")
    ax.set_xticks([0, 1], ["pred 0", "pred 1"])
    ax.set_yticks([0, 1], ["true 0", "true 1"])
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def plot_threshold_sweep(rows: Sequence[Mapping[str, float]], path: str | Path, chosen: float) -> Path:
    """Dice, precision, recall and FP/FN pixel rates against the probability threshold."""
    thr = [r["threshold"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(8, 3))
    for k in ("dice", "precision", "recall", "f1"):
        a.plot(thr, [r[k] for r in rows], label=k)
    a.axvline(chosen, color="grey", ls="--", lw=0.8)
    a.set_xlabel("threshold")
    a.legend(fontsize=7)
    a.set_title("metrics vs threshold", fontsize=9)
    b.plot(thr, [r["fp_rate"] for r in rows], label="FP pixels / all")
    b.plot(thr, [r["fn_rate"] for r in rows], label="FN pixels / all")
    b.axvline(chosen, color="grey", ls="--", lw=0.8)
    b.set_xlabel("threshold")
    b.legend(fontsize=7)
    b.set_title("error pixel rates", fontsize=9)
    return _save(fig, path)


def plot_pr_curve(precision: Sequence[float], recall: Sequence[float], path: str | Path, ap: float) -> Path:
    """Pixel precision-recall curve."""
    fig, ax = plt.subplots(figsize=(3.4, 3.2))
    ax.plot(recall, precision)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title(f"pixel PR curve (AP {ap:.3f})", fontsize=9)
    return _save(fig, path)


def plot_reliability(rel: Mapping[str, Sequence[float]], path: str | Path, ece: float, what: str = "pixels") -> Path:
    """Reliability diagram: observed frequency vs mean confidence per bin, with bin mass."""
    conf = np.array(rel["confidence"], dtype=float)
    freq = np.array(rel["frequency"], dtype=float)
    count = np.array(rel["count"], dtype=float)
    ok = count > 0
    fig, (a, b) = plt.subplots(2, 1, figsize=(3.6, 4.2), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    a.plot([0, 1], [0, 1], "k--", lw=0.8)
    a.plot(conf[ok], freq[ok], "o-", ms=3)
    a.set_ylabel("observed frequency")
    a.set_title(f"reliability ({what}), ECE {ece:.4f}", fontsize=9)
    b.bar(conf[ok], count[ok] / max(count.sum(), 1), width=0.05)
    b.set_yscale("log")
    b.set_xlabel("predicted probability")
    b.set_ylabel("mass")
    return _save(fig, path)


def plot_curves(history: Mapping[str, Sequence[tuple[int, float]]], path: str | Path) -> Path:
    """Training curves: one line per logged series, x = epoch."""
    fig, ax = plt.subplots(figsize=(5, 3))
    for name, pts in history.items():
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, label=name)
    ax.set_xlabel("epoch")
    ax.legend(fontsize=7)
    ax.set_title("training curves", fontsize=9)
    return _save(fig, path)


def plot_comparison(images: Sequence[np.ndarray], gts: Sequence[np.ndarray],
                    preds: Mapping[str, Sequence[np.ndarray]], scores: Mapping[str, Sequence[float]],
                    path: str | Path, suptitle: str = "") -> Path:
    """Rows = images; columns = image with ground truth, then each run's overlay with its Dice."""
    names = list(preds)
    n, m = len(images), len(names) + 1
    fig, axes = plt.subplots(n, m, figsize=(2.1 * m, 2.1 * n), squeeze=False)
    for i in range(n):
        overlay_axes(axes[i, 0], images[i], gts[i], None, "image + ground truth" if i == 0 else "")
        for j, name in enumerate(names):
            overlay_axes(axes[i, j + 1], images[i], gts[i], preds[name][i],
                         f"{name}\nDice {scores[name][i]:.3f}" if i == 0 else f"Dice {scores[name][i]:.3f}")
    if suptitle:
        fig.suptitle(suptitle, fontsize=9)
    return _save(fig, path)


def _norm_map(m: np.ndarray) -> np.ndarray:
    m = np.nan_to_num(np.asarray(m, dtype=float))
    lo, hi = np.percentile(m, 1), np.percentile(m, 99.5)
    return np.clip((m - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(m)


def plot_heatmaps(images: Sequence[np.ndarray], maps: Mapping[str, np.ndarray], path: str | Path,
                  titles: Sequence[str] = ()) -> Path:
    """One row per method, one column per image: heatmap (jet, alpha 0.5) over the image."""
    names = list(maps)
    n = len(images)
    fig, axes = plt.subplots(len(names), n, figsize=(1.9 * n, 2.0 * len(names)), squeeze=False)
    for r, name in enumerate(names):
        for c in range(n):
            _show(axes[r, c], images[c])
            axes[r, c].imshow(_norm_map(maps[name][c]), cmap="jet", alpha=0.5, vmin=0, vmax=1)
            axes[r, c].set_title(f"{titles[c] if c < len(titles) else ''}\n{name}" if r == 0 else name, fontsize=6)
    return _save(fig, path)


def overlay_png(image: np.ndarray, heatmap: np.ndarray, path: str | Path, alpha: float = 0.5) -> Path:
    """One image with its heatmap (jet, ``alpha``) as a PNG at the image's own resolution."""
    from PIL import Image

    img = np.asarray(image, dtype=float)
    img = np.repeat(img, 3, -1) if img.shape[-1] == 1 else img
    heat = plt.get_cmap("jet")(_norm_map(heatmap))[..., :3]
    out = np.clip((1 - alpha) * img + alpha * heat, 0, 1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((out * 255 + 0.5).astype(np.uint8)).save(path)
    return path


def plot_explanation_grid(images: Sequence[np.ndarray], gts: np.ndarray | None, preds: np.ndarray,
                          maps: Mapping[str, np.ndarray], path: str | Path, ids: Sequence[str],
                          captions: Sequence[str] | None = None) -> Path:
    """GlassBox comparison grid: per image (row) the image, mask, prediction and every method.
    ``captions`` (e.g. a classifier's probability and label) title the prediction panels."""
    names = list(maps)
    n, m = len(images), 3 + len(names)
    fig, axes = plt.subplots(n, m, figsize=(1.7 * m, 1.8 * n), squeeze=False)
    for i in range(n):
        _show(axes[i, 0], images[i])
        axes[i, 0].set_title(ids[i], fontsize=6)
        axes[i, 1].imshow(gts[i] if gts is not None else np.zeros_like(preds[i]), cmap="gray", vmin=0, vmax=1)
        axes[i, 2].imshow(preds[i], cmap="gray", vmin=0, vmax=1)
        if captions is not None:
            axes[i, 2].set_title(captions[i], fontsize=6)
        for j, name in enumerate(names):
            ax = axes[i, 3 + j]
            _show(ax, images[i])
            ax.imshow(_norm_map(maps[name][i]), cmap="jet", alpha=0.5, vmin=0, vmax=1)
            if gts is not None and gts[i].any():
                ax.contour(gts[i], levels=[0.5], colors=GT_COLOUR, linewidths=0.8)
        if i == 0:
            for j, title in enumerate(["image", "mask", "prediction", *names]):
                if j == 2 and captions is not None:
                    title = f"prediction\n{captions[0]}"
                axes[0, j].set_title(title if j else f"image\n{ids[0]}", fontsize=6)
        for ax in axes[i, 1:3]:
            ax.set_xticks([])
            ax.set_yticks([])
    return _save(fig, path)


def plot_risk_coverage(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], path: str | Path) -> Path:
    """Selective prediction: error rate among the kept images against the fraction kept."""
    fig, ax = plt.subplots(figsize=(4, 3))
    for name, (cov, risk) in curves.items():
        ax.plot(cov, risk, label=name)
    ax.set_xlabel("coverage (fraction of images kept, most confident first)")
    ax.set_ylabel("risk (error rate)")
    ax.set_xlim(0, 1)
    ax.legend(fontsize=7)
    ax.set_title("risk-coverage", fontsize=9)
    return _save(fig, path)


def plot_uncertainty_hist(values: Mapping[str, np.ndarray], correct: np.ndarray, path: str | Path) -> Path:
    """Histograms of each uncertainty measure for correct vs incorrect predictions."""
    names = list(values)
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 2.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        v = np.asarray(values[name], dtype=float)
        bins = np.linspace(v.min(), v.max() + 1e-9, 25)
        ax.hist(v[correct], bins=bins, alpha=0.6, label=f"correct ({correct.sum()})", density=True)
        ax.hist(v[~correct], bins=bins, alpha=0.6, label=f"incorrect ({(~correct).sum()})", density=True)
        ax.set_title(name, fontsize=8)
        ax.legend(fontsize=6)
    return _save(fig, path)


def plot_score_hist(groups: Mapping[str, np.ndarray], path: str | Path, title: str = "") -> Path:
    """Overlaid density histograms of one score for several groups of images (e.g. in- vs out-of-distribution)."""
    fig, ax = plt.subplots(figsize=(4.2, 2.8))
    allv = np.concatenate([np.asarray(v, dtype=float) for v in groups.values()])
    bins = np.linspace(allv.min(), allv.max() + 1e-9, 30)
    for name, v in groups.items():
        ax.hist(np.asarray(v, dtype=float), bins=bins, alpha=0.55, density=True, label=f"{name} ({len(v)})")
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=6)
    return _save(fig, path)


def plot_image_grid(groups: Mapping[str, Sequence[tuple[np.ndarray, str]]], path: str | Path, title: str = "") -> Path:
    """Rows = groups (e.g. trust quadrants), columns = example images with captions."""
    names = [g for g in groups if groups[g]] or list(groups)
    ncol = max([len(groups[g]) for g in names] + [1])
    fig, axes = plt.subplots(len(names), ncol, figsize=(1.9 * ncol, 2.1 * len(names)), squeeze=False)
    for r, g in enumerate(names):
        for c in range(ncol):
            ax = axes[r, c]
            ax.axis("off")
            if c < len(groups[g]):
                img, cap = groups[g][c]
                _show(ax, img)
                ax.axis("on")
                ax.set_xticks([])
                ax.set_yticks([])
                ax.set_title(cap, fontsize=6)
        axes[r, 0].set_ylabel(g, fontsize=7)
        axes[r, 0].axis("on")
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def plot_roc_curves(curves: Mapping[str, tuple[np.ndarray, np.ndarray, float]], path: str | Path,
                    title: str = "ROC") -> Path:
    """One ROC curve per group: ``name -> (fpr, tpr, auroc)``."""
    fig, ax = plt.subplots(figsize=(4.2, 4))
    for name, (fpr, tpr, auc) in curves.items():
        ax.plot(fpr, tpr, label=f"{name} ({auc:.3f})")
    ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls="--")
    ax.set_xlabel("false-positive rate (clean images flagged)")
    ax.set_ylabel("true-positive rate (injected images flagged)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)


def plot_qc_curve(rows: Sequence[Mapping[str, float]], path: str | Path, what: str = "predictive entropy") -> Path:
    """Quality control: mean Dice of the images kept against the fraction referred (most uncertain first),
    with the oracle (worst Dice first) and random referral."""
    f = [r["referred_fraction"] for r in rows]
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.plot(f, [r["dice_kept"] for r in rows], marker="o", ms=3, label=f"refer most uncertain ({what})")
    ax.plot(f, [r["dice_kept_oracle"] for r in rows], ls="--", label="oracle (worst Dice first)")
    ax.plot(f, [r["dice_kept_random"] for r in rows], ls=":", label="random")
    ax.set_xlabel("fraction of images referred to a human")
    ax.set_ylabel("mean Dice of the images kept")
    ax.legend(fontsize=7)
    ax.set_title("uncertainty-ranked quality control", fontsize=9)
    return _save(fig, path)


def plot_boundary_profile(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Confidence, entropy and error rate against the signed distance to the ground-truth boundary."""
    d = [r["distance_px"] for r in rows]
    fig, ax = plt.subplots(figsize=(4.6, 3))
    ax.plot(d, [r["confidence"] for r in rows], marker="o", ms=3, label="confidence max(p, 1-p)")
    ax.plot(d, [r["entropy"] for r in rows], marker="s", ms=3, label="predictive entropy")
    ax.plot(d, [r["error_rate"] for r in rows], marker="^", ms=3, label="pixel error rate")
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xlabel("signed distance to the lesion boundary (px; > 0 inside)")
    ax.legend(fontsize=7)
    ax.set_title("confident at the core, unsure at the boundary?", fontsize=9)
    return _save(fig, path)


def plot_uncertainty_maps(images: Sequence[np.ndarray], gts: Sequence[np.ndarray], probs: Sequence[np.ndarray],
                          entropy: Sequence[np.ndarray], mi: Sequence[np.ndarray], titles: Sequence[str],
                          path: str | Path) -> Path:
    """Rows = images: overlay (ground truth contour, prediction), probability, predictive entropy, mutual information."""
    n = len(images)
    fig, axes = plt.subplots(n, 4, figsize=(8.4, 2.2 * n), squeeze=False)
    for i in range(n):
        overlay_axes(axes[i, 0], images[i], gts[i], (probs[i] >= 0.5).astype(float), titles[i])
        for j, (m, name, vmax) in enumerate(((probs[i], "probability", 1.0), (entropy[i], "predictive entropy", np.log(2)),
                                             (mi[i], "mutual information", None)), start=1):
            im = axes[i, j].imshow(m, cmap="magma", vmin=0, vmax=vmax)
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
            if i == 0:
                axes[i, j].set_title(name, fontsize=8)
            fig.colorbar(im, ax=axes[i, j], fraction=0.046)
    return _save(fig, path)


def plot_shift_boxes(df: Any, path: str | Path, metrics: Sequence[str] = ("accuracy", "ece_top_label", "brier",
                                                                             "coverage_lac", "aleatoric", "epistemic")) -> Path:
    """Ovadia et al. (2019)-style shift figure: per metric, box plots over the corruptions at each severity
    (severity 0 = clean), one box per method / temperature scaling / test-time variant; the last two panels
    are the uncertainty decomposition (mean expected entropy = aleatoric, mutual information = epistemic)."""
    metrics = [m for m in metrics if m in df.columns and df[m].notna().any()]
    df = df[df["recalibration"].isin(["none", "temperature"])] if "recalibration" in df else df  # netcal: the CSV
    combos = list(df.groupby(["variant", "method", "temperature_scaled"], sort=False).groups)
    sev = sorted(df["severity"].unique())
    width = 0.8 / max(1, len(combos))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    ncol = min(3, len(metrics))
    nrow = -(-len(metrics) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.4 * ncol, 3.4 * nrow), squeeze=False)
    for ax in axes.flat[len(metrics):]:
        ax.axis("off")
    for ax, m in zip(axes.flat, metrics):
        for j, (v, meth, sc) in enumerate(combos):
            sub = df[(df["variant"] == v) & (df["method"] == meth) & (df["temperature_scaled"] == sc)]
            data = [sub[sub["severity"] == s][m].dropna().to_numpy() for s in sev]
            pos = [i + (j - (len(combos) - 1) / 2) * width for i in range(len(sev))]
            bp = ax.boxplot(data, positions=pos, widths=width * 0.9, patch_artist=True, showfliers=False)
            for b in bp["boxes"]:
                b.set_facecolor(colors[j % len(colors)])
                b.set_alpha(0.7)
            ax.plot([], [], color=colors[j % len(colors)], lw=6, alpha=0.7,
                    label=f"{meth}{' +TS' if sc else ''}{'' if v == 'as trained' else ' ' + v}")
        ax.set_xticks(range(len(sev)))
        ax.set_xticklabels([str(s) if s else "clean" for s in sev])
        ax.set_title(m, fontsize=9)
    for ax in axes[-1]:
        ax.set_xlabel("corruption severity")
    axes[0, 0].legend(fontsize=6)
    fig.tight_layout()
    return _save(fig, path)
