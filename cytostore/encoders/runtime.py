"""Encoder runtimes: PyTorch, ONNX Runtime and OpenVINO behind one call.

An encoder's model (``encoder.model``, whatever module it is) is exported to ONNX
once per export key (weights sha256, architecture, input size, the module's class,
structure and parameters, opset, batch size, torch version family) and cached in
``$CYTOSTORE_CACHE/onnx`` (default ``~/.cache/cytostore/onnx``): the graph
``KEY.onnx`` and a JSON sidecar ``KEY.json`` holding the graph's sha256 and the
tolerance measured against PyTorch. Both files are written atomically (temp file +
rename); a graph whose bytes do not match the recorded sha256 is exported again.

The graph takes the model-ready uint8 crops (N x S x S x 3) and scales and normalises
them itself, as ``normalise`` does in PyTorch: the runtime does that work, multi-threaded,
instead of a chain of PyTorch ops before every batch.

The tolerance of a runtime is measured on a fixed, seeded batch of synthetic cell
crops (``check_crops``): cosine between each crop's embedding from the runtime and
from PyTorch fp32 on the CPU; its min and median are stored per runtime version.
A runtime passes when the min cosine is at least ``RUNTIME_MIN_COSINE``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cytostore.errors import EncoderError, InputError
from cytostore.store.check import digest
from cytostore.store.provenance import RUNTIME_MIN_COSINE

RUNTIMES = ("auto", "torch", "onnx", "openvino")
# What ``auto`` picks on a CPU for a new table, in order, among the runtimes importable here
# whose tolerance passes: ONNX Runtime was the fastest on the machines measured
# (docs/runtime.md, benchmarks/ingest_throughput.py runtimes).
AUTO_ORDER = ("onnx", "openvino", "torch")
OPSET = 17
_MODULES = {"onnx": "onnxruntime", "openvino": "openvino"}


def cache_root() -> Path:
    """cytostore's user cache: ``$CYTOSTORE_CACHE``, default ``~/.cache/cytostore``."""
    return Path(os.environ.get("CYTOSTORE_CACHE") or Path.home() / ".cache" / "cytostore")


def cache_dir() -> Path:
    """Folder of the exported graphs: ``$CYTOSTORE_CACHE/onnx``, default ``~/.cache/cytostore/onnx``."""
    return cache_root() / "onnx"


def runtime_identity(name: str) -> str:
    """The runtime part of a table's identity: name and version family.

    ``torch`` stays ``torch`` (the only runtime of older tables; the torch version is
    description); ``onnx`` -> ``onnxruntime-MAJOR.MINOR``; ``openvino`` -> ``openvino-YEAR.MINOR``.
    """
    if name == "torch":
        return "torch"
    module = _MODULES[name]
    try:
        version = importlib.metadata.version(module)
    except importlib.metadata.PackageNotFoundError:
        version = "absent"
    return f"{module}-{'.'.join(version.split('.')[:2])}"


def runtime_name(identity: str | None) -> str | None:
    """The runtime name (torch, onnx, openvino) of an identity string, or None."""
    if identity is None:
        return None
    if identity == "torch":
        return "torch"
    for name, module in _MODULES.items():
        if identity.startswith(module + "-"):
            return name
    return None


def require(name: str):
    """Imports the runtime's module, or raises InputError naming the extra to install."""
    if name == "torch":
        import torch

        return torch
    try:
        if name == "onnx":
            import onnxruntime as mod
        else:
            import openvino as mod
    except ImportError as e:
        raise InputError(f"--runtime {name} needs {_MODULES[name]}: pip install 'cytostore[cpu]' "
                         f"(import failed: {e}); or use --runtime torch") from e
    return mod


def available(name: str) -> bool:
    """Whether the runtime's module imports here."""
    try:
        require(name)
    except InputError:
        return False
    return True


def resolve(runtime: str, on_gpu: bool, precision: str, table_runtime: str | None = None) -> str:
    """The runtime to use: ``torch``, ``onnx`` or ``openvino``.

    ``auto``: PyTorch on a GPU or for bf16/fp16; on a CPU the runtime that made the
    table (``table_runtime``, its identity string) when the table exists and that
    runtime is installed, so re-runs and resumes stay bit-identical; else the first
    importable of ``AUTO_ORDER`` (whose tolerance the ingest then checks, falling back
    to torch). An explicit runtime that is not installed is an InputError naming
    ``pip install 'cytostore[cpu]'``.
    """
    if runtime not in RUNTIMES:
        raise InputError(f"unknown runtime {runtime!r}; use one of {', '.join(RUNTIMES)}")
    if runtime == "auto":
        if on_gpu or precision in ("bf16", "fp16"):
            return "torch"
        name = runtime_name(table_runtime)
        if name is not None and available(name):
            return name
        return next(n for n in AUTO_ORDER if n == "torch" or available(n))
    if runtime != "torch":
        if on_gpu:
            raise InputError(f"--runtime {runtime} runs on the CPU; use --device cpu, or --runtime torch on the GPU")
        if precision in ("bf16", "fp16"):
            raise InputError(f"--runtime {runtime} runs in fp32; use --precision fp32/auto, or --runtime torch "
                             f"for {precision}")
        require(runtime)
    return runtime


def threads_for(threads: int = 0) -> int:
    """Intra-op threads: ``threads`` when given, else the cores this process may run on."""
    if threads < 0:
        raise InputError(f"--threads must be 0 (the cores available) or more, got {threads}")
    if threads:
        return threads
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def check_crops(n: int, size: int) -> np.ndarray:
    """A fixed batch of ``n`` synthetic cell crops (uint8, n x size x size x 3), seeded.

    Pale disks with a central pallor on a light background with noise: closer to the
    activations of real smears than uniform noise, and the same on every machine.
    """
    rng = np.random.default_rng(20240601)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        bg = rng.uniform(200, 240, 3)
        img = np.broadcast_to(bg, (size, size, 3)).copy()
        cx, cy = rng.uniform(0.35, 0.65, 2)
        d = np.hypot(xx - cx, yy - cy) / rng.uniform(0.15, 0.35)
        colour = rng.uniform(130, 210, 3) * np.array([1.0, 0.6, 0.7])
        cell = colour + (bg - colour) * rng.uniform(0, 0.6) * np.exp(-(d / 0.45) ** 2)[..., None]
        img[d < 1] = cell[d < 1]
        img += rng.normal(0, 6, img.shape)
        out[i] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of two (N, D) arrays, in float64."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(1) / np.maximum(den, 1e-30)


# -- export and cache ---------------------------------------------------------------
@dataclass
class Export:
    """An exported graph in the cache and its sidecar."""

    path: Path  # KEY.onnx
    meta: dict[str, Any]  # the sidecar: key fields, graph sha256, tolerance per runtime
    exported: bool  # True when this call exported it (False: reused from the cache)

    @property
    def sidecar(self) -> Path:
        return self.path.with_suffix(".json")


def export_fields(encoder, model, batch_size: int | None, opset: int = OPSET) -> dict[str, Any]:
    """What an export depends on; its canonical JSON's sha256 names the cached files."""
    import torch

    from cytostore.encoders.registry import state_dict_sha256

    return {"weights_sha256": encoder.weights_sha256, "arch": encoder.arch, "input_size": int(encoder.input_size),
            "module": f"{type(model).__module__}.{type(model).__qualname__}",
            "structure_sha256": hashlib.sha256(repr(model).encode()).hexdigest(),
            "parameters_sha256": state_dict_sha256(model), "opset": opset,
            "batch": int(batch_size) if batch_size else "dynamic", "input": "uint8 NHWC, normalised in the graph",
            "mean": [float(v) for v in encoder.mean], "std": [float(v) for v in encoder.std],
            "torch": ".".join(torch.__version__.split("+")[0].split(".")[:2])}


def _key(fields: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]


def atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_sidecar(path: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def ensure_export(encoder, batch_size: int | None, opset: int = OPSET) -> Export:
    """The cached ONNX graph of ``encoder.model`` (exported now when absent or damaged).

    The graph takes float32 NCHW crops, normalised as the encoder expects, and
    returns (N, dim). ``batch_size`` fixes the batch dimension (None: dynamic).
    """
    model = encoder.model
    fields = export_fields(encoder, model, batch_size, opset)
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{_key(fields)}.onnx"
    meta = _read_sidecar(path.with_suffix(".json"))
    if meta is not None and meta.get("fields") == fields and path.is_file():
        if digest(path) == meta.get("graph_sha256"):
            return Export(path, meta, exported=False)
    data = _export_bytes(model, encoder, batch_size, opset)
    atomic_write(path, data)
    meta = {"fields": fields, "graph_sha256": hashlib.sha256(data).hexdigest(), "tolerance": {}}
    atomic_write(path.with_suffix(".json"), json.dumps(meta, indent=1, sort_keys=True).encode())
    return Export(path, meta, exported=True)


def _export_bytes(model, encoder, batch_size: int | None, opset: int) -> bytes:
    import io

    import torch

    require("onnx")  # the graph is only useful with a runtime that reads it
    model = model.to("cpu").eval().to(memory_format=torch.contiguous_format)
    model = _with_normalisation(model, encoder.mean, encoder.std)
    x = torch.zeros((batch_size or 2, encoder.input_size, encoder.input_size, 3), dtype=torch.uint8)
    buf = io.BytesIO()
    dynamic = None if batch_size else {"input": {0: "batch"}, "embedding": {0: "batch"}}
    try:
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (x,), buf, opset_version=opset, input_names=["input"],
                              output_names=["embedding"], dynamic_axes=dynamic, dynamo=False)
    except Exception as e:  # the exporter raises many kinds; all mean "this model does not export"
        raise EncoderError(f"encoder {encoder.name}: ONNX export failed ({type(e).__name__}: {e}); "
                           "use --runtime torch") from e
    return buf.getvalue()


def _with_normalisation(model, mean, std):
    """``model`` behind ``normalise``: uint8 NHWC in, (N, dim) out (the exported graph)."""
    import torch

    class Normalised(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

        def forward(self, x):
            return self.model((x.permute(0, 3, 1, 2).float() / 255 - self.mean) / self.std)

    return Normalised().eval()


def tolerance(name: str, export: Export, encoder, threads: int = 0) -> dict[str, Any]:
    """The tolerance of runtime ``name`` against PyTorch fp32 on ``check_crops``, measured
    once per runtime version and stored in the export's sidecar.

    Returns ``runtime`` (identity string), ``min_cosine``, ``median_cosine``,
    ``max_abs_diff``, ``n``, ``threshold`` and ``passed``.
    """
    ident = runtime_identity(name)
    known = export.meta.get("tolerance", {}).get(ident)
    if isinstance(known, dict) and "min_cosine" in known:
        return {**known, "threshold": RUNTIME_MIN_COSINE, "passed": known["min_cosine"] >= RUNTIME_MIN_COSINE}
    import torch

    batch = export.meta["fields"]["batch"]
    n = batch if isinstance(batch, int) else 16
    crops = check_crops(n, encoder.input_size)
    with torch.inference_mode():
        want = encoder.model.to("cpu").eval()(normalise(torch.from_numpy(crops), encoder.mean, encoder.std))
    want = want.float().numpy()
    got = make_session(name, export.path, threads)(crops)
    cos = cosine_rows(want, got)
    check = {"runtime": ident, "min_cosine": float(cos.min()), "median_cosine": float(np.median(cos)),
             "max_abs_diff": float(np.abs(want - got).max()), "n": int(n),
             "crops": "cytostore.encoders.runtime.check_crops (synthetic, seeded)"}
    export.meta.setdefault("tolerance", {})[ident] = check
    atomic_write(export.sidecar, json.dumps(export.meta, indent=1, sort_keys=True).encode())
    return {**check, "threshold": RUNTIME_MIN_COSINE, "passed": check["min_cosine"] >= RUNTIME_MIN_COSINE}


# -- sessions -------------------------------------------------------------------------
def normalise(pixels, mean, std):
    """uint8 N x S x S x 3 (torch) -> float32 N x 3 x S x S, scaled and normalised."""
    import torch

    x = pixels.permute(0, 3, 1, 2).float().div_(255)
    shape = (1, 3, 1, 1)
    m = torch.tensor(mean, device=x.device).view(shape)
    s = torch.tensor(std, device=x.device).view(shape)
    return (x - m) / s


def make_session(name: str, path: Path, threads: int = 0):
    """A callable uint8 N x S x S x 3 crops (numpy) -> float32 (N, dim), for ``onnx`` or ``openvino``."""
    n_threads = threads_for(threads)
    if name == "onnx":
        ort = require("onnx")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = n_threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])

        def run_onnx(x):
            return sess.run(None, {"input": np.ascontiguousarray(x, dtype=np.uint8)})[0]

        return run_onnx
    if name == "openvino":
        ov = require("openvino")
        core = ov.Core()
        # f32 explicitly: OpenVINO's CPU default on bf16-capable cores is bf16.
        compiled = core.compile_model(core.read_model(str(path)), "CPU",
                                      {"INFERENCE_NUM_THREADS": n_threads, "INFERENCE_PRECISION_HINT": "f32",
                                       "PERFORMANCE_HINT": "LATENCY"})
        request = compiled.create_infer_request()

        def run_openvino(x):
            request.infer({0: np.ascontiguousarray(x, dtype=np.uint8)})
            return np.array(request.get_output_tensor(0).data, dtype=np.float32, copy=True)

        return run_openvino
    raise InputError(f"unknown runtime {name!r}; use one of {', '.join(RUNTIMES)}")
