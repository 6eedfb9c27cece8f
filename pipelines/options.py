"""Command-line options of mmfuse jobs, as Beam ``PipelineOptions`` so any Beam option may be mixed in."""
from __future__ import annotations

import datetime as dt

from apache_beam.options.pipeline_options import PipelineOptions

from transforms.contract import CatalogColumns, ContractError, InteractionColumns


def _names(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def _pairs(value: str, option: str) -> dict[str, int]:
    out = {}
    for part in _names(value):
        name, _, number = part.partition(":")
        if not number.isdigit() or int(number) < 1:
            raise ContractError(f"{option}: expected NAME:POSITIVE_INTEGER items, got {part!r}")
        out[name] = int(number)
    return out


def _vectors(value: str) -> tuple[tuple[str, int], ...]:
    return tuple(_pairs(value, "--vector_columns (declare each column as NAME:DIM)").items())


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
                            help="Media files or inline bytes larger than this are dead-lettered instead of read")
        parser.add_argument("--max_dead_fraction", type=float, default=0.5,
                            help="A stage that dead-letters more than this share of its records fails the run "
                                 "(exit 3, nothing published; its dead letters stay in staging); 1: never")
        parser.add_argument("--media_roots", default="",
                            help="Comma-separated folders or prefixes (local or gs://) that image_uri and "
                                 "audio_uri may point into; anything else is refused (default: the catalog's "
                                 "own folder)")


class PrivacyOptions(PipelineOptions):
    """Pseudonymous user ids in every output."""

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument("--pseudonymize_user_ids", action="store_true",
                            help="Replace each user_id by its keyed HMAC-SHA256 as interactions are read, so no "
                                 "output holds a raw user id; the key comes from $MMFUSE_PSEUDONYM_KEY or "
                                 "--pseudonym_key_file, never from the command line")
        parser.add_argument("--pseudonym_key_file", default="",
                            help="A file (local or gs://) holding the pseudonym key (at least 16 bytes)")


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


class EncodeOptions(PipelineOptions):
    """Which modalities to encode, how, and what to reuse from the last run."""

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument("--modalities", default="",
                            help="Comma-separated modalities to encode among text, image, audio_mfcc, audio_musicnn "
                                 "and the declared vector columns (default: every one the catalog has columns for)")
        parser.add_argument("--previous", default="auto",
                            help="Run folder whose embeddings are reused where an item's content hash is unchanged: "
                                 "a path, 'auto' (the newest complete run under --output before --run_date) or 'none'")
        parser.add_argument("--batch_sizes", default="",
                            help="Inference batch sizes per modality, e.g. text:64,image:32 (defaults per model)")
        parser.add_argument("--text_template", default="",
                            help="Python format string over the text columns, e.g. '{title}. {description}'; "
                                 "default: the non-empty text columns joined with ' | ' (lists joined with ', ')")
        parser.add_argument("--text_max_tokens", type=int, default=256,
                            help="Texts are truncated to this many tokens (MiniLM was trained with 256); each "
                                 "text column is cut at 128 characters per token before tokenising")
        parser.add_argument("--audio_max_windows", type=int, default=10,
                            help="Longer audio is cut to this many evenly spaced 3 s windows")
        parser.add_argument("--custom_encoders", default="",
                            help="Your own models instead of the defaults, as MODALITY=PATH[@sha256:DIGEST],...: a "
                                 ".keras file or a TF SavedModel folder, local or gs:// (input contract: "
                                 "models/custom.py); with a digest, a model whose files differ is refused")
        parser.add_argument("--trust_custom_models", action="store_true",
                            help="Run custom SavedModels: a TensorFlow graph can read and write files on the "
                                 "workers (.keras files load in Keras's safe mode and need no trust)")
        parser.add_argument("--custom_image_size", type=int, default=224,
                            help="Side of the square image a custom image model receives")
        parser.add_argument("--encode_accelerator", default="",
                            help="Beam resource hint for the model steps only, e.g. "
                                 "'type:nvidia-l4;count:1;install-nvidia-driver'")


def help_text(prog: str) -> str:
    """``--help`` for a job: the option groups defined in ``pipelines`` modules imported so far (each job
    module defines its own group, so a job shows the options of the stages it runs); any Beam option may be
    added."""
    import argparse
    parser = argparse.ArgumentParser(prog=prog, epilog="Any Apache Beam pipeline option may be added, "
                                     "e.g. --runner, --direct_running_mode, --direct_num_workers.")
    for group in PipelineOptions.__subclasses__():
        if not group.__module__.startswith("pipelines."):
            continue
        group._add_argparse_args(parser.add_argument_group(group.__name__, group.__doc__.split("\n")[0]))
    return parser.format_help()


def check_known(argv: list[str]) -> None:
    """Refuse arguments that neither mmfuse nor Beam defines: Beam alone ignores them, so a misspelt option
    would run with its default. Any stage's options are accepted by every stage (a scheduler may pass one
    set to each)."""
    import difflib

    from apache_beam.options.pipeline_options import _BeamArgumentParser

    if "NightlyOptions" not in {g.__name__ for g in PipelineOptions.__subclasses__()}:
        import pipelines.nightly  # noqa: F401 - defines every stage's options (unless it runs as __main__)
    parser = _BeamArgumentParser(allow_abbrev=False)
    for group in {str(g): g for g in PipelineOptions.__subclasses__()}.values():  # Beam's own rule for repeats
        group._add_argparse_args(parser)
    _, unknown = parser.parse_known_args(argv)
    known = [name for action in parser._actions for name in action.option_strings]
    problems = []
    for arg in unknown:
        if not arg.startswith("-"):
            problems.append(f"unexpected argument {arg!r}")
            continue
        name = arg.split("=", 1)[0]
        close = difflib.get_close_matches(name.replace("-", "_").lstrip("_"), [k.lstrip("-") for k in known], 1)
        problems.append(f"unknown option {name}" + (f" (did you mean --{close[0]}?)" if close else ""))
    if problems:
        raise ContractError("; ".join(problems))


def require(options: PipelineOptions, *names: str) -> None:
    run = options.view_as(RunOptions)
    missing = [f"--{n}" for n in names if not getattr(run, n)]
    if missing:
        raise ContractError(f"missing required option(s): {' '.join(missing)}")


def batch_sizes(options: PipelineOptions) -> dict[str, int]:
    return _pairs(options.view_as(EncodeOptions).batch_sizes, "--batch_sizes")


def media_roots(options: PipelineOptions) -> tuple[str, ...]:
    from transforms.media import default_root
    run = options.view_as(RunOptions)
    return _names(run.media_roots) or (default_root(run.catalog),)


def modalities(options: PipelineOptions) -> tuple[str, ...]:
    return _names(options.view_as(EncodeOptions).modalities)


def custom_encoders(options: PipelineOptions) -> dict[str, tuple[str, str | None]]:
    """``{modality: (path, pinned digest or None)}`` from ``MODALITY=PATH[@sha256:HEX],...``."""
    out = {}
    for part in _names(options.view_as(EncodeOptions).custom_encoders):
        modality, sep, path = part.partition("=")
        path, pin, hexdigest = path.rpartition("@sha256:") if "@sha256:" in path else (path, "", "")
        if not sep or not path or (pin and len(hexdigest) != 64):
            raise ContractError(f"--custom_encoders: expected MODALITY=PATH[@sha256:64 HEX DIGITS] items, "
                                f"got {part!r}")
        out[modality] = (path, f"sha256:{hexdigest.lower()}" if pin else None)
    return out
