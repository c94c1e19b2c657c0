"""Folder sources: cell crops (one image, one cell) and fields or slides whose
cells the detector finds."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pyarrow as pa

from cytostore.errors import InputError
from cytostore.imaging import IMAGE_SUFFIXES, SLIDE_SUFFIXES
from cytostore.keys import check_id
from cytostore.sources.base import (CellRecord, ImageTask, SourceFailure, SourceItem, SourceOptions, absolute,
                                    image_files, safe_slide_id, shard_of)


class CropFolderSource:
    """Every image under the folder is one cell crop.

    The slide id is ``--slide-id`` or the crop's parent folder (the root folder's
    name with ``--labels-from-folders``, where the parent folder is the label).
    """

    extra_schema = pa.schema([])

    shard_index, shard_count = 0, 1

    def __init__(self, root: str | Path, options: SourceOptions = SourceOptions()):
        self.root = absolute(root)
        self.options = options
        if not self.root.is_dir():
            raise InputError(f"{self.root}: not a folder of crops")

    def shard(self, index: int, count: int) -> CropFolderSource:
        """Files index, index+count, ... of the sorted listing."""
        return shard_of(self, index, count)

    def __iter__(self) -> Iterator[SourceItem]:
        for k, path in enumerate(image_files(self.root, IMAGE_SUFFIXES)):
            if k % self.shard_count != self.shard_index:
                continue
            where = str(path)
            try:
                parent = path.parent.name if path.parent != self.root else self.root.name
                label = parent if self.options.labels_from_folders else None
                if self.options.slide_id:
                    slide = self.options.slide_id
                elif self.options.labels_from_folders:
                    slide = self.root.name
                else:
                    slide = parent
                slide_id = safe_slide_id(slide, where)
                # Relative path without suffix: unique within the folder, stable across runs.
                cell_id = check_id("~".join(path.relative_to(self.root).with_suffix("").parts), "cell_id")
            except InputError as e:
                yield SourceFailure(where, str(e))
                continue
            rec = CellRecord(slide_id=slide_id, cell_id=cell_id, x=None, y=None, label=label, source_ref=where)
            yield ImageTask(image=str(path), slide_id=slide_id, cells=[rec], source_ref=where)


class FieldFolderSource:
    """Fields of view (or whole slides) with no coordinates: the detector finds the cells.

    A field's slide id is its file stem; with ``--labels-from-folders`` the parent
    folder becomes the slide label.
    """

    extra_schema = pa.schema([])

    shard_index, shard_count = 0, 1

    def __init__(self, root: str | Path, options: SourceOptions = SourceOptions(), slides: bool = False):
        self.root = absolute(root)
        self.options = options
        self.slides = slides
        self.suffixes = SLIDE_SUFFIXES if slides else IMAGE_SUFFIXES
        if not self.root.exists():
            raise InputError(f"{self.root}: no such file or folder")

    def shard(self, index: int, count: int) -> FieldFolderSource | None:
        """Fields index, index+count, ...; None for whole slides, whose tiles are shared out instead."""
        return None if self.slides or self.root.is_file() else shard_of(self, index, count)

    def __iter__(self) -> Iterator[SourceItem]:
        files = [self.root] if self.root.is_file() else image_files(self.root, self.suffixes)
        seen: dict[str, Path] = {}  # every shard lists every file, so a repeated slide id is found once
        for k, path in enumerate(files):
            where = str(path)
            mine = k % self.shard_count == self.shard_index
            try:
                slide_id = safe_slide_id(self.options.slide_id or path.stem, where)
            except InputError as e:
                if mine:
                    yield SourceFailure(where, str(e))
                continue
            if slide_id in seen:
                if mine:
                    yield SourceFailure(where, f"slide id {slide_id!r} is also the stem of {seen[slide_id]}; "
                                        "rename one of them (a slide id must be unique)", slide_id=slide_id)
                continue
            seen[slide_id] = path
            if not mine:
                continue
            label = path.parent.name if self.options.labels_from_folders else None
            yield ImageTask(image=str(path), slide_id=slide_id, cells=None, slide_label=label, source_ref=where)
