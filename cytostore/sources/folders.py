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
                                    image_files, safe_slide_id, shard_of, unreadable_entries)


CROP_SLIDE_FROM = ("auto", "parent", "path", "root", "fixed")
FIELD_SLIDE_FROM = ("auto", "stem", "path")


def _check_slide_from(mode: str, allowed: tuple[str, ...], what: str, fixed: str | None) -> str:
    if mode not in allowed:
        raise InputError(f"--slide-from {mode!r} is not one of {', '.join(allowed)} for {what}")
    if mode == "fixed" and not fixed:
        raise InputError("--slide-from fixed needs --slide-id ID")
    if fixed and mode not in {"auto", "fixed"}:
        raise InputError(f"--slide-id and --slide-from {mode} both name the slide; pass one of them")
    return mode


class CropFolderSource:
    """Every image under the folder is one cell crop.

    The slide id (``slide_from``): ``auto`` (default) is ``--slide-id``, else the crop's
    parent folder, or the root folder's name with ``--labels-from-folders`` (where the
    parent folder is the label); ``parent`` is the folder holding the crop, not counting
    the label folder (the root's name for crops at the top); ``path`` is the relative
    path of that folder, its parts joined by ``~``; ``root`` is the root folder's name;
    ``fixed`` is ``--slide-id``. ``slide_prefix`` is put before every slide id.
    """

    extra_schema = pa.schema([])

    shard_index, shard_count = 0, 1

    def __init__(self, root: str | Path, options: SourceOptions = SourceOptions(), slide_from: str = "auto",
                 slide_prefix: str = ""):
        self.root = absolute(root)
        self.options = options
        self.slide_from = _check_slide_from(slide_from, CROP_SLIDE_FROM, "crops", options.slide_id)
        self.slide_prefix = slide_prefix or ""
        if not self.root.is_dir():
            raise InputError(f"{self.root}: not a folder of crops")

    def slide_of(self, path: Path) -> str:
        """The slide id (before the prefix) of the crop at ``path``."""
        dirs = path.relative_to(self.root).parent.parts
        if self.slide_from == "auto":
            if self.options.slide_id:
                return self.options.slide_id
            return self.root.name if self.options.labels_from_folders or not dirs else dirs[-1]
        if self.slide_from in {"root", "fixed"}:
            return self.options.slide_id if self.slide_from == "fixed" else self.root.name
        if self.options.labels_from_folders:
            dirs = dirs[:-1]  # the last folder is the label
        if not dirs:
            return self.root.name
        return dirs[-1] if self.slide_from == "parent" else "~".join(dirs)

    @property
    def n_images(self) -> int:
        """Crops to read (the total shown by progress; lists the folder)."""
        return len(image_files(self.root, IMAGE_SUFFIXES))

    def shard(self, index: int, count: int) -> CropFolderSource:
        """Files index, index+count, ... of the sorted listing."""
        return shard_of(self, index, count)

    def __iter__(self) -> Iterator[SourceItem]:
        if self.shard_index == 0:
            yield from unreadable_entries(self.root, IMAGE_SUFFIXES)
        for k, path in enumerate(image_files(self.root, IMAGE_SUFFIXES)):
            if k % self.shard_count != self.shard_index:
                continue
            where = str(path)
            try:
                parent = path.parent.name if path.parent != self.root else self.root.name
                label = parent if self.options.labels_from_folders else None
                slide_id = safe_slide_id(self.slide_prefix + self.slide_of(path), where)
                # Relative path without suffix: unique within the folder, stable across runs.
                cell_id = check_id("~".join(path.relative_to(self.root).with_suffix("").parts), "cell_id")
            except InputError as e:
                yield SourceFailure(where, str(e))
                continue
            rec = CellRecord(slide_id=slide_id, cell_id=cell_id, x=None, y=None, label=label, source_ref=where)
            yield ImageTask(image=str(path), slide_id=slide_id, cells=[rec], source_ref=where)


class FieldFolderSource:
    """Fields of view (or whole slides) with no coordinates: the detector finds the cells.

    A field's slide id (``slide_from``) is ``--slide-id`` or its file stem (``auto``,
    default), its file stem (``stem``), or its path relative to the root without the
    suffix, parts joined by ``~`` (``path``: for microscopes that name every field 1.jpg);
    ``slide_prefix`` is put before it. With ``--labels-from-folders`` the parent folder
    becomes the slide label.
    """

    extra_schema = pa.schema([])

    shard_index, shard_count = 0, 1

    def __init__(self, root: str | Path, options: SourceOptions = SourceOptions(), slides: bool = False,
                 slide_from: str = "auto", slide_prefix: str = ""):
        self.root = absolute(root)
        self.options = options
        self.slide_from = _check_slide_from(slide_from, FIELD_SLIDE_FROM, "fields and slides", options.slide_id)
        self.slide_prefix = slide_prefix or ""
        self.slides = slides
        self.suffixes = SLIDE_SUFFIXES if slides else IMAGE_SUFFIXES
        if not self.root.exists():
            raise InputError(f"{self.root}: no such file or folder")

    @property
    def n_images(self) -> int:
        """Fields or slides to read (the total shown by progress; lists the folder)."""
        return 1 if self.root.is_file() else len(image_files(self.root, self.suffixes))

    def shard(self, index: int, count: int) -> FieldFolderSource | None:
        """Fields index, index+count, ...; None for whole slides, whose tiles are shared out instead."""
        return None if self.slides or self.root.is_file() else shard_of(self, index, count)

    def __iter__(self) -> Iterator[SourceItem]:
        if self.root.is_dir() and self.shard_index == 0:
            yield from unreadable_entries(self.root, self.suffixes)
        files = [self.root] if self.root.is_file() else image_files(self.root, self.suffixes)
        seen: dict[str, Path] = {}  # every shard lists every file, so a repeated slide id is found once
        for k, path in enumerate(files):
            where = str(path)
            mine = k % self.shard_count == self.shard_index
            try:
                slide_id = safe_slide_id(self.slide_prefix + self._slide_of(path), where)
            except InputError as e:
                if mine:
                    yield SourceFailure(where, str(e))
                continue
            if slide_id in seen:
                if mine:
                    yield SourceFailure(where, f"slide id {slide_id!r} is also the slide id of {seen[slide_id]}; "
                                        "rename one of them or pass --slide-from path (a slide id must be unique)", slide_id=slide_id)
                continue
            seen[slide_id] = path
            if not mine:
                continue
            label = path.parent.name if self.options.labels_from_folders else None
            yield ImageTask(image=str(path), slide_id=slide_id, cells=None, slide_label=label, source_ref=where)

    def _slide_of(self, path: Path) -> str:
        if self.slide_from == "path" and path != self.root:
            return "~".join(path.relative_to(self.root).with_suffix("").parts)
        if self.slide_from == "auto" and self.options.slide_id:
            return self.options.slide_id
        return path.stem
