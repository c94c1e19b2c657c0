"""Injected faults at every commit of an ingest, then a re-run: is anything lost or repeated?

    nice -n 10 python benchmarks/fault_campaign.py                   # 3 fields, 360 cells, commits of 40
    python benchmarks/fault_campaign.py --commit-rows 20 --out /work/runs/faults

One uninterrupted ingest (the reference) of the bundled sample's fields with a small
random-weight timm encoder, then, for every commit N the reference made:

* ``exit``: the ingest process ends abruptly (``os._exit``, as SIGKILL would: no clean-up,
  no lock release) right after commit N;
* ``enospc`` / ``erofs``: the (N+1)-th append raises ``OSError(ENOSPC)`` / ``OSError(EROFS)``
  (disk full, read-only file system) through the CLI, which must exit 2 naming the fault.

After each fault the store must hold exactly the rows committed before it, `store check`
must pass, and a re-run of the same ingest must give the reference's keys and
bit-identical embeddings (no cell lost, none stored twice). Prints one line per case and
the totals, then one JSON line.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from test_hardening_store import ABORT_AFTER_COMMIT as EXIT_AFTER  # noqa: E402 - the test suite's own fault


def keyed(store: Path) -> tuple[np.ndarray, np.ndarray]:
    from cytostore import CellStore

    emb, keys = CellStore.open(store).embeddings()
    uids = keys.column("uid").to_numpy()
    order = np.argsort(uids)
    return uids[order], np.asarray(emb)[order]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fields", default="chula-1,chula-27,chula-255", help="sample fields to ingest")
    ap.add_argument("--commit-rows", type=int, default=40)
    ap.add_argument("--out", help="scratch folder (default a temporary one)")
    args = ap.parse_args()

    import lance
    import timm
    import torch
    from safetensors.torch import save_file
    from typer.testing import CliRunner

    from cli.main import app
    from conftest import TINY, sample_rows, write_manifest
    from cytostore import CellStore

    runner = CliRunner()
    base = Path(tempfile.mkdtemp(prefix="cytostore-faults-", dir=args.out))
    torch.manual_seed(0)
    weights = base / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model(TINY, num_classes=0).state_dict().items()},
              str(weights))
    manifest = write_manifest(sample_rows(args.fields.split(",")), base / "m.csv")

    def cmd(store: Path) -> list[str]:
        return ["ingest", str(manifest), "--store", str(store), "--encoder", TINY, "--weights", str(weights),
                "--device", "cpu", "--batch-size", "32", "--commit-rows", str(args.commit_rows), "--json"]

    t0 = time.perf_counter()
    ref = base / "reference"
    res = runner.invoke(app, cmd(ref))
    assert res.exit_code == 0, res.output
    ref_uids, ref_emb = keyed(ref)
    total = len(ref_uids)
    commits = -(-total // args.commit_rows)
    cases, lost, repeated, bad = 0, 0, 0, []
    real_write = lance.write_dataset
    for kind in ("exit", "enospc", "erofs"):
        for n in range(1, commits):
            store = base / f"{kind}{n}"
            if kind == "exit":
                proc = subprocess.run([sys.executable, "-c", EXIT_AFTER, str(n), *cmd(store)], cwd=REPO,
                                      capture_output=True, text=True)
                ok_fault = proc.returncode == 9
            else:
                code = errno.ENOSPC if kind == "enospc" else errno.EROFS
                appends = [0]

                def failing(data, uri, *a, mode="create", _code=code, _n=n, _appends=appends, **kw):
                    if mode == "append" and "cells." in str(uri):
                        _appends[0] += 1
                        if _appends[0] == _n + 1:
                            raise OSError(_code, os.strerror(_code), str(uri))
                    return real_write(data, uri, *a, mode=mode, **kw)

                lance.write_dataset = failing
                try:
                    res = runner.invoke(app, cmd(store))
                finally:
                    lance.write_dataset = real_write
                ok_fault = res.exit_code == 2 and "Traceback" not in res.output
            kept = CellStore.open(store).count()
            checked = runner.invoke(app, ["store", "check", "--store", str(store)]).exit_code == 0
            res = runner.invoke(app, cmd(store))
            uids, emb = keyed(store)
            cases += 1
            lost += int(len(np.setdiff1d(ref_uids, uids)))
            repeated += int(len(uids) - len(np.unique(uids)))
            same = np.array_equal(uids, ref_uids) and np.array_equal(emb, ref_emb)
            good = ok_fault and kept == n * args.commit_rows and checked and res.exit_code == 0 and same
            if not good:
                bad.append(f"{kind}{n}")
            print(f"{kind:>6} after commit {n:>2}: fault handled {ok_fault}, kept {kept:>4} rows, store check "
                  f"{'ok' if checked else 'FAILED'}, re-run equal {same}", flush=True)
            shutil.rmtree(store)
    shutil.rmtree(base, ignore_errors=True)
    out = {"cells": total, "commit_rows": args.commit_rows, "cases": cases, "faults_injected": cases,
           "rows_lost": lost, "rows_repeated": repeated, "failed_cases": bad,
           "seconds": round(time.perf_counter() - t0, 1)}
    print(f"{cases} faults injected (abrupt exit, disk full, read-only after each of {commits - 1} commits of "
          f"{args.commit_rows} rows, {total} cells): rows lost {lost}, rows stored twice {repeated}, "
          f"cases failing {len(bad)}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
