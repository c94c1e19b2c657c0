"""Encoders: a registry of pretrained backbones that turn cell crops into vectors, and
encoders trained from a store's cells (``train_encoder``, found by name in the user registry)."""

from cytostore.encoders.registry import Encoder, EncoderSpec, list_encoders, register_encoder
from cytostore.encoders.timm_encoders import create_encoder, read_checkpoint
from cytostore.encoders.train import TrainConfig, train_encoder

__all__ = ["Encoder", "EncoderSpec", "TrainConfig", "create_encoder", "list_encoders", "read_checkpoint",
           "register_encoder", "train_encoder"]
