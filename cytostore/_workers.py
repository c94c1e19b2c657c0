"""The torch Dataset wrapper that spawned DataLoader workers unpickle.

Kept apart so importing cytostore.embed does not import torch.
"""

from __future__ import annotations

import torch.utils.data as tud


class StreamDataset(tud.IterableDataset):
    """Iterable dataset over a cytostore.embed.TaskStream."""

    def __init__(self, stream):
        super().__init__()
        self.stream = stream

    def __iter__(self):
        return iter(self.stream)
