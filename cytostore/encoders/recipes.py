"""Training recipes: self-supervised (SimCLR-style) or supervised (linear probe, then fine-tune).

``cpu``: native cell size input, batch-norm statistics re-estimated on the cells, the frozen
trunk run once over a few augmented views of every cell (cached float16 maps), and only
the last stages + head convolution trained on those maps. ``gpu``: the same losses on the
whole network from pixels, every step drawing fresh augmentations, bf16 autocast.
Both keep the base architecture and output dimension: the result is a plain checkpoint.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np

from cytostore.encoders import adapt

Tick = Callable[[str, int, int], None]


def nt_xent(z1, z2, temperature: float):
    """SimCLR's normalised-temperature cross-entropy over a batch of positive pairs."""
    import torch
    import torch.nn.functional as F

    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    n = len(z1)
    sim = z @ z.T / temperature
    sim.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)


def class_weights(y: np.ndarray, n_classes: int):
    """Inverse square-root class frequency, mean 1 (rare classes count more, without exploding)."""
    import torch

    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    w = np.where(counts > 0, 1 / np.sqrt(np.maximum(counts, 1)), 0.0)
    w = w / w[counts > 0].mean()
    return torch.tensor(w, dtype=torch.float32)


def _projector(dim: int, device):
    import torch.nn as nn

    return nn.Sequential(nn.Linear(dim, 512), nn.BatchNorm1d(512), nn.ReLU(inplace=True),
                         nn.Linear(512, 128)).to(device)


def _loop(params: list[dict], steps: int, step: Callable[[int], Any], tick: Tick, phase: str,
          warmup: int) -> list[float]:
    """AdamW with warm-up and cosine decay over ``steps``; returns the mean loss of each tenth."""
    import torch

    opt = torch.optim.AdamW(params, weight_decay=1e-4)
    base = [g["lr"] for g in opt.param_groups]
    losses, acc, n = [], 0.0, 0
    every = max(1, steps // 10)
    for i in range(steps):
        f = adapt.cosine_schedule(i, steps, warmup)
        for g, lr in zip(opt.param_groups, base):
            g["lr"] = lr * f
        loss = step(i)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        acc, n = acc + float(loss.detach()), n + 1
        if (i + 1) % every == 0 or i + 1 == steps:
            losses.append(round(acc / n, 4))
            acc, n = 0.0, 0
        tick(phase, i + 1, steps)
    return losses


def _refresh_head_bn(head, maps, batch: int, device) -> None:
    """Re-estimates the head's batch-norm statistics on plain (view 0) maps after training."""
    import torch
    import torch.nn as nn

    bns = [m for m in head.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    head.train()
    with torch.no_grad():
        for s in range(0, len(maps), batch):
            if len(maps[s:s + batch]) > 1:
                head(maps[s:s + batch].to(device).float())
    for m in bns:
        m.momentum = 0.1
    head.eval()


def _bn_sample(pixels: np.ndarray, p: dict[str, Any]) -> np.ndarray:
    """At most ``bn_cells`` crops (a seeded sample): batch-norm statistics settle well before thousands."""
    n = p.get("bn_cells") or len(pixels)
    if len(pixels) <= n:
        return pixels
    return pixels[np.sort(np.random.default_rng(p["seed"]).choice(len(pixels), size=n, replace=False))]


def run_cpu(model, pixels: np.ndarray, labels: np.ndarray | None, mean, std, p: dict[str, Any],
            tick: Tick) -> dict[str, Any]:
    """The CPU recipe; trains ``model`` in place. ``labels``: class indices, or None for self-supervised."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(p["seed"])
    dev = torch.device("cpu")
    t0 = time.perf_counter()
    adapt.reestimate_bn(model, _bn_sample(pixels, p), mean, std,
                        progress=lambda d, t: tick("batch-norm statistics", d, t))
    split = adapt.Split(model, p["train_blocks"])
    for q in split.trunk.parameters():
        q.requires_grad_(False)
    maps = adapt.cache_maps(split.trunk, pixels, p["views"], mean, std, p["seed"], p["augment"], p["background"],
                            progress=lambda d, t: tick("trunk maps (cached views)", d, t))
    t_cache = time.perf_counter() - t0
    n, views, b = len(pixels), p["views"], min(p["batch_size"], len(pixels))
    rng = np.random.default_rng(p["seed"])
    steps = max(1, p["epochs"] * (n // b))
    dim = int(model.num_features)
    out: dict[str, Any] = {"seconds_bn_and_cache": round(t_cache, 1), "cache_mb": round(maps.numel() * 2 / 1e6, 1),
                           "steps": steps}
    if labels is None:
        proj = _projector(dim, dev)

        def step(_i):
            idx = rng.choice(n, size=b, replace=False)
            v1 = rng.integers(0, views, size=b)
            v2 = (v1 + rng.integers(1, views, size=b)) % views if views > 1 else v1
            split.head.train()
            z1 = proj(split.head(maps[v1, idx].float()))
            z2 = proj(split.head(maps[v2, idx].float()))
            return nt_xent(z1, z2, p["temperature"])

        params = [{"params": split.head_parameters(), "lr": p["lr"]}, {"params": proj.parameters(), "lr": p["lr"] * 10}]
        out["loss"] = _loop(params, steps, step, tick, "self-supervised (SimCLR on cached maps)", max(1, steps // 20))
    else:
        k = int(labels.max()) + 1
        y = torch.from_numpy(labels.astype(np.int64))
        w = class_weights(labels, k)
        split.head.eval()
        with torch.no_grad():
            feats = torch.cat([split.head(maps[0, s:s + 256].float()) for s in range(0, n, 256)])
        clf = torch.nn.Linear(dim, k)
        lp_steps = 300

        def lp_step(_i):
            idx = torch.from_numpy(rng.choice(n, size=b, replace=False))
            return F.cross_entropy(clf(feats[idx]), y[idx], weight=w)

        out["loss_probe"] = _loop([{"params": clf.parameters(), "lr": 1e-2}], lp_steps, lp_step, tick,
                                  "linear probe (frozen)", 10)

        def ft_step(_i):
            idx = rng.choice(n, size=b, replace=False)
            v = rng.integers(0, views, size=b)
            split.head.eval()  # frozen BN statistics: the probe was fitted on them, the batches are small
            logits = clf(split.head(maps[v, idx].float()))
            return F.cross_entropy(logits, y[torch.from_numpy(idx)], weight=w, label_smoothing=0.1)

        params = [{"params": split.head_parameters(), "lr": p["lr"]}, {"params": clf.parameters(), "lr": p["lr"] * 10}]
        out["loss"] = _loop(params, steps, ft_step, tick, "fine-tune last stages", max(1, steps // 20))
    if labels is None:
        _refresh_head_bn(split.head, maps[0], 256, dev)
    for q in model.parameters():
        q.requires_grad_(True)
    model.eval()
    out["seconds_train"] = round(time.perf_counter() - t0 - t_cache, 1)
    return out


def run_gpu(model, pixels: np.ndarray, labels: np.ndarray | None, mean, std, p: dict[str, Any],
            tick: Tick) -> dict[str, Any]:
    """The GPU recipe: the whole network trained from pixels, fresh augmentations each step, bf16."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(p["seed"])
    dev = torch.device(p["device"])
    t0 = time.perf_counter()
    model.to(dev)
    adapt.reestimate_bn(model, pixels, mean, std, device=dev, progress=lambda d, t: tick("batch-norm statistics", d, t))
    data = torch.from_numpy(np.ascontiguousarray(pixels)).to(dev).permute(0, 3, 1, 2)  # uint8 on the device
    gen = torch.Generator().manual_seed(p["seed"])
    n, b = len(pixels), min(p["batch_size"], len(pixels))
    rng = np.random.default_rng(p["seed"])
    steps = max(1, p["epochs"] * (n // b))
    dim = int(model.num_features)
    amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")

    def view(idx):
        x = data[torch.from_numpy(idx).to(dev)].float().div_(255)
        return adapt.normalise(adapt.augment(x, gen, p["augment"], p["background"]), mean, std)

    out: dict[str, Any] = {"steps": steps}
    if labels is None:
        proj = _projector(dim, dev)

        def step(_i):
            idx = rng.choice(n, size=b, replace=False)
            model.train()
            with amp:
                z1, z2 = proj(model(view(idx))), proj(model(view(idx)))
            return nt_xent(z1, z2, p["temperature"])

        params = [{"params": model.parameters(), "lr": p["lr"]}, {"params": proj.parameters(), "lr": p["lr"] * 10}]
        out["loss"] = _loop(params, steps, step, tick, "self-supervised (SimCLR, whole network)", max(1, steps // 20))
    else:
        k = int(labels.max()) + 1
        y = torch.from_numpy(labels.astype(np.int64)).to(dev)
        w = class_weights(labels, k).to(dev)
        clf = torch.nn.Linear(dim, k).to(dev)

        def step(_i):
            idx = rng.choice(n, size=b, replace=False)
            model.train()
            with amp:
                logits = clf(model(view(idx)))
            return F.cross_entropy(logits.float(), y[torch.from_numpy(idx).to(dev)], weight=w, label_smoothing=0.1)

        params = [{"params": model.parameters(), "lr": p["lr"]}, {"params": clf.parameters(), "lr": p["lr"] * 10}]
        out["loss"] = _loop(params, steps, step, tick, "fine-tune whole network", max(1, steps // 20))
    adapt.reestimate_bn(model, pixels, mean, std, device=dev)
    model.to("cpu").eval()
    out["seconds_train"] = round(time.perf_counter() - t0, 1)
    return out
