"""Command-line options of mmfuse jobs, as Beam ``PipelineOptions`` so any Beam option may be mixed in."""
from __future__ import annotations

import datetime as dt

from apache_beam.options.pipeline_options import PipelineOptions

from transforms.contract import CatalogColumns, ContractError, InteractionColumns


def _names(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def _vectors(value: str) -> tuple[tuple[str, int], ...]:
    out = []
    for part in _names(value):
        name, _, dim = part.partition(":")
        if not dim.isdigit() or int(dim) < 1:
            raise ContractError(f"--vector_columns: declare each column as NAME:DIM, got {part!r}")
        out.append((name, int(dim)))
    return tuple(out)


class RunOptions(PipelineOptions):
    """Where the inputs are and where, for which date, the outputs go.

    Nothing here is ``required=True``: Beam parses every options class whenever any options object is
    made (workers included), so ``--catalog`` and ``--output`` are checked by the job instead.
    """

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument("--catalog", default=None,
                            help="Catalog Parquet: a file, a folder (its *.parquet files) or a glob; local or gs://")
        parser.add_argument("--interactions", default=None,
                            help="Interactions Parquet: a file, a folder or a glob; local or gs://")
        parser.add_argument("--output", default=None,
                            help="Output root; the run writes ROOT/<run_date>/ and marks it with _SUCCESS last")
        parser.add_argument("--run_date", default=dt.datetime.now(dt.timezone.utc).date().isoformat(),
                            help="Date of the run, YYYY-MM-DD (default: today, UTC); interactions after it "
                                 "are refused as bad timestamps")
        parser.add_argument("--max_media_bytes", type=int, default=256 << 20,
                            help="Media files larger than this are dead-lettered instead of read")


class CatalogOptions(PipelineOptions):
    """Catalog column names, so users need not rename their columns."""

    @classmethod
    def _add_argparse_args(cls, parser):
        d = CatalogColumns()
        parser.add_argument("--item_id_column", default=d.item_id, help="Unique item id (string)")
        parser.add_argument("--text_columns", default=",".join(d.text),
                            help="Comma-separated text columns (string or list<string>)")
        parser.add_argument("--image_bytes_column", default=d.image_bytes, help="Inline image bytes (binary)")
        parser.add_argument("--image_uri_column", default=d.image_uri,
                            help="Image path: absolute, gs://, or relative to the catalog file's folder")
        parser.add_argument("--audio_bytes_column", default=d.audio_bytes, help="Inline audio bytes (binary)")
        parser.add_argument("--audio_uri_column", default=d.audio_uri,
                            help="Audio path: absolute, gs://, or relative to the catalog file's folder")
        parser.add_argument("--vector_columns", default="",
                            help="Precomputed vector columns (list<float>) used as extra modalities, as NAME:DIM,...")
        parser.add_argument("--updated_at_column", default=d.updated_at,
                            help="Optional last-change timestamp; the newest copy of a duplicated item_id wins")


class InteractionOptions(PipelineOptions):
    """Interaction column names."""

    @classmethod
    def _add_argparse_args(cls, parser):
        d = InteractionColumns()
        parser.add_argument("--user_id_column", default=d.user_id, help="User id (string)")
        parser.add_argument("--interaction_item_id_column", default=d.item_id, help="Item id (string)")
        parser.add_argument("--timestamp_column", default=d.timestamp,
                            help="Timestamp, or integer seconds since the epoch")
        parser.add_argument("--event_column", default=d.event, help="Optional event type, e.g. view/click/purchase")
        parser.add_argument("--weight_column", default=d.weight, help="Optional weight, e.g. a rating")


def catalog_columns(options: PipelineOptions) -> CatalogColumns:
    o = options.view_as(CatalogOptions)
    return CatalogColumns(item_id=o.item_id_column, text=_names(o.text_columns),
                          image_bytes=o.image_bytes_column, image_uri=o.image_uri_column,
                          audio_bytes=o.audio_bytes_column, audio_uri=o.audio_uri_column,
                          vectors=_vectors(o.vector_columns), updated_at=o.updated_at_column)


def interaction_columns(options: PipelineOptions) -> InteractionColumns:
    o = options.view_as(InteractionOptions)
    return InteractionColumns(user_id=o.user_id_column, item_id=o.interaction_item_id_column,
                              timestamp=o.timestamp_column, event=o.event_column, weight=o.weight_column)


OPTION_GROUPS = (RunOptions, CatalogOptions, InteractionOptions)


def help_text(prog: str) -> str:
    """``--help`` for a job: mmfuse's own options; any Beam option may be added."""
    import argparse
    parser = argparse.ArgumentParser(prog=prog, epilog="Any Apache Beam pipeline option may be added, "
                                     "e.g. --runner, --direct_running_mode, --direct_num_workers.")
    for group in OPTION_GROUPS:
        group._add_argparse_args(parser.add_argument_group(group.__name__, group.__doc__.split("\n")[0]))
    return parser.format_help()


def require(options: PipelineOptions, *names: str) -> None:
    run = options.view_as(RunOptions)
    missing = [f"--{n}" for n in names if not getattr(run, n)]
    if missing:
        raise ContractError(f"missing required option(s): {' '.join(missing)}")
