"""What an encoder outputs per cell: multi-layer pooled features and dihedral
test-time augmentation, both inside one ``nn.Module`` around the backbone.

``FeatureModel`` wraps a timm backbone and returns ``(N, dim)`` like the bare
model, so every runtime that runs ``encoder.model`` (torch, or an exported ONNX
graph) computes the same thing:

- ``features="multilayer"``: the spatially averaged outputs of the backbone's
  later stages, concatenated with its final pooled features, in one forward
  (EfficientNet-Lite0: stages ending at blocks 4, 7, 10, 14, 15 + head = 2,024-d);
- ``tta=4`` (the four 90-degree rotations) or ``tta=8`` (and their mirror
  images): the mean of the embeddings of every view, computed as one batch of
  ``tta x N`` crops. Cells have no orientation, so a rotated or mirrored cell
  then embeds the same;
- ``zoom=2`` (two scales): the central half of each crop, enlarged back to the
  input size, is embedded too and its features are concatenated after the whole
  crop's: the cell's detail beside its context, at twice the cost and dimension.

``with_options`` returns an encoder whose ``arch`` names the options
(``tf_efficientnet_lite0+multilayer+tta4``): ``arch`` is part of a table's
identity, so rows made with other options are refused on append.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from cytostore.encoders.registry import Encoder
from cytostore.errors import InputError

FEATURES = ("final", "multilayer")
TTA = (1, 4, 8)
ZOOMS = (1, 2)
STAGES = 5  # later stages pooled by "multilayer" (the last five of EfficientNet's seven)


class FeatureModel(torch.nn.Module):
    """A backbone returning multi-layer pooled features, averaged over dihedral views.

    Args:
        backbone: a timm model built with ``num_classes=0``.
        features: ``final`` (the backbone's pooled output) or ``multilayer``.
        tta: 1 (off), 4 (rotations) or 8 (rotations and flips).
        zoom: 1 (the crop alone) or 2 (the crop, then its central half enlarged).
    """

    def __init__(self, backbone: Any, features: str = "final", tta: int = 1, zoom: int = 1):
        super().__init__()
        if features not in FEATURES:
            raise InputError(f"unknown --features {features!r}; use one of {', '.join(FEATURES)}")
        if tta not in TTA:
            raise InputError(f"--tta must be 1 (off), 4 or 8, got {tta}")
        if zoom not in ZOOMS:
            raise InputError(f"--zoom must be 1 (off) or 2, got {zoom}")
        self.zoom = zoom
        self.backbone = backbone
        self.features = features
        self.tta = tta
        blocks = getattr(backbone, "blocks", None)
        self.staged = features == "multilayer" and all(
            hasattr(backbone, a) for a in ("conv_stem", "bn1", "blocks", "conv_head", "bn2", "global_pool"))
        if features == "multilayer" and not self.staged and not hasattr(backbone, "forward_intermediates"):
            raise InputError(f"--features multilayer needs an EfficientNet/MobileNet-like timm model or one with "
                             f"forward_intermediates; {type(backbone).__name__} has neither; use --features final")
        n = len(blocks) if self.staged else 0
        self.taps = tuple(range(max(0, n - STAGES), n))  # stage indices whose outputs are pooled

    def extra_repr(self) -> str:
        return f"features={self.features}, tta={self.tta}, zoom={self.zoom}, taps={self.taps}"

    def embed(self, x):
        """Features of one view, (N, dim)."""
        b = self.backbone
        if self.features == "final":
            return b(x)
        if self.staged:
            x = b.bn1(b.conv_stem(x))
            pooled = []
            for i, stage in enumerate(b.blocks):
                x = stage(x)
                if i in self.taps:
                    pooled.append(x.mean(dim=(2, 3)))
            x = b.bn2(b.conv_head(x))
            pooled.append(b.global_pool(x).flatten(1))
            return torch.cat(pooled, dim=1)
        final, inter = b.forward_intermediates(x, indices=STAGES)
        pooled = [t.mean(dim=(2, 3)) if t.ndim == 4 else t.mean(dim=1) for t in inter]
        pooled.append(b.forward_head(final, pre_logits=True))
        return torch.cat(pooled, dim=1)

    def forward(self, x):
        """(N, 3, S, S) normalised crops -> (N, dim) embeddings."""
        out = self.views(x)
        if self.zoom == 1:
            return out
        side = x.shape[-1]
        inner = side // self.zoom
        off = (side - inner) // 2  # centred: a rotated crop has the rotated centre, so TTA stays invariant
        centre = torch.nn.functional.interpolate(x[:, :, off:off + inner, off:off + inner], size=(side, side),
                                                 mode="bilinear", align_corners=False)
        return torch.cat([out, self.views(centre)], dim=1)

    def views(self, x):
        """The embedding of one scale, averaged over the dihedral views (``tta``)."""
        if self.tta == 1:
            return self.embed(x)
        views = dihedral_views(x, self.tta)
        out = self.embed(torch.cat(views, dim=0))
        return out.reshape(self.tta, x.shape[0], out.shape[1]).mean(dim=0)


def dihedral_views(x, n: int) -> list:
    """The ``n`` (4: rotations; 8: rotations of the image and of its mirror) views of a (N, C, H, W) batch."""
    # Rotations as flips and transposes: ONNX has no rot90, and these export as Slice/Transpose.
    out = []
    for b in ([x] if n == 4 else [x, x.flip(3)]):
        for _ in range(4):
            out.append(b)
            b = b.flip(3).transpose(2, 3)  # 90 degrees counter-clockwise, as torch.rot90(b, 1, (2, 3))
    return out


def options_identity(features: str = "final", tta: int = 1, zoom: int = 1) -> str:
    """The suffix these options add to an encoder's ``arch`` ('' for the defaults)."""
    return (("+multilayer" if features == "multilayer" else "") + (f"+tta{tta}" if tta > 1 else "")
            + (f"+zoom{zoom}" if zoom > 1 else ""))


def with_options(encoder: Encoder, features: str = "final", tta: int = 1, zoom: int = 1) -> Encoder:
    """The encoder with ``FeatureModel`` around its model; itself when both options are the defaults.

    ``weights_sha256`` stays the backbone's; ``arch``, ``dim`` and ``name`` say what
    was added, and ``extra["features"]`` describes it.
    """
    if features == "final" and tta == 1 and zoom == 1:
        return encoder
    model = FeatureModel(encoder.model, features, int(tta), int(zoom)).eval()
    with torch.inference_mode():
        dim = int(model(torch.zeros(1, 3, encoder.input_size, encoder.input_size)).shape[1])
    suffix = options_identity(features, int(tta), int(zoom))
    extra = dict(encoder.extra)
    extra["features"] = {"features": features, "tta": int(tta), "zoom": int(zoom), "stages": list(model.taps) if model.staged else None,
                         "backbone_dim": encoder.dim}
    return dataclasses.replace(encoder, name=encoder.name + suffix.replace("+", "_"), arch=encoder.arch + suffix,
                               model=model, dim=dim, extra=extra)
