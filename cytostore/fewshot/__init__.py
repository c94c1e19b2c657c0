"""Few-shot cell classification from prototypes.

The flow, one module each:

- ``prototypes``: feature normalisation (power, store-mean centring, L2),
  prototypes (class means or k-means within a class), scores, transductive refinement.
- ``support``: a support file (store cells or images) -> embeddings, checked against the table's encoder.
- ``tables``: ``prototypes.<name>.lance`` and ``predictions.<name>.lance`` in the store
  (class column ``prediction``; layout-1 sets read with ``label`` renamed), ``show_predictions``.
- ``classify``: :func:`fit`, :func:`predict`, :func:`suggest` and its :func:`montage`.
- ``scoring``: predictions against the labels already stored (accuracy, balanced accuracy,
  macro-F1, confusion matrix); used by ``predict`` and by ``mil predict``.
- ``episodes``: N-way K-shot episodic evaluation against k-NN and logistic regression.
"""

from cytostore.fewshot.classify import fit, montage, predict, suggest
from cytostore.fewshot.episodes import Episode, EpisodeSpec, evaluate, sample_episodes
from cytostore.fewshot.prototypes import UNKNOWN, FeatureTransform, PrototypeConfig, Prototypes
from cytostore.fewshot.support import SupportSet, read_support
from cytostore.fewshot.tables import PrototypeSet, load_prototypes, prototype_sets, read_predictions, show_predictions

__all__ = [
    "UNKNOWN",
    "Episode",
    "EpisodeSpec",
    "FeatureTransform",
    "PrototypeConfig",
    "PrototypeSet",
    "Prototypes",
    "SupportSet",
    "evaluate",
    "fit",
    "load_prototypes",
    "montage",
    "predict",
    "prototype_sets",
    "read_predictions",
    "read_support",
    "sample_episodes",
    "show_predictions",
    "suggest",
]
