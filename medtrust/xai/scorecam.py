"""Batched Score-CAM that skips channels whose mask is empty, exactly.

Score-CAM (Wang et al., "Score-CAM: Score-Weighted Visual Explanations for Convolutional Neural
Networks", CVPR Workshops 2020) weights each activation channel of a layer by the target score of
the input masked with that channel, instead of by gradients. This implementation follows the
conventions of pytorch-grad-cam's ``ScoreCAM`` (grad-cam 1.5.x), against which it is validated in
``tests/unit/xai/test_scorecam.py`` and ``experiments/benchmark.py --rows scorecam``.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from medtrust.xai.cam import get_module

#: added to (max - min) of each upsampled channel before dividing, as pytorch-grad-cam does
MASK_EPS = 1e-8
#: elements of the upsampled activations handled at once while finding their ranges
_CHUNK_ELEMENTS = 1 << 22


class _StopForward(Exception):
    """Raised by the capture hook: nothing after the explained layer is needed."""


def _capture(forward: Callable[[torch.Tensor], torch.Tensor], module: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Output of ``module`` (its first call) while ``forward`` runs on ``images``; the forward pass
    is cut short right after the layer."""
    store: list[object] = []

    def hook(mod: nn.Module, args: object, output: object) -> None:
        store.append(output)
        raise _StopForward

    handle = module.register_forward_hook(hook)
    try:
        forward(images)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not store:
        raise RuntimeError(f"the layer {type(module).__name__} was not called while forward ran on the images")
    acts = store[0]
    if not isinstance(acts, torch.Tensor) or acts.dim() != 4 or acts.shape[0] != images.shape[0]:
        shape = tuple(acts.shape) if isinstance(acts, torch.Tensor) else type(acts).__name__
        raise ValueError(f"score_cam needs a layer whose output is a B×K×h×w tensor with B={images.shape[0]}, "
                         f"got {shape}")
    return acts.detach()


def _upsampled_range(acts: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel min and max (B×K each) of the channels upsampled to ``size``, in chunks of
    channels so the B×K×H×W tensor is never held."""
    b, k, h, w = acts.shape
    flat = acts.reshape(b * k, 1, h, w)
    step = max(1, _CHUNK_ELEMENTS // (size[0] * size[1]))
    mins, maxs = [], []
    for s in range(0, b * k, step):
        up = F.interpolate(flat[s:s + step], size=size, mode="bilinear", align_corners=True).flatten(1)
        mins.append(up.amin(1))
        maxs.append(up.amax(1))
    return torch.cat(mins).view(b, k), torch.cat(maxs).view(b, k)


@torch.no_grad()
def score_cam(model: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor], layer: str | nn.Module,
              images: torch.Tensor, batch_size: int = 32, skip_zero_channels: bool = True,
              baseline: torch.Tensor | None = None, weights: str = "softmax") -> torch.Tensor:
    """Score-CAM map of ``forward``'s scalar target at ``layer``, upsampled to the input size.

    Score-CAM (Wang et al., CVPR-W 2020): with the activations ``A`` (B×K×h×w) of ``layer``,

    1. each channel ``A_k`` is upsampled bilinearly to H×W and min-max normalised per image to a
       mask ``M_k`` in [0, 1];
    2. each channel is scored by the target of the masked input: ``s_k = forward(x * M_k)``, or
       ``forward(baseline + (x - baseline) * M_k)`` with a ``baseline``;
    3. ``w = softmax_k(s)`` and ``cam = ReLU(sum_k w_k A_k)``, bilinearly upsampled to H×W.

    Conventions of pytorch-grad-cam's ``ScoreCAM`` matched here: masks are upsampled with
    ``align_corners=True`` (``nn.UpsamplingBilinear2d``) and normalised as
    ``(u - min) / (max - min + 1e-8)``; the score is the raw target output (e.g. the class logit of
    ``ClassifierOutputTarget``, no softmax over classes), and the weights are the softmax of the
    scores over the channels; the weighted sum is taken at the layer's resolution, ReLU'd, then
    resized with half-pixel bilinear interpolation (``align_corners=False``, as its ``cv2.resize``).
    Unlike pytorch-grad-cam, the map is *not* min-max normalised to [0, 1]: its scale is kept (a
    softmax-weighted average of the activations). pytorch-grad-cam's map is a positive affine
    function of this one per image, so the two have Pearson correlation 1 up to rounding.

    Batching: the masked inputs are scored in calls of ``forward`` on whole copies of the batch
    (``m`` blocks of B inputs, input ``j*B + i`` derived from image ``i``) -- the layout
    :class:`medtrust.xai.targets.Target` tiles its fixed class/region to -- with
    ``m = max(1, batch_size // B)``, so each call sees ``batch_size`` inputs rounded down to a
    multiple of B (at least B).

    Exact savings (the result equals the unskipped computation up to floating-point rounding of
    the network on differently composed batches):

    * Empty masks (``skip_zero_channels``): a channel whose upsampled activation is constant for an
      image -- in particular all zero, which after a ReLU happens for many channels of the last
      stage -- has ``max == min``, so its normalised mask is exactly all zero and its masked input
      is ``x * 0`` (or ``baseline``) whatever the channel. pytorch-grad-cam still runs the network
      on it once per such channel. Its score still enters the softmax denominator (and a constant
      nonzero channel still adds ``w_k * c`` to the map), so it cannot be dropped; instead the score
      of the empty mask is computed ONCE per image and given to all such channels. The test is made
      on the upsampled values (exactly what the normalisation sees), not on the raw activations: a
      constant channel whose upsampling is not exactly constant after rounding is scored, as its
      (noise) mask is not empty in pytorch-grad-cam either.
    * The pass that captures the activations stops right after ``layer`` (the rest of the network
      is not run for it).
    * No B×K×C×H×W tensor of masked inputs is built: masks are made per call of ``forward``.

    Blocks are filled per image with its kept channels (plus one empty-mask input when the image
    has skipped channels); images with fewer kept channels leave padding slots in the last blocks,
    which are scored and ignored (the price of the whole-batch layout that per-image targets need;
    usually a few percent).

    A layer with 1×1 maps makes every mask empty: all weights are equal (1/K) and the map is
    constant (pytorch-grad-cam returns zeros there, after its min-max normalisation).

    The model is used in its current mode: call ``model.eval()`` first (pytorch-grad-cam's
    constructor switches the model to eval mode), so that batch norm / dropout do not make the
    scores depend on the batch.

    Args:
        model: the network containing ``layer``.
        forward: ``images -> scores`` (N×C×H×W -> N), one scalar target per input, e.g. a class
            logit (see :mod:`medtrust.xai.targets`); called on N = m·B inputs laid out as m copies
            of the batch (see Batching).
        layer: dotted module path inside ``model`` (resolved with
            :func:`medtrust.xai.cam.get_module`) or the module itself; its output must be B×K×h×w.
        images: B×C×H×W input images.
        batch_size: masked inputs per call of ``forward`` (rounded down to a multiple of B, at
            least B).
        skip_zero_channels: score the empty mask once per image instead of once per empty channel
            (exact; ``False`` scores every channel, as pytorch-grad-cam does).
        baseline: what masked-out pixels are replaced with, broadcastable to ``images``
            (default: zeros, i.e. ``images * mask``).
        weights: ``softmax`` (over channels, pytorch-grad-cam's convention) or ``score`` (the raw
            score of each masked input, as in Wang et al.'s reference code where the score is a
            class probability). Use ``score`` with a non-negative, unbounded target such as a
            segmentation's sum of sigmoid over a region: a softmax over sums of hundreds of pixels
            saturates on one channel. ``increase``: the score minus the score of the empty mask
            (Wang et al.'s "increase of confidence"), signed, so channels whose kept region
            *lowers* the target count against the map.

    Returns:
        B×H×W float map (>= 0, dtype of ``images``), on ``images``' device.

    Raises:
        KeyError: unknown layer path (the message lists the available module paths).
        TypeError: ``layer`` is neither a string nor a module, or ``images`` is not a tensor.
        ValueError: ``images`` not 4-D floating point, ``batch_size < 1``, a baseline that does not
            broadcast to ``images``, a layer output that is not B×K×h×w, or ``forward`` not
            returning one score per input.
        RuntimeError: ``layer`` is not called while ``forward`` runs.
    """
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.dim() != 4:
        raise ValueError(f"images must be 4-D (B×C×H×W), got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point, got dtype {images.dtype}")
    if weights not in ("softmax", "score", "increase"):
        raise ValueError(f"weights must be 'softmax', 'score' or 'increase', got {weights!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if isinstance(layer, str):
        module = get_module(model, layer)
    elif isinstance(layer, nn.Module):
        module = layer
    else:
        raise TypeError(f"layer must be a module path (str) or an nn.Module, got {type(layer).__name__}")
    if baseline is not None:
        try:
            baseline = torch.broadcast_to(baseline.to(images), images.shape)
        except RuntimeError as err:
            raise ValueError(f"baseline of shape {tuple(baseline.shape)} does not broadcast to images of shape "
                             f"{tuple(images.shape)}") from err

    b, size = images.shape[0], (images.shape[-2], images.shape[-1])
    acts = _capture(forward, module, images)
    k = acts.shape[1]
    acts_f = acts.float()
    mins, maxs = _upsampled_range(acts_f, size)
    empty = (maxs == mins) if skip_zero_channels else torch.zeros(b, k, dtype=torch.bool, device=acts.device)

    # Work list per image: -1 = the empty mask (scored once), then the channels that are kept.
    need_empty = weights == "increase"  # the baseline score of every image is the reference
    lists = [([-1] if bool(empty[i].any()) or need_empty else []) + torch.nonzero(~empty[i]).flatten().tolist() for i in range(b)]
    n_blocks = max(len(lst) for lst in lists)
    slots = torch.full((n_blocks, b), -2, dtype=torch.long)  # -2 = padding, scored and ignored
    for i, lst in enumerate(lists):
        slots[:len(lst), i] = torch.tensor(lst, dtype=torch.long)
    slots = slots.to(acts.device)

    scores = torch.empty(b, k, dtype=torch.float32, device=acts.device)
    empty_score = torch.empty(b, dtype=torch.float32, device=acts.device)
    per_call = max(1, batch_size // b)
    image_of = torch.arange(b, device=acts.device)
    diff = None if baseline is None else images - baseline
    for j0 in range(0, n_blocks, per_call):
        blocks = slots[j0:j0 + per_call]  # nb×B: block-major, so input j*B + i comes from image i
        nb = blocks.shape[0]
        img, chan = image_of.repeat(nb), blocks.flatten()
        real, chan0 = chan >= 0, chan.clamp_min(0)
        masks = F.interpolate(acts_f[img, chan0][:, None], size=size, mode="bilinear", align_corners=True)
        lo, hi = mins[img, chan0].view(-1, 1, 1, 1), maxs[img, chan0].view(-1, 1, 1, 1)
        masks.sub_(lo).div_(hi - lo + MASK_EPS)
        if not bool(real.all()):
            masks[~real] = 0.0  # the empty mask and padding
        masks = masks.to(images.dtype).view(nb, b, 1, *size)
        inputs = images[None] * masks if diff is None else baseline[None] + diff[None] * masks
        inputs = inputs.view(nb * b, *images.shape[1:])
        out = forward(inputs)
        if not isinstance(out, torch.Tensor) or out.shape != (inputs.shape[0],):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"forward must return one score per input ({inputs.shape[0]},), got {shape}")
        out = out.detach().float().to(acts.device)
        scores[img[real], chan[real]] = out[real]
        is_empty = chan == -1
        empty_score[img[is_empty]] = out[is_empty]

    scores = torch.where(empty, empty_score[:, None].expand(b, k), scores)
    if weights == "softmax":
        weights = torch.softmax(scores.double(), dim=1)
    elif weights == "increase":  # Wang et al.'s "increase of confidence" over the empty (baseline) input
        weights = scores.double() - empty_score.double()[:, None]
    else:
        weights = scores.double()
    cam = torch.relu(torch.einsum("bk,bkhw->bhw", weights, acts.double()))
    cam = F.interpolate(cam[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    return cam.clamp_min(0).to(device=images.device, dtype=images.dtype)
