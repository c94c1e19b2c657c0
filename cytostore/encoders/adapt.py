"""The pieces encoder training is made of: training crops, cell augmentations, the split of
a backbone into a frozen trunk and trainable last stages, batch-norm re-estimation.

Crops are re-read from the source images (``image``, ``x``, ``y``, ``crop_size``), with the
crop rule ingest uses, so the encoder trains on the very pixels ingest will later feed it
(the stored thumbnails are 64 px JPEGs: lossy, and smaller than most crops). A cell whose
source cannot be read falls back to its thumbnail, and the count is reported.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from cytostore.errors import CytostoreError, EncoderError


def load_crops(rows: dict[str, list], size: int, interpolation: str, source: str = "auto",
               progress: Callable[[int, int], None] | None = None) -> tuple[np.ndarray, dict[str, int]]:
    """uint8 crops (N, size, size, 3) of the cells in ``rows``, and where they came from.

    Args:
        rows: columns ``image``, ``x``, ``y``, ``crop_size``, ``thumbnail`` (lists, one entry per cell).
        source: ``auto`` (source image, thumbnail when unreadable), ``images`` or ``thumbnails``.
    """
    from cytostore.imaging import crop_cell, decode_thumbnail, open_image, resize

    n = len(rows["thumbnail"])
    out = np.zeros((n, size, size, 3), dtype=np.uint8)
    counts = {"from_images": 0, "from_thumbnails": 0}
    by_image: dict[str, list[int]] = {}
    for i, path in enumerate(rows["image"]):
        by_image.setdefault(str(path), []).append(i)
    done = 0
    for path, idx in by_image.items():
        img = None
        if source != "thumbnails":
            try:
                img = open_image(path)
            except CytostoreError:
                if source == "images":
                    raise
        try:
            for i in idx:
                crop = None
                if img is not None:
                    try:
                        crop = crop_cell(img, float(rows["x"][i]), float(rows["y"][i]), int(rows["crop_size"][i]))
                        counts["from_images"] += 1
                    except CytostoreError:
                        crop = None
                if crop is None:
                    thumb = rows["thumbnail"][i]
                    if not thumb:
                        raise EncoderError(f"cell {i} of {path}: no readable source image and no thumbnail")
                    crop = decode_thumbnail(thumb)
                    counts["from_thumbnails"] += 1
                out[i] = resize(crop, size, interpolation)
        finally:
            if img is not None:
                img.close()
        done += len(idx)
        if progress:
            progress(done, n)
    return out, counts


def to_tensor(pixels: np.ndarray, mean, std, device="cpu"):
    """uint8 NHWC -> normalised float NCHW."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(pixels)).to(device).permute(0, 3, 1, 2).float().div_(255)
    m = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=device).view(1, 3, 1, 1)
    return (x - m) / s


def dihedral(x, k: int):
    """The k-th of the 8 rotations/flips of a NCHW batch (k in 0..7)."""
    import torch

    x = torch.rot90(x, k % 4, dims=(2, 3))
    return torch.flip(x, dims=(3,)) if k >= 4 else x


def augment(x, gen, strength: float = 1.0, background: float = 0.5):
    """Cell augmentations of a batch of 0..1 float images (NCHW), one draw per image.

    A random dihedral transform (cells have no orientation), a small scale change and
    shift, colour jitter in the spirit of stain variation (brightness, contrast, per-channel
    gain, saturation), and, with probability ``background``, the Cyto-SSL perturbation: the
    surroundings of the centred cell (outside a soft disc) replaced by those of another
    cell of the batch, so the encoder cannot lean on neighbours or the field's background.
    """
    import torch
    import torch.nn.functional as F

    n, _, h, w = x.shape
    dev = x.device

    def u(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(*(shape or (n,)), generator=gen, device="cpu").to(dev)

    ks = torch.randint(0, 8, (n,), generator=gen)
    x = torch.stack([dihedral(x[i:i + 1], int(k))[0] for i, k in enumerate(ks.tolist())])
    scale = u(1 - 0.12 * strength, 1 + 0.12 * strength)
    shift = u(-0.05 * strength, 0.05 * strength, n, 2)
    theta = torch.zeros(n, 2, 3, device=dev)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    if background > 0:
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, h, device=dev), torch.linspace(-1, 1, w, device=dev),
                                indexing="ij")
        r = torch.sqrt(xx ** 2 + yy ** 2)
        radius = u(0.55, 0.8).view(n, 1, 1, 1)
        mask = torch.sigmoid((radius - r.view(1, 1, h, w)) / 0.06)  # 1 on the cell, 0 outside
        other = x[torch.randperm(n, generator=gen).to(dev)]
        swap = (torch.rand(n, generator=gen) < background).to(dev).float().view(n, 1, 1, 1)
        x = x * (1 - swap) + swap * (mask * x + (1 - mask) * other)
    gray = x.mean(dim=1, keepdim=True)
    sat = u(1 - 0.3 * strength, 1 + 0.3 * strength).view(n, 1, 1, 1)
    x = gray + (x - gray) * sat
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = mean + (x - mean) * u(1 - 0.25 * strength, 1 + 0.25 * strength).view(n, 1, 1, 1)
    x = x * u(1 - 0.2 * strength, 1 + 0.2 * strength).view(n, 1, 1, 1)
    x = x * u(1 - 0.08 * strength, 1 + 0.08 * strength, n, 3).view(n, 3, 1, 1)
    return x.clamp_(0, 1)


def normalise(x, mean, std):
    """(x - mean) / std of a 0..1 NCHW batch."""
    import torch

    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


class Split:
    """A timm EfficientNet/MobileNet-family model cut into a frozen trunk and trainable last stages.

    ``trunk(x)`` gives the feature map after block ``len(blocks) - train_blocks``;
    ``head(maps)`` runs the last ``train_blocks`` stages, the head convolution and the
    global pool, giving the model's own (N, num_features) output. Both share the model's
    modules, so training the head trains the model in place and its state dict stays a
    checkpoint of the original architecture.
    """

    def __init__(self, model: Any, train_blocks: int):
        import torch.nn as nn

        need = ("conv_stem", "bn1", "blocks", "conv_head", "bn2", "global_pool")
        if not all(hasattr(model, a) for a in need):
            raise EncoderError(f"the CPU recipe trains the last stages of an EfficientNet/MobileNet-family timm model "
                               f"({type(model).__name__} is not one); use --recipe gpu, or --base efficientnet_lite0")
        nb = len(model.blocks)
        if not 1 <= train_blocks <= nb:
            raise EncoderError(f"--train-blocks must be 1..{nb} for {type(model).__name__}, got {train_blocks}")
        cut = nb - train_blocks
        self.model = model
        self.trunk = nn.Sequential(model.conv_stem, model.bn1, *model.blocks[:cut])
        self.head = nn.Sequential(*model.blocks[cut:], model.conv_head, model.bn2, model.global_pool)
        self.cut = cut

    def head_parameters(self) -> list:
        return [p for p in self.head.parameters()]


def reestimate_bn(model: Any, pixels: np.ndarray, mean, std, batch: int = 128, device="cpu",
                  progress: Callable[[int, int], None] | None = None) -> int:
    """Re-estimates every batch-norm's running mean and variance on ``pixels`` (no labels, no gradients).

    Each crop is seen once under a random dihedral transform; the statistics are the
    cumulative average over all batches (momentum None). Returns the number of BN layers.
    """
    import torch
    import torch.nn as nn

    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    n = len(pixels)
    with torch.no_grad():
        for s in range(0, n, batch):
            x = to_tensor(pixels[s:s + batch], mean, std, device)
            if len(x) < 2:
                continue
            model(dihedral(x, (s // batch) % 8))
            if progress:
                progress(min(s + batch, n), n)
    for m in bns:
        m.momentum = 0.1
    model.eval()
    return len(bns)


def cache_maps(trunk: Any, pixels: np.ndarray, views: int, mean, std, seed: int, strength: float,
               background: float, batch: int = 128, device="cpu",
               progress: Callable[[int, int], None] | None = None):
    """Trunk feature maps of ``views`` augmented views of each crop: float16 (views, N, C, H, W).

    View 0 is the plain crop under dihedral transform 0..7 in turn (no colour change); the
    others are drawn by :func:`augment`.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    n = len(pixels)
    trunk.eval()
    out = None
    total = views * n
    with torch.inference_mode():
        for v in range(views):
            for s in range(0, n, batch):
                x = torch.from_numpy(np.ascontiguousarray(pixels[s:s + batch])).to(device).permute(0, 3, 1, 2)
                x = x.float().div_(255)
                x = dihedral(x, (s // batch + v) % 8) if v == 0 else augment(x, gen, strength, background)
                f = trunk(normalise(x, mean, std)).to(torch.float16).cpu()
                if out is None:
                    out = torch.empty((views, n, *f.shape[1:]), dtype=torch.float16)
                out[v, s:s + len(f)] = f
                if progress:
                    progress(v * n + s + len(f), total)
    return out


def cosine_schedule(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor: linear warm-up, then cosine decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
