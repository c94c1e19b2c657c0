"""Streaming sources: manifests read in chunks, planning shared out across workers,
image paths stored absolute."""

from __future__ import annotations

import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import sample_rows, write_manifest
from cytostore import CellStore, IngestConfig, ingest, open_source
from cytostore.keys import KeySet, cell_key_hash
from cytostore.sources import ImageTask, SourceFailure
from cytostore.sources.tables import TableStream


def _rows(n_images: int = 30, per_image: int = 40) -> list[dict]:
    """Rows over images that need not exist: slides s0..s9, three images each,
    plus single-image slides; some bad rows and repeated keys far apart."""
    rows = []
    for i in range(n_images):
        slide = f"s{i % 10}" if i < 20 else f"single{i}"
        for j in range(per_image):
            rows.append({"image": f"imgs/f{i}.png", "slide_id": slide, "x": str(10 + 3 * j), "y": str(5 + i), "cell_id": ""})
    rows[5]["x"] = "abc"  # not a number
    rows[77]["slide_id"] = "../x"  # bad slide id
    rows[900]["image"] = ""  # no image
    rows.append(dict(rows[3]))  # same key as a row chunks away (and in another shard)
    rows.append(dict(rows[1000]))
    rows.append({**rows[10], "cell_id": "named"})
    rows.append({**rows[11], "cell_id": "named"})  # same explicit id in the same slide
    return rows


def _items(source) -> tuple[list[ImageTask], list[SourceFailure]]:
    items = list(source)
    return [i for i in items if isinstance(i, ImageTask)], [i for i in items if isinstance(i, SourceFailure)]


def _cells(tasks) -> list[tuple[str, str, str]]:
    return [(c.slide_id, c.cell_id, t.image) for t in tasks for c in t.cells]


def test_chunked_manifest_gives_what_one_chunk_gives(tmp_path):
    manifest = write_manifest(_rows(), tmp_path / "m.csv")
    whole = open_source(manifest)
    whole.chunk_rows = 10**6
    small = open_source(manifest)
    small.chunk_rows = 64
    (t1, f1), (t2, f2) = _items(whole), _items(small)
    assert sorted(_cells(t1)) == sorted(_cells(t2))
    assert sorted((f.where, f.reason) for f in f1) == sorted((f.where, f.reason) for f in f2)
    wheres = sorted(int(f.where.rsplit(" ", 1)[1]) for f in f2)
    n = len(_rows())
    assert wheres == [7, 79, 902, n - 2, n - 1, n + 1]  # lines: the header is line 1
    assert sum("duplicate key" in f.reason for f in f2) == 3
    cells = dict(((s, c), img) for s, c, img in _cells(t2))
    # A slide over three images gets prefixed ids; a single-image slide does not.
    assert ("s0", "f0:10_5") in cells and ("single20", "10_25") in cells
    assert cells[("s0", "f0:10_5")] == str(tmp_path / "imgs" / "f0.png")
    # Rows of an image that runs over chunk ends stay one task; the last row of f0,
    # far from its other rows, is a task of its own.
    assert (len(t1), len(t2)) == (30, 31)
    assert sum(not t.source_ref.endswith(" (continued)") for t in t2) == 31


@pytest.mark.parametrize("count", [2, 3])
def test_each_row_is_read_by_exactly_one_shard(tmp_path, count):
    manifest = write_manifest(_rows(), tmp_path / "m.csv")
    src = open_source(manifest)
    src.chunk_rows = 50
    seen: Counter = Counter()
    for i in range(count):
        tasks, fails = _items(src.shard(i, count))
        seen.update(c.source_ref for t in tasks for c in t.cells)
        seen.update(f.where for f in fails)
    assert max(seen.values()) == 1
    assert len(seen) == len(_rows())  # every row once: as a cell (duplicates too) or a failure


def test_sharded_workers_count_each_failure_and_skip_once(tmp_path, monkeypatch):
    """Every cell stored already: each worker plans its own chunks, and a key
    repeated across chunks is still one failure, not a second skip."""
    import torch.utils.data as tud

    from cytostore._workers import merge_parts
    from cytostore.embed import CropSpec, TaskStream
    from cytostore.imaging import CropPolicy

    manifest = write_manifest(_rows(), tmp_path / "m.csv")
    src = open_source(manifest)
    src.chunk_rows = 50
    tasks, fails = _items(src)
    cells = [c for t in tasks for c in t.cells]
    stored = KeySet(np.array([c.uid for c in cells]), np.array([cell_key_hash(c.slide_id, c.cell_id) for c in cells]))
    spec = CropSpec(CropPolicy(), 32, "bilinear")

    def run(workers: int) -> tuple[int, list[str]]:
        streams = []
        for w in range(max(workers, 1)):
            info = type("Info", (), {"id": w, "num_workers": workers})() if workers else None
            monkeypatch.setattr(tud, "get_worker_info", lambda info=info: info)
            streams.append(list(iter(TaskStream(src, spec, stored))))
        outs = list(_round_robin(streams))
        outs = list(merge_parts(outs)) if workers else outs
        return sum(o["skipped"] for o in outs), sorted(f.where for o in outs for f in o["failures"])

    skipped0, failures0 = run(0)
    assert skipped0 == len(cells) and len(failures0) == len(fails) == 6
    for workers in (2, 3):
        assert run(workers) == (skipped0, failures0)


def _round_robin(streams):
    """Outputs in the order a DataLoader collects them from its workers."""
    its = [iter(s) for s in streams]
    while its:
        for it in list(its):
            try:
                yield next(it)
            except StopIteration:
                its.remove(it)


def test_csv_types_settle_over_the_whole_file(tmp_path):
    lines = ["image,slide_id,cell_id,x,code"] + [f"a.png,s,{i:03d},{i},{i}" for i in range(200)]
    lines += ["a.png,s,abc,1.5,"]
    path = tmp_path / "m.csv"
    path.write_text("\n".join(lines) + "\n")
    stream = TableStream(path, block_bytes=256)  # first block: integers only
    assert stream.schema.field("cell_id").type == pa.int64()
    schema = stream.settle()
    whole = pyarrow.csv.read_csv(path)
    assert schema == whole.schema and stream.num_rows == 201
    assert pa.Table.from_batches(list(stream.batches())).equals(whole)


def test_parquet_shards_and_multi_image_slides(tmp_path):
    rows = _rows()
    cols = {k: [r[k] for r in rows] for k in ("image", "slide_id", "x", "y")}
    cols["x"] = [None if v == "abc" else float(v) for v in cols["x"]]
    pq.write_table(pa.table(cols), tmp_path / "m.parquet", row_group_size=100)
    src = open_source(tmp_path / "m.parquet")
    src.chunk_rows = 40
    whole = sorted(_cells(_items(src)[0]))
    parts = sorted(c for i in range(2) for c in _cells(_items(src.shard(i, 2))[0]))
    # A shard does not see the others: its repeated keys are dropped when the workers' outputs meet.
    assert len(whole) == len(set(parts)) > 1000 and set(whole) == set(parts) and len(parts) == len(whole) + 4
    assert any(cid.startswith("f1:") for _, cid, _ in whole)


def test_folder_sources_shard_by_file(tmp_path):
    for sub in ("a", "b"):
        (tmp_path / "fields" / sub).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (20, 20)).save(tmp_path / "fields" / sub / f"{sub}{i}.png")
    Image.new("RGB", (20, 20)).save(tmp_path / "fields" / "b" / "a1.png")  # repeats slide id a1
    src = open_source(tmp_path / "fields", "fields")
    whole_tasks, whole_fails = _items(src)
    parts = [_items(src.shard(i, 3)) for i in range(3)]
    assert sorted(t.image for p in parts for t in p[0]) == sorted(t.image for t in whole_tasks)
    assert [f.where for p in parts for f in p[1]] == [f.where for f in whole_fails] and len(whole_fails) == 1
    crops = open_source(tmp_path / "fields", "crops")
    got = sorted(t.image for i in range(2) for t in _items(crops.shard(i, 2))[0])
    assert got == sorted(t.image for t in _items(crops)[0]) and len(got) == 7


def test_relative_manifest_paths_are_stored_absolute(tmp_path, monkeypatch):
    rows = sample_rows(["chula-27"])[:6]
    (tmp_path / "data" / "imgs").mkdir(parents=True)
    shutil.copy(rows[0]["image"], tmp_path / "data" / "imgs" / "f.jpg")
    for r in rows:
        r["image"] = "imgs/f.jpg"
    write_manifest(rows, tmp_path / "data" / "m.csv")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path)
    report = ingest(open_source(Path("data") / "m.csv"), tmp_path / "s", IngestConfig(batch_size=8))
    assert report.cells_added == 6
    monkeypatch.chdir(tmp_path / "elsewhere")
    images = set(CellStore.open(tmp_path / "s").cells(columns=["image"]).column("image").to_pylist())
    assert images == {str(tmp_path / "data" / "imgs" / "f.jpg")}
    assert all(os.path.isabs(p) and os.path.exists(p) for p in images)


def test_two_workers_over_many_chunks_match_one_process(small_store, tmp_path):
    rows = sample_rows(["chula-1"])
    rows += [dict(rows[2]), dict(rows[40])]  # keys repeated in other chunks (other workers)
    src = open_source(write_manifest(rows, tmp_path / "m.csv"))
    src.chunk_rows = 16
    report = ingest(src, tmp_path / "s", IngestConfig(batch_size=32, workers=2))
    assert (report.cells_added, report.cells_failed) == (117, 2)
    store = CellStore.open(tmp_path / "s")
    emb, keys = store.embeddings()
    ref_emb, ref_keys = CellStore.open(small_store).embeddings(where="slide_id = 'chula-1'")
    got, ref = np.argsort(keys.column("uid").to_numpy()), np.argsort(ref_keys.column("uid").to_numpy())
    assert np.array_equal(keys.column("uid").to_numpy()[got], ref_keys.column("uid").to_numpy()[ref])
    assert np.array_equal(np.asarray(emb)[got], np.asarray(ref_emb)[ref])
    again = ingest(src, tmp_path / "s", IngestConfig(batch_size=32, workers=2))
    assert (again.cells_added, again.cells_skipped, again.cells_failed) == (0, 117, 2)


def test_folder_and_annotation_paths_are_absolute(tmp_path, monkeypatch):
    (tmp_path / "crops" / "a").mkdir(parents=True)
    Image.new("RGB", (20, 20)).save(tmp_path / "crops" / "a" / "c0.png")
    Image.new("RGB", (50, 50)).save(tmp_path / "f7.png")
    (tmp_path / "f7.geojson").write_text('{"type": "Feature", "geometry": {"type": "Point", "coordinates": [9, 9]}}')
    monkeypatch.chdir(tmp_path)
    for path, fmt in (("crops", "crops"), ("crops", "fields"), ("f7.geojson", None)):
        tasks, fails = _items(open_source(path, fmt))
        assert not fails and tasks and all(os.path.isabs(t.image) and os.path.exists(t.image) for t in tasks)
