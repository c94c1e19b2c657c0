"""MIL heads over padded bags of cell embeddings: gated-attention ABMIL and mean pooling.

Every model takes ``x`` (B, N, D) float32 and ``mask`` (B, N) bool (True = a real
cell) and returns ``(logits (B, C), attention (B, N))``. Padded positions are
zeroed before any layer and get ``-inf`` attention logits, so a bag padded with
junk gives the same output as the bag alone.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from cytostore.errors import InputError

INPUT_NORMS = ("none", "standardize", "layernorm")  # standardize: by the training cells' mean and std
INFER_CHUNK = 8192  # cells projected at once at inference


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a MIL head."""

    kind: str = "abmil"  # abmil or mean
    in_dim: int = 1280  # embedding dimension of the feature table
    n_classes: int = 2  # number of slide classes
    hidden: int = 128  # width of the per-cell projection
    attn_dim: int = 64  # width of the gated-attention branches (abmil)
    dropout: float = 0.25  # dropout after the per-cell projection
    input_norm: str = "layernorm"  # none, standardize or layernorm

    def to_dict(self) -> dict:
        """JSON-ready fields."""
        return asdict(self)


class _Head(nn.Module):
    """Input normalisation + per-cell projection shared by every kind."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.input_norm not in INPUT_NORMS:
            raise InputError(f"unknown input_norm {cfg.input_norm!r}; use one of {INPUT_NORMS}")
        self.cfg = cfg
        # Filled from the training cells by set_input_stats; saved with the weights.
        self.register_buffer("feat_mean", torch.zeros(cfg.in_dim))
        self.register_buffer("feat_scale", torch.ones(cfg.in_dim))
        self.norm = nn.LayerNorm(cfg.in_dim) if cfg.input_norm == "layernorm" else nn.Identity()
        self.project = nn.Sequential(nn.Linear(cfg.in_dim, cfg.hidden), nn.ReLU(), nn.Dropout(cfg.dropout))
        self.classifier = nn.Linear(cfg.hidden, cfg.n_classes)

    def set_input_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Stores the training cells' feature mean and std (used by ``standardize``)."""
        self.feat_mean.copy_(mean)
        self.feat_scale.copy_(1.0 / std.clamp_min(1e-3))

    def embed(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, N, D) cells (any float dtype) -> (B, N, hidden) float32; padded rows come out finite.

        Without autograd (inference) the cells go through in chunks, so a 100k-cell
        bag never exists as float32 temporaries of its full size.
        """
        n = x.shape[1]
        if torch.is_grad_enabled() or n <= INFER_CHUNK:
            return self._embed(x, mask)
        return torch.cat([self._embed(x[:, i:i + INFER_CHUNK], mask[:, i:i + INFER_CHUNK])
                          for i in range(0, n, INFER_CHUNK)], dim=1)

    def _embed(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = torch.where(mask.unsqueeze(-1), x.float(), torch.zeros((), dtype=torch.float32, device=x.device))
        if self.cfg.input_norm == "standardize":
            x = (x - self.feat_mean) * self.feat_scale
        return self.project(self.norm(x))


class ABMIL(_Head):
    """Gated-attention MIL (Ilse, Tomczak & Welling, ICML 2018).

    a_k = softmax_k( w^T (tanh(V h_k) * sigmoid(U h_k)) ), z = sum_k a_k h_k.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.attn_v = nn.Linear(cfg.hidden, cfg.attn_dim)
        self.attn_u = nn.Linear(cfg.hidden, cfg.attn_dim)
        self.attn_w = nn.Linear(cfg.attn_dim, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.embed(x, mask)
        scores = self.attn_w(torch.tanh(self.attn_v(h)) * torch.sigmoid(self.attn_u(h))).squeeze(-1)
        scores = scores.masked_fill(~mask, float("-inf"))
        attn = torch.softmax(scores, dim=1)
        z = torch.bmm(attn.unsqueeze(1), h).squeeze(1)
        return self.classifier(z), attn


class MeanMIL(_Head):
    """Mean pooling of the projected cells: the baseline every attention model must beat."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.embed(x, mask)
        w = mask.to(h.dtype)
        attn = w / w.sum(dim=1, keepdim=True).clamp_min(1.0)
        z = torch.bmm(attn.unsqueeze(1), h).squeeze(1)
        return self.classifier(z), attn


MODELS: dict[str, type[_Head]] = {"abmil": ABMIL, "mean": MeanMIL}


def build_model(cfg: ModelConfig) -> _Head:
    """The MIL head named by ``cfg.kind``."""
    if cfg.kind not in MODELS:
        raise InputError(f"unknown MIL model {cfg.kind!r}; use one of {sorted(MODELS)}")
    return MODELS[cfg.kind](cfg)


def pad_bags(bags: list[torch.Tensor], fill: float = 0.0,
             dtype: torch.dtype | None = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacks (n_i, D) bags into (B, max n, D) with a (B, max n) mask of real cells.

    ``dtype=None`` keeps the bags' dtype (float16 stays float16; the model casts
    in chunks); a single bag is then a view, not a copy.
    """
    dtype = dtype or bags[0].dtype
    if len(bags) == 1 and bags[0].dtype == dtype:
        return bags[0].unsqueeze(0), torch.ones((1, bags[0].shape[0]), dtype=torch.bool)
    n = max(int(b.shape[0]) for b in bags)
    dim = int(bags[0].shape[1])
    x = torch.full((len(bags), n, dim), fill, dtype=dtype)
    mask = torch.zeros((len(bags), n), dtype=torch.bool)
    for i, b in enumerate(bags):
        x[i, : b.shape[0]] = b.to(dtype)
        mask[i, : b.shape[0]] = True
    return x, mask
