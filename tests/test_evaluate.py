"""`cytostore evaluate`: grouped splits that cannot leak, duplicate groups, probes, the CLI contract."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cli.main import app
from conftest import sample_rows, write_manifest
from cytostore.errors import InputError
from cytostore.evaluate import EvalConfig, evaluate, grouped_folds, merge_duplicate_groups, sample_cross_group_episodes
from cytostore.evaluate import probes

runner = CliRunner()


def _last_json(output: str) -> dict:
    return json.loads(output.strip().splitlines()[-1])


def _random_design(seed: int, n: int = 600, n_groups: int = 17, n_classes: int = 6):
    rng = np.random.default_rng(seed)
    groups = np.array([f"g{i}" for i in rng.integers(n_groups, size=n)], dtype=object)
    labels = np.array([f"c{i}" for i in rng.integers(n_classes, size=n)], dtype=object)
    return labels, groups


# -- splits ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(5))
def test_no_group_on_both_sides_of_any_fold(seed):
    labels, groups = _random_design(seed)
    folds = grouped_folds(labels, groups, 5, seed)
    assert len(folds) == 5
    covered = np.concatenate([te for _, te in folds])
    assert sorted(covered.tolist()) == list(range(len(labels)))  # every cell tested exactly once
    for tr, te in folds:
        assert not set(groups[tr]) & set(groups[te])


@pytest.mark.parametrize("seed", range(5))
def test_episode_support_and_query_groups_are_disjoint(seed):
    labels, groups = _random_design(seed)
    got = sample_cross_group_episodes(labels, groups, ways=3, shots=2, queries=4, episodes=30, seed=seed)
    assert len(got.episodes) + got.skipped == 30 and got.episodes
    for ep, (sup_side, qry_side) in zip(got.episodes, got.sides):
        assert not set(groups[ep.support]) & set(groups[ep.query])
        assert set(groups[ep.support]) <= sup_side and set(groups[ep.query]) <= qry_side
        assert not sup_side & qry_side
        assert len(ep.support) == 3 * 2 and len(ep.query) == 3 * 4
        assert set(labels[ep.support]) == set(labels[ep.query]) == set(ep.classes)
    again = sample_cross_group_episodes(labels, groups, ways=3, shots=2, queries=4, episodes=30, seed=seed)
    assert all((a.support == b.support).all() for a, b in zip(got.episodes, again.episodes))


def test_duplicate_groups_are_merged_and_never_straddle_a_split():
    labels, groups = _random_design(0, n=400, n_groups=12)
    hashes = [bytes([i % 256, i // 256]) for i in range(len(labels))]  # every cell distinct
    a, b = np.flatnonzero(groups == "g3"), np.flatnonzero(groups == "g7")
    hashes[b[0]] = hashes[a[0]]  # one byte-identical cell in g3 and g7
    blank = b"blank"
    for g in range(10):  # a uniform thumbnail in 10 groups: uninformative, ignored
        hashes[np.flatnonzero(groups == f"g{g}")[-1]] = blank
    images = {"g1": {b"img"}, "g9": {b"img"}, "g2": {b"other"}}  # g1 and g9 cropped from the same image
    dedup = merge_duplicate_groups(groups, hashes, images)
    merged = dedup.groups
    assert dedup.report["groups_before"] == 12 and dedup.report["groups_after"] == 10
    assert dedup.report["merges_by_thumbnail"] == 1 and dedup.report["merges_by_source_image"] == 1
    assert dedup.report["ignored_common_thumbnails"] == 1
    assert set(merged[groups == "g3"]) == set(merged[groups == "g7"]) == {"g3"}
    assert set(merged[groups == "g1"]) == set(merged[groups == "g9"])
    for tr, te in grouped_folds(labels, merged, 5, 0):
        for pair in (("g3", "g7"), ("g1", "g9")):
            sides = {bool(np.isin(np.flatnonzero(np.isin(groups, pair)), te).any()),
                     bool(np.isin(np.flatnonzero(np.isin(groups, pair)), tr).any())}
            assert sides != {True}  # never on both sides
    got = sample_cross_group_episodes(labels, merged, 3, 2, 3, 20, seed=1)
    for ep in got.episodes:
        for pair in (("g3", "g7"), ("g1", "g9")):
            on_sup = np.isin(groups[ep.support], pair).any()
            on_qry = np.isin(groups[ep.query], pair).any()
            assert not (on_sup and on_qry)


def test_too_few_groups_is_an_input_error():
    labels, groups = _random_design(0, n_groups=3)
    with pytest.raises(InputError, match="--folds 3"):
        grouped_folds(labels, groups, 5)


def test_hyper_parameters_are_chosen_without_the_outer_test_cells():
    """The selection sees only training-part cells: x carries each cell's index to check it."""
    labels, groups = _random_design(3, n=300, n_groups=9)
    x = np.arange(len(labels), dtype=np.float32)[:, None]
    seen: list[tuple[set, set]] = []

    def recording(xtr, ytr, xte, grid):
        seen.append((set(xtr[:, 0].astype(int).tolist()), set(xte[:, 0].astype(int).tolist())))
        return {p: np.full(len(xte), ytr[0], dtype=object) for p in grid}

    probes._grouped_cv(x, labels, groups, 3, 0, (1, 2), recording, "test", lambda _m: None)
    outer = grouped_folds(labels, groups, 3, 0)
    # per outer fold: 2 inner selection calls, then the final fit on the whole training part
    assert len(seen) == 3 * (probes.INNER_FOLDS + 1)
    for f, (tr, te) in enumerate(outer):
        calls = seen[f * (probes.INNER_FOLDS + 1):(f + 1) * (probes.INNER_FOLDS + 1)]
        test = set(te.tolist())
        for fit_cells, scored in calls[:-1]:
            assert not fit_cells & test and not scored & test
            assert not set(groups[list(fit_cells)]) & set(groups[list(scored)])
        assert calls[-1] == (set(tr.tolist()), test)


def test_precision_at_k_never_counts_the_query_group():
    e1, e2 = np.eye(3)[0], np.eye(3)[1]
    x = np.stack([e1] * 5 + [e2] * 5 + [e1 + 0.01 * e2] * 5)  # group A ~ group C, label a ~ b
    y = np.array(["a"] * 5 + ["a"] * 5 + ["b"] * 5, dtype=object)
    g = np.array(["A"] * 5 + ["B"] * 5 + ["C"] * 5, dtype=object)
    res = probes.precision_at_k(x, y, g, k=3)
    # A's neighbours from other groups are C's (label b), B's are C's, C's are A's: none shares a label.
    assert res["precision"] == 0.0 and res["k"] == 3
    # with one group per cell only the cell itself is excluded: its own group-mates share its label
    alone = probes.precision_at_k(x, y, np.array([f"s{i}" for i in range(15)], dtype=object), k=3)
    assert alone["precision"] == 1.0


# -- end to end on real cells ---------------------------------------------------------------------
def test_evaluate_cli_json_contract_on_the_small_store(small_store, tmp_path):
    md, png = tmp_path / "eval.md", tmp_path / "eval.png"
    r = runner.invoke(app, ["evaluate", "--store", str(small_store), "--folds", "3", "--ways", "2", "--shots", "2",
                            "--queries", "3", "--episodes", "20", "--json", "--markdown", str(md), "--png", str(png),
                            "--no-save"])  # the session's store stays as it was built
    assert r.exit_code == 0, r.output
    out = _last_json(r.output)
    assert list(out)[0] == "tables" and list(out["tables"]) == ["efficientnet_lite0"]
    t = out["tables"]["efficientnet_lite0"]
    for key in ("accuracy", "balanced_accuracy", "macro_f1"):
        assert 0 <= t["linear_probe"][key] <= 1
    assert t["linear_probe"]["folds"] == 3 and len(t["linear_probe"]["C"]) == 3
    assert 0 <= t["precision_at_10"] <= 1
    assert t["n_cells"] == 360 and t["n_groups"] == 3
    assert 1 / 3 <= t["slide_of_origin"] <= 1 and t["slide_of_origin_chance"] == pytest.approx(1 / 3, abs=1e-3)
    fs = t["fewshot_2way2shot"]
    assert fs["episodes"] > 0 and 0 <= fs["accuracy"] <= 1 and fs["ci95"] >= 0
    assert out["duplicates"]["groups_merged"] == 0
    assert "| efficientnet_lite0 |" in md.read_text() and png.stat().st_size > 1000
    assert out["held_out"] == {"tables": {}, "cells_excluded": 0, "scored_groups": ["chula-1", "chula-255", "chula-27"]}
    assert not (Path(small_store) / "evaluations").exists()


def test_evaluate_stores_each_tables_figures(small_store, tmp_path):
    from cytostore import CellStore
    from cytostore.evaluate.heldout import latest

    path = tmp_path / "store"
    shutil.copytree(small_store, path)
    r = runner.invoke(app, ["evaluate", "--store", str(path), "--folds", "3", "--ways", "2", "--shots", "2",
                            "--queries", "3", "--episodes", "5", "-q", "--json"])
    assert r.exit_code == 0, r.output
    out = _last_json(r.output)
    assert out["saved"] == [str(path / "evaluations" / "efficientnet_lite0.json")]
    doc = latest(CellStore.open(path), "efficientnet_lite0")
    assert doc["figures"]["linear_probe"] == out["tables"]["efficientnet_lite0"]["linear_probe"]
    assert doc["compared_with"] == ["efficientnet_lite0"] and doc["evaluated_at"]


def test_evaluate_errors_exit_2_and_say_how_to_fix(small_store):
    r = runner.invoke(app, ["evaluate", "--store", str(small_store), "--tables", "nope"])
    assert r.exit_code == 2 and "no table(s) ['nope']" in r.output and "efficientnet_lite0" in r.output
    r = runner.invoke(app, ["evaluate", "--store", str(small_store)])  # 5 folds, 3 groups
    assert r.exit_code == 2 and "3 group(s)" in r.output and "--folds 3" in r.output
    r = runner.invoke(app, ["evaluate", "--store", str(small_store), "--label", "slide_label"])
    assert r.exit_code == 2 and "no table" in r.output and "slide_label" in r.output
    r = runner.invoke(app, ["evaluate", "--store", str(small_store), "--group", "patient"])
    assert r.exit_code == 2 and "no column 'patient'" in r.output


@pytest.fixture(scope="module")
def dup_store(tmp_path_factory) -> Path:
    """Five real fields plus two injected duplicates: field 1 copied whole under another slide id
    (identical thumbnails), and field 27's image copied with a disjoint half of its cells
    annotated in each copy (the Chula RBC-12 case: no shared cell, one shared image)."""
    from cytostore import IngestConfig, ingest, open_source

    root = tmp_path_factory.mktemp("dup")
    rows = []
    for f in ["chula-1", "chula-27", "chula-255", "chula-222", "chula-264"]:
        rows += sample_rows([f])[:24]
    copy1 = root / "copy-of-1.jpg"
    shutil.copyfile(rows[0]["image"], copy1)
    rows += [{**r, "image": str(copy1), "slide_id": "copy-1"} for r in rows[:24]]
    f27 = [r for r in rows if r["slide_id"] == "chula-27"]
    copy27 = root / "copy-of-27.jpg"
    shutil.copyfile(f27[0]["image"], copy27)
    rows = [r for r in rows if not (r["slide_id"] == "chula-27" and f27.index(r) % 2)]
    rows += [{**r, "image": str(copy27), "slide_id": "copy-27"} for i, r in enumerate(f27) if i % 2]
    manifest = write_manifest(rows, root / "cells.csv")
    ingest(open_source(manifest), root / "store", IngestConfig(batch_size=32))
    return root / "store"


def test_injected_duplicate_groups_are_merged(dup_store):
    cfg = EvalConfig(folds=3, ways=2, shots=2, queries=3, episodes=10)
    out = evaluate(dup_store, config=cfg)
    d = out["duplicates"]
    assert d["groups_before"] == 7 and d["groups_after"] == 5
    assert d["merges_by_thumbnail"] == 1 and d["merges_by_source_image"] == 1
    assert sorted(map(sorted, d["merged_sets"])) == [["chula-1", "copy-1"], ["chula-27", "copy-27"]]
    assert d["cells_in_merged_groups"] == 24 * 2 + 24
    assert out["tables"]["efficientnet_lite0"]["n_groups"] == 5
    thumbs_only = evaluate(dup_store, config=EvalConfig(**{**cfg.to_dict(), "hash_images": False}))
    # thumbnails alone find the whole copy, not the copy with other cells annotated
    assert thumbs_only["duplicates"]["groups_after"] == 6


def test_tables_are_compared_on_the_cells_they_share(small_store, tmp_path):
    """A second table holding 300 of the 360 cells, with random embeddings: both are scored on
    those 300 cells, the same folds and episodes. (The three fields hold mostly different
    classes, so cross-field label figures are near zero for both; the slide signal is not.)"""
    import pyarrow as pa

    from cytostore import CellStore
    from cytostore.evaluate.report import markdown, summary, text
    from cytostore.store.writer import append_rows

    path = tmp_path / "store"
    shutil.copytree(small_store, path)
    s = CellStore.open(path)
    rows = s.dataset("efficientnet_lite0").to_table().slice(30, 300)
    dim = rows.schema.field("embedding").type.list_size
    noise = np.random.default_rng(0).standard_normal((rows.num_rows, dim)).astype(np.float16)
    emb = pa.FixedSizeListArray.from_arrays(pa.array(noise.ravel()), dim)
    append_rows(s, "noise", rows.set_column(rows.schema.get_field_index("embedding"), "embedding", emb))
    out = evaluate(path, config=EvalConfig(folds=3, ways=2, shots=2, queries=3, episodes=20))
    assert list(out["tables"]) == ["efficientnet_lite0", "noise"] and out["n_cells"] == 300
    real, rand = out["tables"]["efficientnet_lite0"], out["tables"]["noise"]
    assert real["n_cells"] == rand["n_cells"] == 300
    assert real["linear_probe"]["folds"] == rand["linear_probe"]["folds"] == 3
    assert real["slide_of_origin"] > rand["slide_of_origin"]  # noise carries no slide signal
    assert real["fewshot_2way2shot"]["episodes"] == rand["fewshot_2way2shot"]["episodes"]
    rows_ = summary(out)
    assert set(rows_) == {"efficientnet_lite0", "noise"} and rows_["noise"]["n_cells"] == 300
    assert "noise" in text(out) and sum(ln.startswith("| ") for ln in markdown(out).splitlines()) == 3
    only = evaluate(path, ["noise"], EvalConfig(folds=3, ways=2, shots=2, queries=3, episodes=5))
    assert list(only["tables"]) == ["noise"]
