"""Bad-input fuzzing at scale: the strategies and invariants of tests/test_fuzz.py
(tests/fuzz_strategies.py), many more examples, every failure counted instead of stopping.

Prints, per part: cases tried, outcomes (source read: ok / failures / refused; ingest and
search: exit codes), tracebacks (exit 3 or an exception other than InputError) and
invariant violations (a lost input, a silent change, store damage), with the first few
examples that broke one. Target: 0 tracebacks, 0 violations.

    nice -n 10 .venv/bin/python benchmarks/fuzz_inputs.py --examples 2000 --ingest-examples 100
"""

from __future__ import annotations

import argparse
import collections
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import fuzz_strategies as fz  # noqa: E402
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402


class Tally:
    """Outcomes, tracebacks and invariant violations of one part."""

    def __init__(self, name: str):
        self.name, self.tried, self.outcomes = name, 0, collections.Counter()
        self.tracebacks, self.violations, self.examples = 0, 0, []

    def run(self, fn, *args) -> None:
        self.tried += 1
        try:
            self.outcomes[str(fn(*args))] += 1
        except AssertionError as e:
            self.violations += 1
            self._keep(args, f"violation: {e}")
        except Exception as e:  # noqa: BLE001 - counting every crash is the point of the benchmark
            self.tracebacks += 1
            self._keep(args, "".join(traceback.format_exception(type(e), e, e.__traceback__))[-1500:])

    def _keep(self, args, what: str) -> None:
        if len(self.examples) < 3:
            self.examples.append(f"{str(args)[:600]}\n    {what[:1500]}")

    def line(self) -> str:
        out = ", ".join(f"{k}: {v}" for k, v in sorted(self.outcomes.items()))
        return (f"{self.name:<22} cases {self.tried:>6}  tracebacks {self.tracebacks}  violations {self.violations}"
                f"  outcomes {{{out}}}")


def _drive(strategy, n: int, body) -> None:
    @settings(max_examples=n, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def run(value):
        body(value)

    run()


def read_source(plan) -> str:
    with tempfile.TemporaryDirectory() as d:
        return fz.check_source(fz.write_case(plan, Path(d)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples", type=int, default=2000, help="source reads per format")
    ap.add_argument("--ingest-examples", type=int, default=100, help="full CLI ingests per format (~0.5-1 s each)")
    ap.add_argument("--search-examples", type=int, default=300, help="search --where filters")
    args = ap.parse_args()

    from typer.testing import CliRunner

    from cli.main import app

    runner = CliRunner()
    t0 = time.time()
    tallies: list[Tally] = []
    work = Path(tempfile.mkdtemp(prefix="fuzz-inputs-"))
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    weights = work / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("test_efficientnet", num_classes=0).state_dict().items()},
              str(weights))
    template = fz.make_template(work / "t", weights, "test_efficientnet")

    def ingest(case: fz.Case, options: list[str]) -> str:
        with tempfile.TemporaryDirectory() as d:
            store = fz.fresh_store(template, Path(d) / "store")
            before = fz.snapshot(store)
            res = runner.invoke(app, ["ingest", str(case.source), "--store", str(store), "--encoder",
                                      "test_efficientnet", "--weights", str(weights), "--device", "cpu", "--quiet",
                                      *case.args, *options])
            out = res.output + (repr(res.exception) if res.exit_code not in {0, 1, 2} else "")
            if res.exit_code not in {0, 1, 2}:
                raise RuntimeError(f"exit {res.exit_code}: {out[-1500:]}")
            fz.check_ingest(case, store, before, res.exit_code, out)
            return f"exit {res.exit_code}"

    for fmt, strategy in sorted(fz.SOURCES.items()):
        t = Tally(f"read {fmt}")
        tallies.append(t)
        _drive(strategy, args.examples, lambda plan: t.run(read_source, plan))
        print(t.line(), flush=True)
    for fmt, strategy in sorted(fz.SOURCES.items()):
        t = Tally(f"ingest {fmt}")
        tallies.append(t)

        def one(plan, t=t):
            with tempfile.TemporaryDirectory() as d:
                t.run(lambda p: ingest(fz.write_case(p, Path(d) / "in"), []), plan)

        if args.ingest_examples:
            _drive(strategy, args.ingest_examples, one)
        print(t.line(), flush=True)
    t = Tally("ingest options")
    tallies.append(t)

    def with_options(pair):
        options, plan = pair
        with tempfile.TemporaryDirectory() as d:
            t.run(lambda o, p: ingest(fz.write_case(p, Path(d) / "in"), o), options, plan)

    from hypothesis import strategies as st

    if args.ingest_examples:
        _drive(st.tuples(fz.ingest_options(), fz.manifests()), args.ingest_examples, with_options)
    print(t.line(), flush=True)
    t = Tally("search --where")
    tallies.append(t)
    store = fz.fresh_store(template, work / "search-store")
    before = fz.snapshot(store)

    def search(where: str) -> str:
        res = runner.invoke(app, ["search", "--store", str(store), "--slide", fz.BASE_SLIDE, "--cell", "20_20",
                                  "-k", "3", "--where", where, "--json"])
        if res.exit_code not in {0, 2} or "internal error" in res.output:
            raise RuntimeError(f"exit {res.exit_code}: {res.output[-800:]} {res.exception!r}")
        return f"exit {res.exit_code}"

    if args.search_examples:
        _drive(fz.where_texts, args.search_examples, lambda w: t.run(search, w))
    damaged = fz.snapshot(store) != before
    print(t.line(), flush=True)

    total = sum(x.tried for x in tallies)
    print(f"\ntotal cases {total}, tracebacks {sum(x.tracebacks for x in tallies)}, "
          f"invariant violations (lost, changed, store damage) {sum(x.violations for x in tallies)}, "
          f"search store damaged: {damaged}; {time.time() - t0:.0f} s")
    for x in tallies:
        for ex in x.examples:
            print(f"\n[{x.name}] {ex}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
