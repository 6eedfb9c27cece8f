"""Parquet in and out, local or ``gs://``, through Beam's FileSystems.

Reading is planned before the pipeline starts: every file's footer is opened once, so a file that is not
Parquet or lacks required columns stops the run with one clear line, and the work is split by row group so
that each record keeps its source (``file#row=N``) for dead letters and deterministic tie-breaking.
"""
from __future__ import annotations

import posixpath
from typing import Callable, Iterable, Iterator, Sequence

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from mmfuse.transforms.contract import ContractError

_GLOB = set("*?[")


def list_files(path: str) -> list[str]:
    """A file, a folder (its ``*.parquet`` files, recursively) or a glob; hidden and ``_`` paths skipped."""
    def match(pattern: str) -> list[str]:
        return sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)

    if _GLOB & set(path):
        files, base = match(path), ""
    else:
        base = path.rstrip("/") + "/"
        files = match(base + "**.parquet") or [f for f in match(path) if f.rstrip("/") == path.rstrip("/")]
        if not files:
            raise ContractError(f"{path}: no such file, or a folder without Parquet files")
        base = base if files != [path] else ""
    files = [f for f in files if not any(part.startswith((".", "_"))
                                         for part in (f[len(base):] if base else posixpath.basename(f)).split("/"))]
    if not files:
        raise ContractError(f"{path}: no Parquet files found")
    return files


def plan(path: str, check: Callable[[str, set[str]], None]) -> tuple[list[tuple[str, int, int]], set[str]]:
    """Row groups to read as ``(file, row_group, first_row)``, empty ones left out, after ``check(file,
    columns)`` on each file."""
    work, columns = [], set()
    for file in list_files(path):
        try:
            with FileSystems.open(file) as f:
                meta = pq.ParquetFile(f).metadata
                names = set(meta.schema.to_arrow_schema().names)
        except (pa.ArrowException, OSError) as e:
            raise ContractError(f"{file}: not a readable Parquet file ({e})") from None
        check(file, names)
        columns |= names
        first = 0
        for group in range(meta.num_row_groups):
            if meta.row_group(group).num_rows:
                work.append((file, group, first))
            first += meta.row_group(group).num_rows
    return work, columns


class ReadRows(beam.PTransform):
    """Rows of planned row groups as ``(source, row)``; only ``columns`` that a file has are read."""

    def __init__(self, work: list[tuple[str, int, int]], columns: Iterable[str]):
        super().__init__()
        self._work, self._columns = work, tuple(columns)

    def expand(self, pbegin: beam.pvalue.PBegin) -> beam.PCollection:
        columns = self._columns

        def read(task: tuple[str, int, int]) -> Iterator[tuple[str, dict]]:
            file, group, first = task
            with FileSystems.open(file) as f:
                pf = pq.ParquetFile(f)
                present = [c for c in columns if c in pf.schema_arrow.names]
                rows = pf.read_row_group(group, columns=present).to_pylist()
            for i, row in enumerate(rows):
                yield f"{file}#row={first + i}", row

        return (pbegin
                | "Plan" >> beam.Create(self._work)
                | "Spread" >> beam.Reshuffle()
                | "Read" >> beam.FlatMap(read))


class WriteDataset(beam.PTransform):
    """One output dataset as ``<prefix>-SSSSS-of-NNNNN.parquet`` from row dicts, or from Arrow tables where
    ``tables`` (for datasets with millions of rows, built column-wise where they are made); returns the
    written file names."""

    def __init__(self, prefix: str, schema: pa.Schema, tables: bool = False):
        super().__init__()
        self._prefix, self._schema, self._tables = prefix, schema, tables

    def expand(self, pcoll: beam.PCollection) -> beam.PCollection:
        write = beam.io.WriteToParquetBatched if self._tables else beam.io.WriteToParquet
        return pcoll | write(self._prefix, self._schema, file_name_suffix=".parquet",
                             shard_name_template="-SSSSS-of-NNNNN")


def read_dataset(run_dir: str, dataset: str, columns: Sequence[str] | None = None,
                 filters: list | None = None) -> pa.Table:
    """A dataset of a finished run as one Arrow table, or only its ``columns`` and the rows ``filters``
    (pyarrow's filter list) keep: for tests, evaluation and explanations."""
    files = sorted(m.path for m in FileSystems.match([posixpath.join(run_dir, dataset, "*.parquet")])[0]
                   .metadata_list)
    return read_files(files, columns, filters)


def read_files(files: Sequence[str], columns: Sequence[str] | None = None, filters: list | None = None) -> pa.Table:
    """Parquet ``files`` (any file system Beam knows) as one Arrow table; ``columns``, ``filters`` as above."""
    tables = []
    for file in files:
        with FileSystems.open(file) as f:
            tables.append(pq.read_table(f, columns=columns, filters=filters))
    return pa.concat_tables(tables) if tables else pa.table({})
