"""One MIL training epoch from stored features against one that re-embeds every cell.

Cached: one ABMIL epoch (mini-batches of padded bags, --max-cells sampled cells
per bag, forward + backward + AdamW) over every slide of the store, with the
bags in RAM, and again streaming each bag from Lance. Re-embedding: for a subset
of slides, read the field image, crop each sampled cell as the table records it
(x, y, crop_size), resize, run the table's encoder on the CPU in full batches of 64
(cells of all the subset's slides packed together), then
the same MIL step; the time per cell is extrapolated to the epoch's cells.

With --big-bag N it instead checks memory: a generated store (random 1280-d
features, not real data) with one N-cell bag is trained (bags streamed, N cells
sampled down to --max-cells) and predicted (all N cells); peak RSS is printed.

Usage: python benchmarks/mil_epoch_speed.py --store runs/diseases-store [--subset 4] [--epochs 3]
       python benchmarks/mil_epoch_speed.py --big-bag 100000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cytostore.mil.bags import BagSet, sample_indices, slides_filter, store_slides  # noqa: E402
from cytostore.mil.train import TrainConfig, make_head, run_epoch, torch_threads  # noqa: E402
from cytostore.store import CellStore  # noqa: E402


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed_epochs(bags: BagSet, y: np.ndarray, n_classes: int, cfg: TrainConfig, epochs: int) -> list[float]:
    import torch

    idx = np.arange(len(bags))
    with torch_threads(cfg.threads):
        torch.manual_seed(cfg.seed)
        model, opt, loss_fn, _ = make_head(bags, y, idx, n_classes, cfg, torch.device("cpu"))
        rng = np.random.default_rng(cfg.seed)
        times = []
        for _ in range(epochs):
            t0 = time.perf_counter()
            run_epoch(model, opt, loss_fn, bags, y, idx, cfg, rng, torch.device("cpu"))
            times.append(time.perf_counter() - t0)
    return times


def reembed(store: CellStore, table: str, slides: list[str], cfg: TrainConfig, batch: int) -> dict:
    """Re-embeds the sampled cells of ``slides`` and takes one MIL step per bag; returns timings.

    Cells of all the slides are packed into full batches of ``batch`` (as a
    DataLoader over cells would), so small bags do not pay for padded batches.
    """
    import torch

    from cytostore.embed import Embedder
    from cytostore.encoders import create_encoder
    from cytostore.imaging import crop_cell, open_image, resize
    from cytostore.mil.models import ModelConfig, build_model, pad_bags

    prov = store.provenance(table)
    t0 = time.perf_counter()
    enc = create_encoder(prov["encoder"]["name"])
    if enc.weights_sha256 != prov["encoder"]["weights_sha256"]:
        raise SystemExit(f"encoder {enc.name} on this machine has weights {enc.weights_sha256[:12]}..., the table "
                         f"{prov['encoder']['weights_sha256'][:12]}...; cannot reproduce its embeddings")
    embedder = Embedder(enc, device="cpu", batch_size=batch)
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(cfg.seed)
    tables = []
    for sid in slides:  # which cells, where: metadata only, not timed
        t = store.cells(columns=["uid", "image", "x", "y", "crop_size"], where=slides_filter([sid]), encoder=table)
        t = t.take(np.argsort(t.column("uid").to_numpy(), kind="stable"))
        tables.append(t.take(sample_indices(t.num_rows, cfg.max_cells, rng)))
    t0 = time.perf_counter()
    crops, sizes = [], []
    for t in tables:
        img = open_image(t.column("image")[0].as_py())
        crops += [resize(crop_cell(img, x, y, int(s)), enc.input_size, enc.interpolation)
                  for x, y, s in zip(t.column("x").to_pylist(), t.column("y").to_pylist(),
                                     t.column("crop_size").to_pylist())]
        img.close()
        sizes.append(t.num_rows)
    crop_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    pixels = np.stack(crops)
    feats = np.concatenate([embedder(pixels[i:i + batch]) for i in range(0, len(pixels), batch)])
    embed_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    model = build_model(ModelConfig(in_dim=enc.dim, n_classes=2))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    start = 0
    for n in sizes:
        x, mask = pad_bags([torch.from_numpy(feats[start:start + n])])
        start += n
        logits, _ = model(x, mask)
        loss = torch.nn.functional.cross_entropy(logits, torch.zeros(1, dtype=torch.long))
        opt.zero_grad()
        loss.backward()
        opt.step()
    mil_s = time.perf_counter() - t0
    return {"cells": len(crops), "read_crop_s": crop_s, "embed_s": embed_s, "mil_s": mil_s,
            "seconds": crop_s + embed_s + mil_s, "encoder_load_s": load_s}


def speed(args) -> None:
    store = CellStore.open(args.store)
    table = store.resolve(args.encoder)
    slides = store_slides(store, table)
    cfg = TrainConfig(max_cells=args.max_cells, seed=0)
    t0 = time.perf_counter()
    cached = BagSet(store, table, slides)
    load_s = time.perf_counter() - t0
    streamed = BagSet(store, table, slides, cache_bytes=0)
    y = np.arange(len(slides)) % 2  # labels do not change the cost of an epoch
    epoch_cells = sum(min(cached.size(s), args.max_cells) if args.max_cells else cached.size(s) for s in slides)
    print(f"store {args.store}, table {table}: {len(slides)} slides, {sum(cached.sizes.values())} cells, "
          f"dim {cached.dim}; an epoch uses {epoch_cells} cells (at most {args.max_cells} per bag)")
    c_times = timed_epochs(cached, y, 2, cfg, args.epochs)
    s_times = timed_epochs(streamed, y, 2, cfg, args.epochs)
    c_epoch, s_epoch = float(np.median(c_times)), float(np.median(s_times))
    print(f"cached epoch: {c_epoch:.3f} s (median of {args.epochs}; bags loaded once in {load_s:.2f} s)")
    print(f"streamed epoch (each bag read from Lance): {s_epoch:.3f} s")
    step = max(1, len(slides) // args.subset)
    subset = slides[::step][: args.subset]
    print(f"re-embedding {len(subset)} slides with the table's encoder on the CPU, batch {args.batch_size}:")
    r = reembed(store, table, subset, cfg, args.batch_size)
    per_cell = r["seconds"] / r["cells"]
    r_epoch = per_cell * epoch_cells
    print(f"  {r['cells']} cells: read + crop + resize {r['read_crop_s']:.1f} s, encoder {r['embed_s']:.1f} s, "
          f"MIL steps {r['mil_s']:.2f} s (encoder load {r['encoder_load_s']:.1f} s not counted)")
    print(f"re-embedding: {per_cell * 1000:.1f} ms per cell -> {r_epoch:.0f} s per epoch, extrapolated to "
          f"{epoch_cells} cells")
    print(f"load average (1 min) at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"ratio re-embed / cached epoch: {r_epoch / c_epoch:.0f}x   (re-embed / streamed: {r_epoch / s_epoch:.0f}x)")
    print(json.dumps({"store": args.store, "table": table, "slides": len(slides), "epoch_cells": epoch_cells,
                      "max_cells": args.max_cells, "cached_epoch_s": c_epoch, "streamed_epoch_s": s_epoch,
                      "cache_load_s": load_s, "reembed_slides": len(subset), "reembed_cells": r["cells"], "reembed_timings": r,
                      "reembed_ms_per_cell": per_cell * 1000, "reembed_epoch_s": r_epoch,
                      "ratio_reembed_vs_cached": r_epoch / c_epoch, "ratio_reembed_vs_streamed": r_epoch / s_epoch,
                      "batch_size": args.batch_size, "load_average_1min": os.getloadavg()[0]}))


def _generate(path: str, n: int, dim: int) -> None:
    from cytostore.mil.synthetic import write_synthetic_store

    slides = {"big": ("a", n)}
    slides.update({f"small{i}": (("neg", "a")[i % 2], 300) for i in range(7)})
    write_synthetic_store(path, slides, ["neg", "a"], dim=dim, chunk=20_000)


def big_bag(args) -> None:
    import multiprocessing as mp

    from cytostore.mil import predict, train_mil

    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/store"
        t0 = time.perf_counter()
        p = mp.get_context("spawn").Process(target=_generate, args=(path, args.big_bag, args.dim))
        p.start()
        p.join()  # generated in a child, so its memory does not count here
        print(f"generated a store with one {args.big_bag}-cell bag (dim {args.dim}, float16: "
              f"{args.big_bag * args.dim * 2 / 2**20:.0f} MiB) and 7 bags of 300 in {time.perf_counter() - t0:.0f} s")
        import torch  # noqa: F401  (counted in the baseline)

        base = peak_rss_mb()
        cfg = TrainConfig(epochs=2, patience=1, max_cells=args.max_cells, cache_bytes=0, device="cpu")
        t0 = time.perf_counter()
        rep = train_mil(path, "slide_label", f"{tmp}/model", cfg, folds=2)
        train_peak = peak_rss_mb()
        print(f"train (streamed, 2 folds x 2 epochs + final): {time.perf_counter() - t0:.0f} s, peak RSS "
              f"{train_peak:.0f} MiB (baseline after imports {base:.0f} MiB); cached={rep.cached}")
        t0 = time.perf_counter()
        pred = predict(path, f"{tmp}/model", where="slide_id = 'big'")
        peak = peak_rss_mb()
        print(f"predict the {pred.n_cells[0]}-cell bag (all cells): {time.perf_counter() - t0:.1f} s, "
              f"peak RSS {peak:.0f} MiB")
        print(json.dumps({"big_bag_cells": args.big_bag, "dim": args.dim, "baseline_rss_mib": base,
                          "train_peak_rss_mib": train_peak, "predict_peak_rss_mib": peak,
                          "bag_float16_mib": args.big_bag * args.dim * 2 / 2**20}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default="runs/diseases-store")
    ap.add_argument("--encoder", default=None)
    ap.add_argument("--subset", type=int, default=4, help="slides re-embedded to time the per-cell cost")
    ap.add_argument("--epochs", type=int, default=3, help="cached/streamed epochs timed (median)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--max-cells", type=int, default=512)
    ap.add_argument("--big-bag", type=int, default=0, help="run the memory check with a generated N-cell bag")
    ap.add_argument("--dim", type=int, default=1280)
    args = ap.parse_args()
    big_bag(args) if args.big_bag else speed(args)


if __name__ == "__main__":
    main()
