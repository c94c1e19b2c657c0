"""How an ingest runs (IngestConfig) and what it did (IngestReport)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from cytostore.imaging import CropPolicy

ENGINES = ("local", "ray")


@dataclass(frozen=True)
class IngestConfig:
    """How an ingest runs."""

    encoder: str = "efficientnet_lite0"  # registry, timm or hub name
    weights: str | None = None  # local checkpoint loaded into the encoder
    table: str | None = None  # cell-table name; default derived from the encoder name
    crop: CropPolicy = field(default_factory=CropPolicy)  # crop geometry
    detector: Any = None  # DetectorParams for sources without coordinates
    device: str = "auto"  # auto, cpu or cuda
    precision: str = "auto"  # auto (bf16/fp16 on GPU, fp32 on CPU), fp32, bf16, fp16
    batch_size: int = 64  # cells per forward pass
    workers: int = 0  # DataLoader worker processes reading and cropping
    runtime: str = "auto"  # auto, torch, onnx or openvino (cytostore.encoders.runtime.resolve; docs/runtime.md)
    threads: int = 0  # intra-op threads of the runtime; 0 = the cores available (torch keeps its own)
    input_size: int = 0  # side the crops are resized to; 0 = the encoder's own (e.g. 128 for EfficientNet-Lite)
    embedding_dtype: str = "float16"  # stored dtype: float16 or float32
    commit_rows: int = 0  # commit once this many rows are pending; 0 = the writer's default (65,536)
    commit_seconds: float = 0.0  # ... or this long after the last commit; 0 = the writer's default (30 s)
    wait_for_lock: bool = False  # wait for another writer instead of exiting
    engine: str = "local"  # local (this process) or ray (a Ray Data pipeline)
    ray_address: str | None = None  # Ray cluster to join; None starts a local one
    gpus_per_worker: float = 0.0  # GPU share of each Ray encoder actor (0 = one GPU when there are GPUs)
    ray_actors: int = 0  # Ray encoder actors; 0 = one per GPU share, or half the CPU cores
    # Cell options (cytostore.encoders.features, cytostore.stain, cytostore.morphometrics; docs/embeddings.md):
    features: str = "final"  # final (the backbone's pooled output) or multilayer (later stages pooled too)
    tta: int = 1  # dihedral test-time augmentation: 1 (off), 4 rotations or 8 rotations and flips
    zoom: int = 1  # scales: 1 (the crop) or 2 (and its central half enlarged, features concatenated)
    stain: str = "none"  # colour normalisation of crops before the encoder: none, reinhard or macenko
    stain_reference: Any = None  # reference: an image path, None (a sample of the store's thumbnails) or stats
    morphometrics: bool = False  # morph_* columns (size, shape, pallor, colour) from each crop

    def __post_init__(self) -> None:
        # The cell options, checked before anything is touched (the same lists as features.FEATURES/TTA, stain.METHODS).
        from cytostore.errors import InputError

        for what, value, allowed in (("--features", self.features, ("final", "multilayer")),
                                     ("--tta", self.tta, (1, 4, 8)),
                                     ("--zoom", self.zoom, (1, 2)),
                                     ("--stain", self.stain, ("none", "reinhard", "macenko"))):
            if value not in allowed:
                raise InputError(f"unknown {what} {value!r}; use one of {', '.join(map(str, allowed))}")

    def crop_hooks(self) -> dict[str, Any]:
        """The CropSpec fields of the cell options (after ``with_cell_options`` resolved the stain reference)."""
        stain = self.stain_reference if self.stain != "none" and isinstance(self.stain_reference, dict) else None
        return {"stain": stain, "morphometrics": self.morphometrics}


def with_cell_options(config: IngestConfig, encoder, store):
    """(config, encoder) with the cell options applied: ``FeatureModel`` around the encoder's
    model (--features, --tta) and the stain reference resolved to numbers (--stain).

    The options are recorded in ``encoder.extra["cell_options"]``, which
    ``make_provenance`` puts into the table's identity.
    """
    import dataclasses

    from cytostore.errors import InputError

    if config.features != "final" or config.tta != 1 or config.zoom != 1:
        if config.engine == "ray":
            raise InputError("--features, --tta and --zoom run on --engine local for now; leave them out with "
                             "--engine ray")
        from cytostore.encoders.features import with_options

        encoder = with_options(encoder.load() if hasattr(encoder, "load") else encoder, config.features, config.tta,
                               config.zoom)
    stain = None
    if config.stain != "none":
        from cytostore import stain as stain_mod
        from cytostore.store import table_name_for

        encoder = encoder.load() if hasattr(encoder, "load") else encoder
        encoder = dataclasses.replace(encoder, name=f"{encoder.name}_{config.stain}")  # the default table name
        table = table_name_for(config.table or encoder.name)
        stored = store.provenance(table).get("identity") if store.has_table(table) else None
        stain = stain_mod.resolve(config.stain, config.stain_reference, store, table, stored)
        config = dataclasses.replace(config, stain_reference=stain)
    encoder.extra = {**encoder.extra, "cell_options": {"stain": stain, "morphometrics": config.morphometrics}}
    return config, encoder


@dataclass
class IngestReport:
    """What an ingest did."""

    store: str
    table: str
    run_id: str
    cells_added: int = 0
    cells_skipped: int = 0
    cells_failed: int = 0
    slides: int = 0
    seconds: float = 0.0
    cells_per_second: float = 0.0
    failures: list[dict[str, Any]] = field(default_factory=list)  # the first ones, for the summary
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


