"""Slide-level multiple-instance learning on the cell embeddings of a store.

labels (slide labels, checks) -> bags (slides -> bags of stored embeddings) ->
models (ABMIL, mean pooling) -> train (one fit) -> cv (grouped k-fold + final
model) -> artifacts (model folder) -> infer (predict, explain, montage);
synthetic writes generated stores for tests. torch loads only when a model is built.
"""

from cytostore.mil.artifacts import MILModel, load_model
from cytostore.mil.bags import Bag, BagSet
from cytostore.mil.cv import TrainReport, make_folds, train_mil
from cytostore.mil.infer import Explanation, Predictions, explain, montage, predict
from cytostore.mil.labels import SlideLabels, read_labels_file
from cytostore.mil.train import TrainConfig

__all__ = [
    "Bag",
    "BagSet",
    "Explanation",
    "MILModel",
    "Predictions",
    "SlideLabels",
    "TrainConfig",
    "TrainReport",
    "explain",
    "load_model",
    "make_folds",
    "montage",
    "predict",
    "read_labels_file",
    "train_mil",
]
