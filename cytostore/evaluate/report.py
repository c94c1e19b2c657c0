"""The evaluation as a text table, the contract JSON, Markdown and a PNG chart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

COLUMNS = (  # (header, getter) of each column of the table
    ("cells", lambda t, k: f"{t['n_cells']}"),
    ("groups", lambda t, k: f"{t['n_groups']}"),
    ("probe acc", lambda t, k: _f(t["linear_probe"]["accuracy"])),
    ("probe bal", lambda t, k: _f(t["linear_probe"]["balanced_accuracy"])),
    ("probe F1", lambda t, k: _f(t["linear_probe"]["macro_f1"])),
    ("k-NN acc", lambda t, k: _f(t["knn"]["accuracy"])),
    ("few-shot", lambda t, k: _f(t[k]["accuracy"]) + (f" ± {t[k]['ci95']:.3f}" if t[k].get("ci95") is not None else "")),
    ("P@10 other slides", lambda t, k: _f(t.get("precision_at_10"))),
    ("slide of origin (chance)", lambda t, k: f"{_f(t['slide_of_origin'])} ({_f(t['slide_of_origin_chance'])})"),
)


def _f(v: Any) -> str:
    return "—" if v is None else f"{v:.3f}"


def _fewshot_key(report: dict[str, Any]) -> str:
    c = report["config"]
    return f"fewshot_{c['ways']}way{c['shots']}shot"


def rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and one row of strings per table."""
    key = _fewshot_key(report)
    header = ["table", *(h for h, _ in COLUMNS)]
    body = [[name, *(get(t, key) for _, get in COLUMNS)] for name, t in report["tables"].items()]
    return header, body


def _notes(report: dict[str, Any]) -> list[str]:
    c, d = report["config"], report["duplicates"]
    first = next(iter(report["tables"].values()))
    fs = first[_fewshot_key(report)]
    lines = [
        f"{report['n_cells']} labelled cells in {d['groups_before']} {report['group']} groups -> "
        f"{d['groups_after']} after merging duplicates ({d['groups_merged']} groups, "
        f"{d['cells_in_merged_groups']} cells merged: {d['merges_by_thumbnail']} merges by identical thumbnails, "
        f"{d['merges_by_source_image']} by identical source images).",
        f"Linear probe and k-NN: {c['folds']} grouped folds (StratifiedGroupKFold by {report['group']}); "
        f"C and k chosen on inner grouped folds of each training part. Label chance: majority "
        f"{first['label_chance']['majority']:.3f}, balanced {first['label_chance']['balanced']:.3f}.",
        f"Few-shot: {c['ways']}-way {c['shots']}-shot, {c['queries']} queries a class, "
        f"{fs.get('episodes', 0)} episodes ({fs.get('skipped', 0)} skipped), support and queries from "
        f"disjoint groups; chance {1 / c['ways']:.3f}.",
        f"P@{c['neighbours']}: share of a cell's {c['neighbours']} cosine neighbours from other groups with the "
        f"same label (random neighbours: {first['precision_at_10_detail']['chance']:.3f})."
        if "precision_at_10_detail" in first else "",
        "Slide of origin: balanced accuracy of predicting the group from the embedding (lower is better).",
    ]
    return [ln for ln in lines if ln]


def text(report: dict[str, Any]) -> str:
    """A fixed-width table with notes, for the terminal."""
    header, body = rows(report)
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*r) for r in body]
    return "\n".join(out + [""] + _notes(report))


def markdown(report: dict[str, Any]) -> str:
    """The same table in Markdown, with the notes as a list."""
    header, body = rows(report)
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(out + [""] + [f"- {n}" for n in _notes(report)]) + "\n"


def png(report: dict[str, Any], path: str | Path) -> Path:
    """A grouped bar chart of the main figures per table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    key = _fewshot_key(report)
    metrics = [("probe acc", lambda t: t["linear_probe"]["accuracy"]),
               ("probe macro-F1", lambda t: t["linear_probe"]["macro_f1"]),
               ("k-NN acc", lambda t: t["knn"]["accuracy"]),
               ("few-shot", lambda t: t[key]["accuracy"]),
               ("P@10", lambda t: t.get("precision_at_10")),
               ("slide of origin\n(lower is better)", lambda t: t["slide_of_origin"])]
    names = list(report["tables"])
    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * len(metrics), 3.6))
    width = 0.8 / max(len(names), 1)
    for i, n in enumerate(names):
        vals = [get(report["tables"][n]) for _, get in metrics]
        xs = np.arange(len(metrics)) + i * width
        ax.bar(xs, [v or 0 for v in vals], width, label=n)
    ax.set_xticks(np.arange(len(metrics)) + width * (len(names) - 1) / 2, [m for m, _ in metrics])
    ax.set_ylim(0, 1)
    ax.set_title(f"cytostore evaluate: {report['n_cells']} cells, {report['n_groups']} groups")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def summary(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """One compact row per table (the evaluation column of ``encoders list``): the headline figures,
    the cells and groups they were measured on, and the table version evaluated."""
    key = _fewshot_key(report)
    return {name: {"fewshot": t[key]["accuracy"], "fewshot_ci95": t[key].get("ci95"),
                   "probe_accuracy": t["linear_probe"]["accuracy"], "probe_macro_f1": t["linear_probe"]["macro_f1"],
                   "knn_accuracy": t["knn"]["accuracy"], "precision_at_10": t.get("precision_at_10"),
                   "slide_of_origin": t["slide_of_origin"], "n_cells": t["n_cells"], "n_groups": t["n_groups"],
                   "table_version": t["table_version"], "label": report["label"], "group": report["group"]}
            for name, t in report["tables"].items()}
