"""SLIC superpixel confidence map (GlassBox): mean predicted probability per superpixel, plus the
within-superpixel standard deviation as a simple uncertainty."""
from __future__ import annotations

import numpy as np
from skimage.segmentation import slic


def slic_confidence(image: np.ndarray, prob: np.ndarray, n_segments: int = 100, compactness: float = 10.0,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Args: image H×W×C in [0, 1]; prob H×W. Returns (mean map, std map, segment labels), H×W each."""
    img = image[..., 0] if image.shape[-1] == 1 else image
    seg = slic(img, n_segments=n_segments, compactness=compactness, start_label=0,
               channel_axis=None if img.ndim == 2 else -1)
    n = seg.max() + 1
    count = np.bincount(seg.ravel(), minlength=n).astype(float)
    s1 = np.bincount(seg.ravel(), weights=prob.ravel(), minlength=n)
    s2 = np.bincount(seg.ravel(), weights=(prob**2).ravel(), minlength=n)
    mean = s1 / np.maximum(count, 1)
    std = np.sqrt(np.maximum(s2 / np.maximum(count, 1) - mean**2, 0))
    return mean[seg], std[seg], seg
