"""Ingest on a local Ray instance: same cells and embeddings as the single-process
ingest, and no cell lost or repeated when a worker or the driver is killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import SMALL_FIELDS, sample_rows, write_manifest
from cytostore import CellStore, IngestConfig, ingest, open_source
from cytostore.errors import CytostoreError, InputError

ray = pytest.importorskip("ray", reason="--engine ray needs the [scale] extra (`make setup` installs it)")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray instance of this machine's cores, shared by the tests of this module."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield ray
    ray.shutdown()


def keyed(store: Path) -> tuple[np.ndarray, np.ndarray]:
    """(uids, embeddings) of a store, sorted by uid."""
    emb, keys = CellStore.open(store).embeddings()
    uids = keys.column("uid").to_numpy()
    order = np.argsort(uids)
    return uids[order], np.asarray(emb)[order]


def assert_same_cells(store: Path, reference: Path) -> None:
    uids, emb = keyed(store)
    ref_uids, ref_emb = keyed(reference)
    assert len(np.unique(uids)) == len(uids), "a cell is stored twice"
    np.testing.assert_array_equal(uids, ref_uids)
    # Same encoder, same fixed-size padded batches: the very same float16 values.
    np.testing.assert_array_equal(emb, ref_emb)


def ray_processes(name: str) -> list:
    import psutil

    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if name in " ".join(p.info["cmdline"] or []):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def table_committed(store: Path) -> bool:
    return any((p / "_versions").is_dir() for p in store.glob("cells.*.lance"))


def test_ray_ingest_matches_local_and_survives_a_killed_encoder_worker(local_ray, tmp_path, small_manifest,
                                                                       small_store, monkeypatch):
    import cytostore.store.writer as writer_mod

    store = tmp_path / "ray"
    killed: list[int] = []
    real = writer_mod.CellWriter._commit_pending

    def commit_then_kill_the_encoder(self):
        # Injected at a fixed point, not raced: right after the first commit, SIGKILL the encoder
        # actor's process; Ray restarts it and retries its task.
        rows = real(self)
        if rows and not killed:
            actors = ray_processes("EmbedCells")
            assert actors, "no encoder actor process to kill at the first commit"
            actors[0].send_signal(signal.SIGKILL)
            killed.append(actors[0].pid)
        return rows

    monkeypatch.setattr(writer_mod.CellWriter, "_commit_pending", commit_then_kill_the_encoder)
    report = ingest(open_source(small_manifest), store, IngestConfig(batch_size=32, engine="ray", commit_rows=32))
    monkeypatch.setattr(writer_mod.CellWriter, "_commit_pending", real)
    assert killed
    assert report.cells_failed == 0
    assert report.cells_added == 360
    assert_same_cells(store, small_store)
    # Provenance is the single-process ingest's.
    assert CellStore.open(store).provenance()["encoder"] == CellStore.open(small_store).provenance()["encoder"]

    again = ingest(open_source(small_manifest), store, IngestConfig(batch_size=32, engine="ray"))
    assert (again.cells_added, again.cells_skipped) == (0, 360)
    assert_same_cells(store, small_store)


def test_ray_ingest_records_the_same_failures_as_local(local_ray, tmp_path):
    rows = sample_rows(SMALL_FIELDS[:1])
    missing = {**rows[0], "image": str(tmp_path / "no-such-field.jpg")}
    outside = {**rows[1], "x": "100000", "y": "100000"}
    manifest = write_manifest(rows + [missing, outside], tmp_path / "bad.csv")
    reports, failures = {}, {}
    for engine in ("local", "ray"):
        store = tmp_path / engine
        reports[engine] = ingest(open_source(manifest), store, IngestConfig(batch_size=32, engine=engine))
        f = CellStore.open(store).failures()
        failures[engine] = sorted(zip(f.column("where").to_pylist(), f.column("stage").to_pylist(),
                                      f.column("reason").to_pylist()))
    assert reports["ray"].cells_failed == reports["local"].cells_failed == 2
    assert reports["ray"].cells_added == reports["local"].cells_added == len(rows)
    assert len(failures["ray"]) == 2 and failures["ray"] == failures["local"]
    assert any("no-such-field.jpg" in w for w, _, _ in failures["ray"])
    assert_same_cells(tmp_path / "ray", tmp_path / "local")


def test_ray_ingest_resumes_a_partial_store_and_a_killed_driver(local_ray, tmp_path, small_store):
    store = tmp_path / "resumed"
    first = write_manifest(sample_rows(SMALL_FIELDS[:1]), tmp_path / "first.csv")
    full = write_manifest(sample_rows(SMALL_FIELDS), tmp_path / "full.csv")
    part = ingest(open_source(first), store, IngestConfig(batch_size=32))  # single-process, one field
    assert 0 < part.cells_added < 360

    # A Ray ingest of all three fields in another process, ended abruptly (os._exit, as a SIGKILL
    # would) right after its first commit: an injected fault at a fixed point, not a timed kill.
    script = ("import os, sys; from cytostore import IngestConfig, ingest, open_source\n"
              "from cytostore.store import writer\n"
              "real = writer.CellWriter._commit_pending\n"
              "def commit_then_die(self):\n"
              "    rows = real(self)\n"
              "    if rows:\n"
              "        os._exit(9)\n"
              "    return rows\n"
              "writer.CellWriter._commit_pending = commit_then_die\n"
              "ingest(open_source(sys.argv[1]), sys.argv[2], IngestConfig(batch_size=32, engine='ray', commit_rows=32))")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-c", script, str(full), str(store)]
    log = tmp_path / "driver.log"
    with open(log, "w") as fh:  # a file, not a pipe: the Ray processes the driver started hold it open
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=fh,
                                start_new_session=True)
        try:
            proc.wait(timeout=600)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the Ray instance the dead driver started
            except ProcessLookupError:
                pass
    assert proc.returncode == 9, log.read_text()[-2000:]
    rows = CellStore.open(store).count()
    assert part.cells_added < rows < 360, "ended after the first commit, before the last"

    report = ingest(open_source(full), store, IngestConfig(batch_size=32, engine="ray"))
    stored_before = CellStore.open(store).count() - report.cells_added
    assert report.cells_skipped == stored_before >= rows
    assert_same_cells(store, small_store)


def test_ray_cluster_plan_and_bad_options(local_ray, tmp_path, small_manifest):
    from cytostore.ingest.ray import plan_cluster

    plan = plan_cluster(ray, IngestConfig(engine="ray"))
    assert (plan.device, plan.embed_actors, plan.gpus_per_actor) == ("cpu", 1, 0.0)
    with pytest.raises(CytostoreError, match="no GPU"):
        plan_cluster(ray, IngestConfig(engine="ray", device="cuda"))
    with pytest.raises(InputError, match="gpus-per-worker"):
        plan_cluster(ray, IngestConfig(engine="ray", gpus_per_worker=-1))
    with pytest.raises(InputError, match="unknown --engine"):
        ingest(open_source(small_manifest), tmp_path / "s", IngestConfig(engine="spark"))
    assert not (tmp_path / "s").exists()


@pytest.mark.gpu
def test_ray_ingest_on_gpu_matches_closely(local_ray, tmp_path, small_manifest, small_store):
    report = ingest(open_source(small_manifest), tmp_path / "gpu",
                    IngestConfig(batch_size=32, engine="ray", device="cuda", precision="fp32"))
    assert report.cells_added == 360
    uids, emb = keyed(tmp_path / "gpu")
    ref_uids, ref_emb = keyed(small_store)
    np.testing.assert_array_equal(uids, ref_uids)
    np.testing.assert_allclose(emb.astype(np.float32), ref_emb.astype(np.float32), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
def test_local_ingest_on_cuda_bf16_matches_cpu_closely(tmp_path, small_manifest, small_store):
    report = ingest(open_source(small_manifest), tmp_path / "cuda",
                    IngestConfig(batch_size=64, device="cuda", precision="bf16"))
    assert report.cells_added == 360
    uids, emb = keyed(tmp_path / "cuda")
    ref_uids, ref_emb = keyed(small_store)
    np.testing.assert_array_equal(uids, ref_uids)
    a, b = emb.astype(np.float32), ref_emb.astype(np.float32)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cos.min() > 0.98, cos.min()
