"""`cytostore slides`, `cytostore cells` and `cytostore cluster` on the three real Chula fields."""

from __future__ import annotations

import json
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cli.main import app
from cytostore import CellStore

runner = CliRunner()


def _json(res) -> dict:
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.fixture()
def store(small_store, tmp_path) -> Path:
    dst = tmp_path / "store"
    shutil.copytree(small_store, dst)
    return dst


def test_slides_lists_every_slide_with_its_counts(small_store):
    r = _json(runner.invoke(app, ["slides", "--store", str(small_store), "--json"]))
    cells = CellStore.open(small_store).cells(columns=["slide_id", "label", "image"]).to_pylist()
    labels: dict[str, Counter] = defaultdict(Counter)
    for c in cells:
        labels[c["slide_id"]][c["label"]] += 1
    assert [s["slide_id"] for s in r["slides"]] == sorted(labels) == ["chula-1", "chula-255", "chula-27"]
    for s in r["slides"]:
        assert s["cells"] == sum(labels[s["slide_id"]].values())
        assert s["labels"] == dict(labels[s["slide_id"]])
        assert s["images"] == sorted({c["image"] for c in cells if c["slide_id"] == s["slide_id"]})
        assert s["slide_label"] is None and s["failures"] == 0
    text = runner.invoke(app, ["slides", "--store", str(small_store)])
    assert text.exit_code == 0 and all(sid in text.stdout for sid in labels)


def test_cells_of_one_slide(small_store):
    r = _json(runner.invoke(app, ["cells", "--store", str(small_store), "--slide", "chula-27",
                                  "--columns", "cell_id,label", "--columns", "x", "--limit", "5", "--json"]))
    want = CellStore.open(small_store).cells(columns=["cell_id", "label", "x"], where="slide_id = 'chula-27'")
    assert r["cells"] == want.num_rows and r["shown"] == 5 and r["columns"] == ["cell_id", "label", "x"]
    assert r["rows"] == want.slice(0, 5).to_pylist()
    every = _json(runner.invoke(app, ["cells", "--store", str(small_store), "--slide", "chula-27", "--limit", "0",
                                      "--json"]))
    assert every["shown"] == want.num_rows and "embedding" not in every["columns"]
    text = runner.invoke(app, ["cells", "--store", str(small_store), "--slide", "chula-1", "-c", "cell_id,label"])
    lines = text.stdout.strip().splitlines()
    assert text.exit_code == 0 and lines[0] == "cell_id\tlabel" and len(lines) == 51


@pytest.mark.parametrize("args, words", [
    (["--slide", "nope"], ["'nope'", "cytostore slides"]),
    (["--slide", "chula-1", "--columns", "colour"], ["colour", "cell_id"]),
    (["--slide", "chula-1", "--columns", "embedding"], ["embedding", "export"]),
    (["--slide", "chula-1", "--limit", "-1"], ["--limit"]),
])
def test_cells_errors_exit_2_and_say_what_to_do(small_store, args, words):
    res = runner.invoke(app, ["cells", "--store", str(small_store), *args])
    assert res.exit_code == 2, res.output
    assert all(w in res.output for w in words), res.output


def test_cluster_writes_a_prediction_set_maps_can_colour_by(store, tmp_path):
    from cytostore.fewshot import read_predictions
    from cytostore.maps import resolve_color

    r = _json(runner.invoke(app, ["cluster", "--store", str(store), "--name", "km", "--k", "4", "--json", "-q"]))
    pred = read_predictions(store, "km").to_pylist()
    s = CellStore.open(store)
    assert r["cells"] == len(pred) == s.count() == 360
    sizes = [r["sizes"][f"c{j}"] for j in range(4)]
    assert sizes == sorted(sizes, reverse=True) and sum(sizes) == 360  # c0 is the largest
    assert Counter(p["prediction"] for p in pred) == Counter(r["sizes"])
    for p in pred:
        assert p["nearest"] == p["prediction"] != p["runner_up"] and p["prototypes_version"] == -1
        assert -1.0 <= p["score"] <= 1.0 and p["margin"] >= 0
    # The score is the cosine to the cluster's centre: the normalised mean of its cells is close to it.
    emb, keys = s.embeddings()
    x = emb.astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    lab = {p["uid"]: p["prediction"] for p in pred}
    score = {p["uid"]: p["score"] for p in pred}
    labels = np.array([lab[u] for u in keys.column("uid").to_pylist()])
    for c in r["sizes"]:
        centre = x[labels == c].mean(0)
        centre /= np.linalg.norm(centre)
        cos = x[labels == c] @ centre
        mine = np.array([score[u] for u, m in zip(keys.column("uid").to_pylist(), labels == c) if m])
        assert np.abs(cos - mine).max() < 0.05
    # Real embeddings: clusters agree with the expert labels well above chance (ARI 0).
    assert r["adjusted_rand_index"] > 0.2
    # Same seed, same clusters; `map --color-by prediction:km` resolves the set.
    again = _json(runner.invoke(app, ["cluster", "--store", str(store), "--name", "km", "--k", "4", "--json", "-q"]))
    assert again["sizes"] == r["sizes"] and [p["prediction"] for p in read_predictions(store, "km").to_pylist()] == \
        [p["prediction"] for p in pred]
    assert resolve_color(s, "prediction:km").prediction == "km"


def test_cluster_map_colours_by_the_clusters(store, tmp_path):
    """`map --color-by prediction:NAME` draws the clusters unchanged; the map it stores then
    goes out as X_umap in the AnnData export."""
    pytest.importorskip("umap")
    anndata = pytest.importorskip("anndata")
    from cytostore.fewshot import read_predictions
    from cytostore.maps import UmapParams, load_map_data, load_umap

    _json(runner.invoke(app, ["cluster", "--store", str(store), "--name", "km", "--k", "3", "--json", "-q"]))
    r = _json(runner.invoke(app, ["map", "--store", str(store), "--out", str(tmp_path / "map.png"),
                                  "--color-by", "prediction:km", "--fit-sample", "360", "--json"]))
    assert (tmp_path / "map.png").is_file() and r["points"] == 360 and r["categories"] == 3
    data = load_map_data(store, "prediction:km", params=UmapParams(fit_sample=360, seed=0))
    assert data.umap_meta["reused"] and sorted(data.categories) == ["c0", "c1", "c2"]
    cluster = {p["uid"]: p["prediction"] for p in read_predictions(store, "km").to_pylist()}
    assert [data.categories[v] for v in data.values] == [cluster[u] for u in data.uid.tolist()]

    out = _json(runner.invoke(app, ["export", "anndata", "--store", str(store), "--out", str(tmp_path / "a.h5ad"),
                                    "--json"]))
    assert "X_umap" in out["obsm"]
    a = anndata.read_h5ad(tmp_path / "a.h5ad")
    coords = load_umap(store)
    xy = dict(zip(coords.column("uid").to_pylist(),
                  zip(coords.column("umap_x").to_pylist(), coords.column("umap_y").to_pylist())))
    assert np.allclose(a.obsm["X_umap"], np.array([xy[u] for u in a.obs["uid"].tolist()], np.float32))


@pytest.mark.parametrize("args, words", [
    (["--k", "1"], ["--k", "2"]),
    (["--k", "400"], ["--k", "360"]),
    (["--method", "leiden"], ["leiden", "kmeans"]),
    (["--where", "colour = 'x'"], ["colour"]),
    (["--name", "../x"], ["../x"]),
])
def test_cluster_errors_exit_2(store, args, words):
    res = runner.invoke(app, ["cluster", "--store", str(store), "--name", "km", *args])
    assert res.exit_code == 2, res.output
    assert all(w in res.output for w in words), res.output


def test_cluster_never_mixes_two_runs_in_one_set(store):
    _json(runner.invoke(app, ["cluster", "--store", str(store), "--name", "km", "--k", "3", "--json", "-q"]))
    res = runner.invoke(app, ["cluster", "--store", str(store), "--name", "km", "--k", "3",
                              "--where", "slide_id = 'chula-1'"])
    assert res.exit_code == 2 and "pick another --name" in res.output
    ok = _json(runner.invoke(app, ["cluster", "--store", str(store), "--name", "km-chula-1", "--k", "3",
                                   "--where", "slide_id = 'chula-1'", "--json", "-q"]))
    assert ok["cells"] == CellStore.open(store).count(where="slide_id = 'chula-1'")


def test_cells_of_a_slide_whose_data_file_is_missing_exit_2_naming_store_check(store):
    # Lance's "not found" escaped `cytostore cells` as a traceback (exit 3).
    import lance

    uri = next(Path(store).glob("cells.*.lance"))
    frag = lance.dataset(str(uri)).get_fragments()[0]
    (uri / "data" / frag.metadata.files[0].path).unlink()
    res = runner.invoke(app, ["cells", "--store", str(store), "--slide", "chula-1"])
    assert res.exit_code == 2, res.output
    assert "store check" in res.output
