"""Encoders: a registry of pretrained backbones that turn cell crops into vectors."""

from cytostore.encoders.registry import Encoder, EncoderSpec, list_encoders, register_encoder
from cytostore.encoders.timm_encoders import create_encoder, read_checkpoint

__all__ = ["Encoder", "EncoderSpec", "create_encoder", "list_encoders", "read_checkpoint", "register_encoder"]
