"""Typed errors. Each says what went wrong, where, and how to fix it."""

from __future__ import annotations


class CytostoreError(Exception):
    """Base class of every error cytostore raises on purpose."""


class InputError(CytostoreError):
    """A file, row or argument given by the user cannot be used."""


class StoreError(CytostoreError):
    """The store is missing, damaged, or does not hold what was asked for."""


class ProvenanceError(StoreError):
    """Rows made another way (encoder, weights, preprocessing) than the table's."""


class StoreLockedError(StoreError):
    """Another process is writing the same table."""


class EncoderError(CytostoreError):
    """An encoder cannot be created or its weights cannot be loaded."""
