"""Manifest tables read in record batches, never whole: CSV/TSV through pyarrow's
streaming reader, Parquet through ``ParquetFile.iter_batches``.

pyarrow is used rather than polars because its CSV reader gives the column types
the earlier whole-file ``read_csv`` gave (so ids and uids of stores written
before are unchanged) and its batches are Arrow, which the sources slice into
fixed row chunks for sharding.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

import pyarrow as pa

from cytostore import limits
from cytostore.errors import InputError

CHUNK_ROWS = 1024  # rows per chunk: the unit a sharded manifest hands to one worker
CSV_BLOCK_BYTES = 1 << 20  # bytes per CSV block read (pyarrow's default)
_CONVERSION = re.compile(r"In CSV column #(\d+): CSV conversion error to [^:]+: invalid value '(.*)'", re.S)
_NOT_UTF8 = re.compile(r"In CSV column #(\d+): CSV conversion error to (?:string|utf8): invalid UTF8")


def read_table(path: Path) -> pa.Table:
    """Reads a whole CSV, TSV or Parquet file into Arrow (small tables only, e.g. label lists)."""
    stream = TableStream(path)
    return pa.Table.from_batches(list(stream.batches()), schema=stream.settle())


class TableStream:
    """A CSV, TSV or Parquet table read batch by batch.

    Only the schema is read when it is made. CSV column types are guessed from
    the first block; ``settle`` streams the file once and widens a column
    (integer -> float -> text -> binary, the last for bytes that are not UTF-8
    text) where a later block does not fit, as a whole-file read would have typed
    it, so the same cell reads the same in every pass.
    """

    def __init__(self, path: str | Path, block_bytes: int = CSV_BLOCK_BYTES, encoding: str = "utf8",
                 text_columns: tuple[str, ...] = ()):
        self.path = Path(path)
        self.text_columns = text_columns  # CSV columns always read as text, never typed as numbers
        self.block_bytes = block_bytes
        self.encoding = encoding  # CSV text encoding; bytes that are not UTF-8 make a column binary
        suffix = self.path.suffix.lower()
        if suffix not in {".parquet", ".csv", ".tsv", ".txt"}:
            raise InputError(f"{self.path}: unknown table format {suffix!r}; use .csv, .tsv or .parquet")
        self.parquet = suffix == ".parquet"
        self.delimiter = "\t" if suffix == ".tsv" else ","
        self.settled = self.parquet
        self.header_only = False  # a CSV of one header line without a newline: no rows
        limits.regular_file(self.path, "table")
        try:
            if self.parquet:
                import pyarrow.parquet as pq

                meta = pq.ParquetFile(self.path)
                self.schema = meta.schema_arrow
                self.num_rows: int | None = meta.metadata.num_rows
            else:
                try:
                    reader = self._csv(None)
                except pa.ArrowInvalid as e:
                    if "Empty CSV file" not in str(e):
                        raise
                    reader = self._header_only()
                self.schema = reader.schema
                reader.close()
                for i, f in enumerate(self.schema):  # the later passes read them with these types
                    if f.name in text_columns and not pa.types.is_binary(f.type):
                        self.schema = self.schema.set(i, pa.field(f.name, pa.string()))
                self.num_rows = 0 if self.header_only else None
        except (pa.ArrowException, OSError, LookupError) as e:
            raise InputError(f"{self.path}: cannot be read as a table ({e})") from e
        if len(self.schema) > limits.MAX_MANIFEST_COLUMNS:
            raise InputError(f"{self.path}: has {len(self.schema):,} columns; at most {limits.MAX_MANIFEST_COLUMNS:,} "
                             "are read (cytostore.limits.MAX_MANIFEST_COLUMNS): drop the columns you do not need")

    def _header_only(self) -> pa.RecordBatchReader:
        """An empty reader for a CSV that is one header line with no newline after it (Arrow
        cannot read one); InputError for a file with no header at all."""
        import csv as pycsv

        text = self.path.read_bytes()[: self.block_bytes].decode(self.encoding, "replace")
        names = next(pycsv.reader([text], delimiter=self.delimiter), []) if text.strip() else []
        if not names or "\n" in text:
            raise InputError(f"{self.path}: is empty (no header line); write the column names on its first line")
        self.header_only, self.settled, self.num_rows = True, True, 0
        schema = pa.schema([(n, pa.null()) for n in names])
        return pa.RecordBatchReader.from_batches(schema, [])

    def settle(self) -> pa.Schema:
        """Streams a CSV once to fix its column types (and count its rows); returns the schema."""
        for _ in range(4 * len(self.schema) + 1):
            if self.settled:
                return self.schema
            rows = 0
            try:
                for batch in self._csv_batches(None):
                    rows += batch.num_rows
            except pa.ArrowInvalid as e:
                self.schema = self._widen(e)
                continue
            except pa.ArrowException as e:
                raise InputError(f"{self.path}: cannot be read as a table ({e})") from e
            self.settled, self.num_rows = True, rows
        raise InputError(f"{self.path}: column types do not settle; check the file's quoting")  # pragma: no cover

    def batches(self, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
        """Record batches of the whole table (only ``columns`` when given), settled types."""
        self.settle()
        if self.parquet:
            import pyarrow.parquet as pq

            with pq.ParquetFile(self.path) as pf:
                yield from pf.iter_batches(batch_size=CHUNK_ROWS, columns=columns)
            return
        try:
            yield from self._csv_batches(columns)
        except pa.ArrowInvalid as e:  # the file changed since it was settled
            raise InputError(f"{self.path}: cannot be read as a table ({e}); was it changed during the run?") from e

    def chunks(self, chunk_rows: int = CHUNK_ROWS,
               columns: list[str] | None = None) -> Iterator[tuple[int, int, pa.RecordBatch]]:
        """``(chunk index, first row, rows)`` for consecutive chunks of ``chunk_rows`` rows.

        Chunks are cut by row position, not by how the reader happened to batch
        the file, so every process numbers them the same.
        """
        pending: list[pa.RecordBatch] = []
        have = row = k = 0
        for batch in self.batches(columns):
            pending.append(batch)
            have += batch.num_rows
            while have >= chunk_rows:
                chunk, pending = _take(pending, chunk_rows)
                yield k, row, chunk
                k, row, have = k + 1, row + chunk_rows, have - chunk_rows
        if have:
            chunk, _ = _take(pending, have)
            yield k, row, chunk

    def _csv(self, column_types: pa.Schema | None, columns: list[str] | None = None):
        from pyarrow import csv

        convert = csv.ConvertOptions(column_types=column_types, include_columns=columns,
                                     strings_can_be_null=False)
        read = csv.ReadOptions(block_size=self.block_bytes, encoding=self.encoding)
        return csv.open_csv(self.path, read_options=read,
                            parse_options=csv.ParseOptions(delimiter=self.delimiter), convert_options=convert)

    def _csv_batches(self, columns: list[str] | None) -> Iterator[pa.RecordBatch]:
        if self.header_only:
            return
        try:
            reader = self._csv(self.schema, columns)
        except OSError as e:
            raise InputError(f"{self.path}: cannot be read as a table ({e})") from e
        with reader:
            yield from reader

    def _widen(self, err: pa.ArrowInvalid) -> pa.Schema:
        bad = _NOT_UTF8.search(str(err))
        if bad:  # bytes that are not UTF-8 in a later block: binary, as a whole-file read types it
            i = int(bad.group(1))
            if self.schema.field(i).type == pa.binary():
                raise InputError(f"{self.path}: cannot be read as a table ({err})") from err
            return self.schema.set(i, pa.field(self.schema.field(i).name, pa.binary()))
        m = _CONVERSION.search(str(err))
        if not m:
            raise InputError(f"{self.path}: cannot be read as a table ({err})") from err
        i, value = int(m.group(1)), m.group(2)
        field = self.schema.field(i)
        if pa.types.is_null(field.type) and _parses(value, int):
            wider = pa.int64()
        elif (pa.types.is_null(field.type) or pa.types.is_integer(field.type)) and _parses(value, float):
            wider = pa.float64()
        else:
            wider = pa.string()
        if wider == field.type:
            raise InputError(f"{self.path}: cannot be read as a table ({err})") from err
        return self.schema.set(i, pa.field(field.name, wider))


def _parses(value: str, kind) -> bool:
    try:
        kind(value.replace("_", "!"))  # Python accepts 1_000; Arrow does not
    except ValueError:
        return False
    return True


def _take(pending: list[pa.RecordBatch], n: int) -> tuple[pa.RecordBatch, list[pa.RecordBatch]]:
    """The first ``n`` rows of ``pending`` as one batch, and what is left."""
    parts, rest, need = [], [], n
    for b in pending:
        if need == 0:
            rest.append(b)
        elif b.num_rows <= need:
            parts.append(b)
            need -= b.num_rows
        else:
            parts.append(b.slice(0, need))
            rest.append(b.slice(need))
            need = 0
    chunk = parts[0] if len(parts) == 1 else pa.Table.from_batches(parts).combine_chunks().to_batches()[0]
    return chunk, rest
