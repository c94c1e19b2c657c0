"""Fitting one MIL head on bags: sampled mini-batches of padded bags, class
weights, early stopping on a validation part, seeded end to end."""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

from cytostore.mil.bags import DEFAULT_CACHE_BYTES, BagSet, sample_indices

EVAL_CELLS = 1 << 17  # cells per padded batch at inference (bounds activation memory, not results)


@dataclass(frozen=True)
class TrainConfig:
    """How a MIL head is trained."""

    model: str = "abmil"  # abmil or mean
    hidden: int = 128  # per-cell projection width
    attn_dim: int = 64  # gated-attention width (abmil)
    dropout: float = 0.25  # dropout after the per-cell projection
    input_norm: str = "layernorm"  # layernorm (per cell), standardize (training mean/std) or none
    epochs: int = 100  # most epochs per fit
    patience: int = 20  # epochs without a better validation loss before stopping
    lr: float = 2e-4  # AdamW learning rate
    weight_decay: float = 1e-2  # AdamW weight decay
    batch_bags: int = 4  # bags per optimiser step (padded, masked)
    max_cells: int = 512  # cells sampled per bag per epoch while training; 0 = all
    val_fraction: float = 0.2  # share of each training fold (grouped) used for early stopping
    class_weighting: bool = True  # weight the loss by inverse class frequency
    seed: int = 0  # seeds folds, sampling, initialisation and dropout
    device: str = "auto"  # auto, cpu or cuda
    cache_bytes: int = DEFAULT_CACHE_BYTES  # cache bags in RAM when they fit under this; else stream
    threads: int = 1  # CPU threads for torch (small heads run fastest on one; 0 = torch's default)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return asdict(self)


@dataclass
class FitResult:
    """A fitted head and how it got there."""

    model: Any  # the torch module, best weights loaded, in eval mode
    best_epoch: int  # 1-based epoch of the best validation loss (or the last epoch without validation)
    epochs_run: int  # epochs actually run
    history: list[dict[str, float]] = field(default_factory=list)  # per-epoch train/val loss


@contextlib.contextmanager
def torch_threads(n: int):
    """Runs the block with ``n`` torch CPU threads (0 = leave as is), then restores the setting."""
    import torch

    before = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def seed_everything(seed: int) -> None:
    """Seeds torch's global generator (initialisation, dropout)."""
    import torch

    torch.manual_seed(seed)


def class_weights(y: np.ndarray, n_classes: int) -> np.ndarray:
    """Inverse-frequency weights, n / (C * n_c); classes absent from ``y`` get 0."""
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    w = np.zeros(n_classes)
    present = counts > 0
    w[present] = len(y) / (present.sum() * counts[present])
    return w


def input_stats(bags: BagSet, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Feature mean and std over every cell of the given bags (one streaming pass)."""
    total = np.zeros(bags.dim)
    sq = np.zeros(bags.dim)
    n = 0
    for i in indices:
        feats = bags[int(i)].features
        for start in range(0, len(feats), 8192):  # float64 copies of a chunk, never of a whole big bag
            f = feats[start:start + 8192].astype(np.float64)
            total += f.sum(0)
            sq += (f * f).sum(0)
        n += len(feats)
    mean = total / max(n, 1)
    std = np.sqrt(np.maximum(sq / max(n, 1) - mean * mean, 0.0))
    return mean, std


def predict_proba(model, bags: BagSet, indices: Sequence[int], device) -> tuple[np.ndarray, list[np.ndarray]]:
    """Class probabilities (n, C) and per-bag attention, every cell of every bag used."""
    import torch

    from cytostore.mil.models import pad_bags

    model.eval()
    probs, attns = [], []
    group: list[Any] = []

    def flush() -> None:
        if not group:
            return
        x, mask = pad_bags([torch.from_numpy(np.asarray(f)) for f in group], dtype=None)
        with torch.inference_mode():
            logits, attn = model(x.to(device), mask.to(device))
        probs.append(torch.softmax(logits.float(), dim=1).cpu().numpy())
        for k, f in enumerate(group):
            attns.append(attn[k, : len(f)].float().cpu().numpy())
        group.clear()

    longest = 0
    for i in indices:
        f = bags[int(i)].features
        if group and max(longest, len(f)) * (len(group) + 1) > EVAL_CELLS:
            flush()
            longest = 0
        group.append(f)
        longest = max(longest, len(f))
    flush()
    n_classes = model.classifier.out_features
    return (np.concatenate(probs) if probs else np.zeros((0, n_classes))), attns


def weighted_nll(proba: np.ndarray, y: np.ndarray, weights: np.ndarray) -> float:
    """Class-weighted cross-entropy of predicted probabilities (as torch computes it)."""
    w = weights[y]
    p = np.clip(proba[np.arange(len(y)), y], 1e-12, 1.0)
    return float((w * -np.log(p)).sum() / max(w.sum(), 1e-12))


def make_head(bags: BagSet, y: np.ndarray, train_idx: np.ndarray, n_classes: int, cfg: TrainConfig, device):
    """A fresh head (input stats from the training bags), its AdamW optimiser, weighted loss and class weights."""
    import torch

    from cytostore.mil.models import ModelConfig, build_model

    mcfg = ModelConfig(kind=cfg.model, in_dim=bags.dim, n_classes=n_classes, hidden=cfg.hidden,
                       attn_dim=cfg.attn_dim, dropout=cfg.dropout, input_norm=cfg.input_norm)
    model = build_model(mcfg)
    mean, std = input_stats(bags, train_idx)
    model.set_input_stats(torch.from_numpy(mean).float(), torch.from_numpy(std).float())
    model.to(device)
    w = class_weights(y[train_idx], n_classes) if cfg.class_weighting else np.ones(n_classes)
    loss_fn = torch.nn.CrossEntropyLoss(weight=torch.tensor(w, dtype=torch.float32, device=device))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return model, opt, loss_fn, w


def run_epoch(model, opt, loss_fn, bags: BagSet, y: np.ndarray, train_idx: np.ndarray, cfg: TrainConfig,
              rng: np.random.Generator, device) -> float:
    """One pass over the training bags in a random order; returns the mean training loss.

    Each step pads ``cfg.batch_bags`` bags of at most ``cfg.max_cells`` sampled cells.
    """
    import torch

    from cytostore.mil.models import pad_bags

    model.train()
    order = rng.permutation(train_idx)
    total, seen = 0.0, 0
    for start in range(0, len(order), cfg.batch_bags):
        chunk = order[start:start + cfg.batch_bags]
        feats = []
        for i in chunk:
            f = bags[int(i)].features
            feats.append(torch.from_numpy(np.ascontiguousarray(f[sample_indices(len(f), cfg.max_cells, rng)])))
        x, mask = pad_bags(feats)
        logits, _ = model(x.to(device), mask.to(device))
        loss = loss_fn(logits, torch.from_numpy(y[chunk]).to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += float(loss.detach()) * len(chunk)
        seen += len(chunk)
    return total / max(seen, 1)


def fit(bags: BagSet, y: np.ndarray, train_idx: Sequence[int], val_idx: Sequence[int], n_classes: int,
        cfg: TrainConfig, epochs: int | None = None, seed: int | None = None) -> FitResult:
    """Trains one head on ``train_idx`` bags, early-stopping on ``val_idx`` (when any).

    Args:
        bags: every bag (indexed like ``y``).
        y: class index per bag.
        train_idx, val_idx: bag positions to train on and to validate on.
        n_classes: number of classes.
        cfg: hyper-parameters.
        epochs: fixed number of epochs (overrides ``cfg.epochs``; used without validation).
        seed: seed of this fit (default ``cfg.seed``).
    """
    import torch

    from cytostore.embed import resolve_device

    seed = cfg.seed if seed is None else seed
    device = torch.device(resolve_device(cfg.device))
    seed_everything(seed)
    train_idx = np.asarray(train_idx, dtype=np.int64)
    val_idx = np.asarray(val_idx, dtype=np.int64)
    model, opt, loss_fn, w = make_head(bags, y, train_idx, n_classes, cfg, device)
    n_epochs = epochs if epochs is not None else cfg.epochs
    rng = np.random.default_rng(seed)
    best = (math.inf, 0, None)  # (val loss, epoch, state)
    history = []
    epoch = 0
    for epoch in range(1, n_epochs + 1):
        train_loss = run_epoch(model, opt, loss_fn, bags, y, train_idx, cfg, rng, device)
        record = {"epoch": epoch, "train_loss": train_loss}
        if len(val_idx):
            proba, _ = predict_proba(model, bags, val_idx, device)
            record["val_loss"] = weighted_nll(proba, y[val_idx], w)
            if record["val_loss"] < best[0] - 1e-6:
                best = (record["val_loss"], epoch, copy.deepcopy(model.state_dict()))
            elif epoch - best[1] >= cfg.patience:
                history.append(record)
                break
        history.append(record)
    if best[2] is not None:
        model.load_state_dict(best[2])
        best_epoch = best[1]
    else:
        best_epoch = epoch
    model.eval()
    return FitResult(model=model, best_epoch=best_epoch, epochs_run=epoch, history=history)


def slide_metrics(y: np.ndarray, proba: np.ndarray, n_classes: int) -> dict[str, float]:
    """accuracy, balanced accuracy and macro one-vs-rest AUC of slide predictions.

    AUC averages the classes that have both positive and negative slides in ``y``
    (NaN when none has).
    """
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    pred = proba.argmax(1)
    out = {"n": int(len(y)), "accuracy": float((pred == y).mean()),
           "balanced_accuracy": float(balanced_accuracy_score(y, pred))}
    aucs = []
    for c in range(n_classes):
        pos = y == c
        if 0 < pos.sum() < len(y):
            aucs.append(roc_auc_score(pos, proba[:, c]))
    if n_classes == 2 and aucs:
        aucs = aucs[1:]  # both one-vs-rest AUCs are equal with two classes
    out["auc"] = float(np.mean(aucs)) if aucs else float("nan")
    return out
