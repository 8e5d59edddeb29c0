"""Out-of-distribution detection for classifier runs: which images are unlike the training data?

Detectors (a higher score = more out-of-distribution), through ``pytorch-ood`` where it has them:

==========================  ===================================================================
``msp``                     max softmax probability (Hendrycks & Gimpel 2017), pytorch-ood ``MaxSoftmax``
``max_logit``               max logit (Hendrycks et al. 2022), ``MaxLogit``
``energy``                  free energy (Liu et al. 2020), ``EnergyBased``
``mahalanobis``             class-conditional Gaussians with a shared (Ledoit-Wolf shrunk)
                            covariance on the pooled backbone features (Lee et al. 2018),
                            ``Mahalanobis`` (features only, no input perturbation)
``mahalanobis_layers``      the same on every stage's channel mean and SD, standardised on the
                            calibration images and averaged (Lee et al.'s feature ensemble)
``knn``                     distance to the k-th nearest normalised training feature (Sun et
                            al. 2022), ``KNN``
``mc_mutual_information``   mutual information of the MC-dropout passes (epistemic uncertainty)
``ensemble_disagreement``   mutual information across ensemble members
==========================  ===================================================================

The logit scores use the deterministic network (the mean logit of an ensemble's members); the
feature scores are averaged over ensemble members. What the feature detectors need (training
features and labels, tensors only) is written after training to ``ood_fit.safetensors``; their
flag thresholds (each keeps ``keep_in_distribution`` of the held-out calibration images) to
``calibration.json``.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from medtrust.utils.logging import get_logger

log = get_logger(__name__)

DETECTORS = ("msp", "max_logit", "energy", "mahalanobis", "mahalanobis_layers", "knn", "mc_mutual_information",
             "ensemble_disagreement")
FIT_FILE = "ood_fit.safetensors"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def eval_loader(dataset: Any, batch_size: int) -> Any:
    """An in-order loader with its own generator: iterating it draws nothing from the global RNG, so the
    MC-dropout masks seeded in :func:`collect_outputs` are those of ``datamodule.dataloader`` (same numbers)."""
    from torch.utils.data import DataLoader

    return DataLoader(dataset, batch_size=batch_size, shuffle=False, generator=torch.Generator().manual_seed(0))


def leaf_nets(net: torch.nn.Module) -> list[torch.nn.Module]:
    """The single networks of a (possibly nested) ensemble."""
    members = getattr(net, "members", None)
    if members is None:
        return [net]
    return [leaf for m in members for leaf in leaf_nets(m)]


def _net_features(net: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """``final``: the pooled pre-logit features; ``stage<j>``: the channel mean and standard deviation
    of each stage's feature map (timm ``forward_intermediates``; absent for backbones without it)."""
    bb = getattr(net, "backbone", None)
    if bb is not None and hasattr(bb, "forward_intermediates"):
        try:
            last, stages = bb.forward_intermediates(x)
        except Exception:  # noqa: BLE001 - backbones whose intermediates are not maps: final features only
            return {"final": net.features(x)}
        out = {"final": bb.forward_head(last, pre_logits=True)}
        for j, t in enumerate(stages):
            if t.ndim == 4:
                out[f"stage{j}"] = torch.cat([t.mean((2, 3)), t.std((2, 3), correction=0)], 1)
        return out
    return {"final": net.features(x)}


@torch.inference_mode()
def member_features(task: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Features of every member (see :func:`_net_features`): name -> M×B×F."""
    x = task._prep(x) if hasattr(task, "_prep") else x
    per = [_net_features(n, x) for n in leaf_nets(task.net)]
    return {k: torch.stack([p[k] for p in per]) for k in per[0]}


@torch.inference_mode()
def collect_outputs(task: torch.nn.Module, loader: Any, seed: int = 0, features: bool = True) -> dict[str, Any]:
    """Member logits M×N×C, MC-dropout logits T×N×C (or None), features (name -> M×N×F) and labels
    (or None) of every image of ``loader`` in its order (MC masks from ``seed``, the global RNG restored)."""
    members, mc, feats, labels = [], [], [], []
    was = task.training
    task.eval()
    dev = next(task.parameters()).device
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for batch in loader:
            x = batch["image"].to(dev)
            out = task.predict_step({"image": x}, 0)
            members.append(out["member_logits"].float().cpu())
            if "mc_logits" in out:
                mc.append(out["mc_logits"].float().cpu())
            if features:
                feats.append({k: v.float().cpu() for k, v in member_features(task, x).items()})
            if "label" in batch:
                labels.append(batch["label"])
    task.train(was)
    return {"member_logits": torch.cat(members, 1), "mc_logits": torch.cat(mc, 1) if mc else None,
            "features": {k: torch.cat([f[k] for f in feats], 1) for k in feats[0]} if feats else None,
            "labels": torch.cat(labels) if len(labels) == len(members) else None}


# -- fitting -----------------------------------------------------------------------------------
def fit_state(train: Mapping[str, Any], max_images: int, seed: int) -> dict[str, torch.Tensor]:
    """What the feature detectors are fitted from: training features (``features/<name>``, M×N×F) and
    labels, at most ``max_images`` of them (a seeded random subset)."""
    feats, labels = train["features"], train["labels"]
    if labels is None:
        raise ValueError("OOD detectors: the training split has no labels (Mahalanobis needs the classes)")
    n = labels.shape[0]
    idx = torch.arange(n)
    if n > max_images:
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_images].sort().values
    return {"labels": labels[idx].long().contiguous(),
            **{f"features/{k}": v[:, idx].contiguous() for k, v in feats.items()}}


def save_state(run_dir: str | Path, state: Mapping[str, torch.Tensor]) -> Path:
    """``ood_fit.safetensors`` (tensors only, written atomically)."""
    from safetensors.torch import save

    from medtrust.utils.io import atomic_write_bytes

    return atomic_write_bytes(Path(run_dir) / FIT_FILE, save(dict(state)))


def load_state(run_dir: str | Path) -> dict[str, torch.Tensor] | None:
    """The training features of :func:`save_state` (None when the run has none); safetensors runs no code."""
    from safetensors.torch import load_file

    p = Path(run_dir) / FIT_FILE
    if not p.is_file():
        return None
    try:
        state = load_file(str(p))
    except Exception as err:  # noqa: BLE001 - a corrupt file is named, whatever the parser raised
        raise ValueError(f"{p}: not a readable safetensors file of OOD detector features ({err})") from err
    if "labels" not in state or "features/final" not in state:
        log.warning(f"{p}: no 'labels' and 'features/final' tensors (keys {sorted(state)[:6]}; an older format?): the "
                    "feature detectors are left out; evaluate.py ... refit=true fits them again")
        return None
    return state


def shrunk_mahalanobis(features: torch.Tensor, labels: torch.Tensor) -> Any:
    """pytorch-ood's class-conditional Mahalanobis detector fitted on ``features`` (N×F), with the
    shared covariance estimated with Ledoit-Wolf shrinkage (scikit-learn): with fewer images than
    features (270 CXRs, 512 features) the plain estimate is singular and its inverse is noise.
    The shrunk covariance is positive definite, so its precision comes from a Cholesky factor
    (scikit-learn's own ``precision_`` uses an eigendecomposition, ~5x slower at 1,024 features);
    only an exactly singular estimate (zero shrinkage) falls back to the pseudo-inverse."""
    from pytorch_ood.detector import Mahalanobis
    from sklearn.covariance import LedoitWolf

    z = features.double()
    det = Mahalanobis(None).fit_features(z.float(), labels)
    centred = torch.cat([z[labels == k] - z[labels == k].mean(0) for k in labels.unique()])
    cov = torch.from_numpy(LedoitWolf(assume_centered=True, store_precision=False).fit(centred.numpy()).covariance_)
    factor, info = torch.linalg.cholesky_ex(cov)
    det.precision = (torch.cholesky_inverse(factor) if int(info) == 0 else torch.linalg.pinv(cov, hermitian=True)).float()
    return det


class Detectors:
    """The configured detectors, fitted from :func:`fit_state`'s tensors.

    ``mahalanobis`` uses the final pooled features; ``mahalanobis_layers`` every stage's channel mean and
    standard deviation (Lee et al. 2018's feature ensemble), each stage's score standardised by its mean
    and SD on the held-out calibration images (``ref/<stage>``) and averaged with equal weights (no OOD
    data is used to weight them); ``knn`` the final features. Ensembles: scores averaged over members.

    Args:
        names: detectors to use (unavailable ones, e.g. MC dropout without dropout, are dropped at scoring).
        state: training features and labels (None: the feature detectors are dropped, with a log line).
        knn_k: k of the KNN detector (capped at the number of training images).
    """

    FEATURE_DETECTORS = ("mahalanobis", "mahalanobis_layers", "knn")

    def __init__(self, names: Sequence[str], state: Mapping[str, torch.Tensor] | None, knn_k: int = 5) -> None:
        bad = [n for n in names if n not in DETECTORS]
        if bad:
            raise ValueError(f"evaluation.ood.detectors: unknown {bad}; choose from {list(DETECTORS)}")
        self.names = list(names)
        self.maha: dict[str, list[Any]] = {}
        self.knn: list[Any] = []
        self.ref = {k.removeprefix("ref/"): v for k, v in (state or {}).items() if k.startswith("ref/")}
        if state is None:
            if any(n in self.FEATURE_DETECTORS for n in self.names):
                log.warning("OOD: no training features (ood_fit.safetensors; refit=true fits them): "
                            f"{[n for n in self.names if n in self.FEATURE_DETECTORS]} left out")
            self.names = [n for n in self.names if n not in self.FEATURE_DETECTORS]
            return
        labels = state["labels"].long()
        feats = {k.removeprefix("features/"): v.float() for k, v in state.items() if k.startswith("features/")}
        if any(n.startswith("mahalanobis") for n in self.names) and len(labels.unique()) != int(labels.max()) + 1:
            raise ValueError(f"OOD detector mahalanobis: training labels {sorted(labels.unique().tolist())} miss a "
                             "class; every class needs training images")
        self._labels, self._feats, self._knn_k = labels, feats, max(1, min(int(knn_k), len(labels)))

    def _fitted_maha(self, layer: str) -> list[Any]:
        """One layer's detectors (one per member), fitted on first use: a caller scoring one detector
        (the ``ood_flag``) does not pay for the others."""
        if layer not in self.maha:
            self.maha[layer] = [shrunk_mahalanobis(f, self._labels) for f in self._feats[layer]]
        return self.maha[layer]

    def _fitted_knn(self) -> list[Any]:
        from pytorch_ood.detector import KNN

        if not self.knn:
            self.knn = [KNN(None, k=self._knn_k).fit_features(f, self._labels) for f in self._feats["final"]]
        return self.knn

    @staticmethod
    def stages(feats: Mapping[str, Any]) -> list[str]:
        return sorted((k for k in feats if k.startswith("stage")), key=lambda k: int(k[5:]))

    def available(self, out: Mapping[str, Any]) -> list[str]:
        names = []
        for n in self.names:
            if n == "mc_mutual_information" and out.get("mc_logits") is None:
                continue
            if n == "ensemble_disagreement" and out["member_logits"].shape[0] < 2:
                continue
            if n == "mahalanobis_layers" and not (self.stages(out["features"]) and self.ref):
                continue
            names.append(n)
        return names

    def _maha(self, layer: str, feats: torch.Tensor) -> torch.Tensor:
        """M×N scores of one layer's detectors."""
        return torch.stack([d.predict_features(f.float()).double() for d, f in zip(self._fitted_maha(layer), feats)])

    def layer_reference(self, out: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """``ref/<stage>``: M×2 mean and SD of each stage's Mahalanobis score on ``out`` (the calibration images)."""
        ref = {}
        for k in self.stages(out["features"]):
            s = self._maha(k, out["features"][k])
            ref[f"ref/{k}"] = torch.stack([s.mean(1), s.std(1).clamp_min(1e-12)], 1).float()
        return ref

    def scores(self, out: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Score per image of every available detector (higher = more out-of-distribution)."""
        from pytorch_ood.detector import EnergyBased, MaxLogit, MaxSoftmax

        from medtrust.metrics.classification import predictive_uncertainty

        logits = out["member_logits"].double().mean(0)
        res: dict[str, np.ndarray] = {}
        for n in self.available(out):
            if n == "msp":
                s = MaxSoftmax.score(logits)
            elif n == "max_logit":
                s = MaxLogit.score(logits)
            elif n == "energy":
                s = EnergyBased.score(logits)
            elif n == "mahalanobis":
                s = self._maha("final", out["features"]["final"]).mean(0)
            elif n == "mahalanobis_layers":
                z = [(self._maha(k, out["features"][k]) - self.ref[k][:, :1].double()) / self.ref[k][:, 1:].double()
                     for k in self.stages(out["features"])]
                s = torch.stack(z).mean((0, 1))
            elif n == "knn":
                s = torch.stack([d.predict_features(f.float()).double()
                                 for d, f in zip(self._fitted_knn(), out["features"]["final"])]).mean(0)
            elif n == "mc_mutual_information":
                s = predictive_uncertainty(torch.softmax(out["mc_logits"].double(), -1))["mutual_information"]
            else:
                s = predictive_uncertainty(torch.softmax(out["member_logits"].double(), -1))["mutual_information"]
            res[n] = s.double().cpu().numpy()
        return res


def thresholds(scores: Mapping[str, np.ndarray], keep: float) -> dict[str, float]:
    """Per detector, the score below or at which ``keep`` of the (in-distribution) images fall."""
    return {n: float(np.quantile(s, keep, method="higher")) for n, s in scores.items()}


# -- metrics -----------------------------------------------------------------------------------
def detection_metrics(id_scores: np.ndarray, ood_scores: np.ndarray, tpr: float = 0.95) -> dict[str, float]:
    """AUROC (OOD positive) and the FPR at ``tpr`` of OOD detected: the share of in-distribution images
    flagged when the threshold flags ``tpr`` of the out-of-distribution ones."""
    from sklearn.metrics import roc_auc_score

    y = np.r_[np.zeros(len(id_scores)), np.ones(len(ood_scores))]
    s = np.r_[id_scores, ood_scores]
    thr = np.quantile(ood_scores, 1 - tpr, method="lower")       # flags >= tpr of the OOD images
    return {"auroc": float(roc_auc_score(y, s)), f"fpr_at_{int(round(tpr * 100))}tpr": float((id_scores >= thr).mean()),
            "n_in": int(len(id_scores)), "n_out": int(len(ood_scores))}


def set_name(spec: str, taken: Mapping[str, Any]) -> str:
    """A short name of an OOD set: its folder's name (a manifest's folder for a CSV), made unique."""
    p = Path(spec)
    base = (p.resolve().parent.name if p.is_file() else p.resolve().name) or "set"
    name, k = base, 2
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    return name


# -- reading a set of images -------------------------------------------------------------------
def list_images(spec: str | Path, key: str = "ood.sets") -> list[Path]:
    """The image files of an OOD set: a folder (searched recursively) or a CSV manifest whose ``path``
    (or ``image_path``) column holds paths relative to the CSV.

    Raises:
        FileNotFoundError: ``spec`` does not exist.
        ValueError: a CSV without a path column, or no image at all.
    """
    p = Path(str(spec)).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{key}: {p} does not exist (expected an image folder or a CSV manifest)")
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
    else:
        try:
            df = pd.read_csv(p)
        except Exception as err:  # noqa: BLE001 - any parser error names the file
            raise ValueError(f"{key}: {p} is neither an image folder nor a readable CSV manifest ({err})") from err
        col = next((c for c in ("path", "image_path") if c in df.columns), None)
        if col is None:
            raise ValueError(f"{key}: {p} has no 'path' (or 'image_path') column; columns: {list(df.columns)}")
        files = [p.parent / str(v) for v in df[col].dropna()]
    if not files:
        raise ValueError(f"{key}: {p} holds no image ({', '.join(IMAGE_SUFFIXES)} files or manifest rows): an "
                         "OOD set needs at least one image")
    return files


def check_readable(files: Sequence[Path], key: str, on_bad: str = "error") -> list[Path]:
    """``files`` whose image header PIL can read; an unreadable one stops with its name (``on_bad=error``)
    or is left out (``skip``; the set is read again, and the skips counted, when it is scored). Header
    only: cheap enough to run on every set before the evaluation starts.

    Raises:
        ValueError: an unreadable file under ``on_bad=error``, or no readable file at all.
    """
    from PIL import Image

    ok = []
    for f in files:
        try:
            with Image.open(f):
                ok.append(f)
        except Exception as err:  # noqa: BLE001 - whatever PIL raised, the file is named
            if on_bad != "skip":
                raise ValueError(f"{key}: {f} is unreadable as an image ({type(err).__name__}: {err}); fix or remove "
                                 "it, or pass data.on_bad=skip to leave unreadable files out") from err
    if not ok:
        raise ValueError(f"{key}: none of its {len(files)} file(s) is a readable image")
    return ok


def native_modes(files: Sequence[Path]) -> dict[str, int]:
    """How many files of each PIL mode (header only), to log the channel conversion."""
    from PIL import Image

    out: dict[str, int] = {}
    for f in files:
        try:
            with Image.open(f) as im:
                out[im.mode] = out.get(im.mode, 0) + 1
        except Exception:  # noqa: BLE001 - unreadable files are reported when they are read
            out["unreadable"] = out.get("unreadable", 0) + 1
    return out


def score_sets(task: torch.nn.Module, datamodule: Any, split: str, sets: Sequence[str], out_dir: str | Path,
               c: Any, fitted: Mapping[str, Any] | None) -> dict[str, Any]:
    """Score ``split`` (in distribution) and each OOD set with every detector: ``metrics/ood.json``,
    ``metrics/ood.csv`` (set × detector: AUROC, FPR at 95 % TPR), ``metrics/ood_scores.csv`` (per image)
    and ``figures/ood/<set>.png`` (score histograms of the best detector).

    Raises:
        FileNotFoundError / ValueError / DataError: a set that does not exist, is empty or cannot be read.
    """
    from medtrust.report import figures
    from medtrust.utils.io import write_csv, write_json
    from medtrust.utils.names import safe_filename

    o = c.ood
    if not sets:
        raise ValueError("ood.sets is empty: give image folders or CSV manifests, e.g. ood.sets=[path/a,path/b]")
    fitted = dict(fitted or {})
    state = load_state(fitted["dir"]) if fitted.get("dir") else None
    det = Detectors(list(o.detectors), state, int((fitted.get("ood") or {}).get("knn_k", o.knn_k)))
    files_of = {str(s): list_images(s, f"ood.sets[{i}]") for i, s in enumerate(sets)}  # all checked before scoring
    id_out = collect_outputs(task, datamodule.dataloader(split), int(c.mc_seed))
    id_scores = det.scores(id_out)
    id_ids = [r["id"] for r in datamodule.load_split(split)[2]]
    rows, per_image, summary, figs = [], [], {}, []
    per_image += [{"set": f"in-distribution ({split})", "id": i, **{d: float(v[k]) for d, v in id_scores.items()}}
                  for k, i in enumerate(id_ids)]
    for i, (spec, files) in enumerate(files_of.items()):
        where = f"ood.sets[{i}]={spec}"
        modes = native_modes(files)
        ds, skipped = datamodule.external_dataset(files, where)
        log.info(f"{where}: {len(ds)} image(s) (native modes {modes}) read as {datamodule.channels} channel(s) at "
                 f"{datamodule.image_size} ({datamodule.resize}), normalised like the run's data"
                 + (f"; {len(skipped)} unreadable skipped (data.on_bad=skip)" if skipped else ""))
        loader = eval_loader(ds, datamodule.eval_batch_size)
        out = collect_outputs(task, loader, int(c.mc_seed))
        scores = det.scores(out)
        name = set_name(spec, summary)
        block = {"spec": spec, "n_images": len(ds), "skipped": skipped, "native_modes": modes,
                 "preprocessing": {"channels": datamodule.channels, "image_size": list(datamodule.image_size),
                                   "resize": datamodule.resize}, "detectors": {}}
        for d, s in scores.items():
            m = detection_metrics(id_scores[d], s)
            block["detectors"][d] = m
            rows.append({"set": name, "spec": spec, "detector": d, **m})
        best = max(block["detectors"], key=lambda d: block["detectors"][d]["auroc"])
        block["best_detector"] = best
        summary[name] = block
        per_image += [{"set": name, "id": str(f), **{d: float(v[k]) for d, v in scores.items()}}
                      for k, f in enumerate(r["path"] for r in ds.records)]
        if c.figures:
            figs.append(figures.plot_score_hist(
                {f"in-distribution ({split})": id_scores[best], name: scores[best]},
                Path(out_dir) / "figures" / "ood" / f"{safe_filename(name)}.png",
                f"{best} score: {split} vs {name} (AUROC {block['detectors'][best]['auroc']:.3f})"))
    mdir = Path(out_dir) / "metrics"
    write_csv(mdir / "ood.csv", pd.DataFrame(rows))
    write_csv(mdir / "ood_scores.csv", pd.DataFrame(per_image))
    result = {"in_distribution": {"split": split, "n_images": len(id_ids)},
              "features_from": (fitted.get("ood") or {}).get("features_from"),
              "detectors": list(id_scores), "sets": summary, "figures": [str(f) for f in figs],
              "note": "AUROC with OOD images as positives; FPR at 95 % TPR = share of in-distribution images flagged "
                      "when 95 % of the set's images are"}
    write_json(mdir / "ood.json", result)
    for name, b in summary.items():
        d = b["best_detector"]
        log.info(f"OOD {name}: best {d} AUROC {b['detectors'][d]['auroc']:.4f}, "
                 f"FPR@95TPR {b['detectors'][d]['fpr_at_95tpr']:.3f} ({b['n_images']} vs {len(id_ids)} images)")
    return result
