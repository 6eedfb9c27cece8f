"""Command-line options of mmfuse jobs, as Beam ``PipelineOptions`` so any Beam option may be mixed in; read
once, by ``pipelines.config``."""
from __future__ import annotations

import argparse
import datetime as dt

from apache_beam.options.pipeline_options import PipelineOptions

from mmfuse.models.collaborative import ANCHORS
from mmfuse.transforms import topk
from mmfuse.transforms.contract import CatalogColumns, ContractError, InteractionColumns

REFIT_DAYS = {"always": 0, "weekly": 7, "never": None}
FUSIONS = ("mean", "weighted", "attention")


class RunOptions(PipelineOptions):
    """Where the inputs are and where, for which date, the outputs go.

    Nothing here is ``required=True``: Beam parses every options class whenever any options object is
    made (workers included), so ``--catalog`` and ``--output`` are checked by the job instead.
    """

    @classmethod
    def _add_argparse_args(cls, parser: argparse.ArgumentParser) -> None:
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
                            help="Image files and inline media bytes larger than this are dead-lettered instead of "
                                 "read (audio files are read in parts, only the windows decoded)")
        parser.add_argument("--max_dead_fraction", type=float, default=0.5,
                            help="A stage that dead-letters more than this share of its records fails the run "
                                 "(exit 3, nothing published; its dead letters stay in staging); 1: never")
        parser.add_argument("--verbose", action="store_true",
                            help="Show the libraries' own log lines (TensorFlow, absl, Beam); by default the "
                                 "console holds mmfuse's lines only")
        parser.add_argument("--media_roots", default="",
                            help="Comma-separated folders or prefixes (local or gs://) that image_uri and "
                                 "audio_uri may point into; anything else is refused (default: the catalog's "
                                 "own folder)")


class PrivacyOptions(PipelineOptions):
    """Pseudonymous user ids in every output."""

    @classmethod
    def _add_argparse_args(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--pseudonymize_user_ids", action="store_true",
                            help="Replace each user_id by its keyed HMAC-SHA256 as interactions are read, so no "
                                 "output holds a raw user id; the key comes from $MMFUSE_PSEUDONYM_KEY or "
                                 "--pseudonym_key_file, never from the command line")
        parser.add_argument("--pseudonym_key_file", default="",
                            help="A file (local or gs://) holding the pseudonym key (at least 16 bytes)")


class CatalogOptions(PipelineOptions):
    """Catalog column names, so users need not rename their columns."""

    @classmethod
    def _add_argparse_args(cls, parser: argparse.ArgumentParser) -> None:
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
    def _add_argparse_args(cls, parser: argparse.ArgumentParser) -> None:
        d = InteractionColumns()
        parser.add_argument("--user_id_column", default=d.user_id, help="User id (string)")
        parser.add_argument("--interaction_item_id_column", default=d.item_id, help="Item id (string)")
        parser.add_argument("--timestamp_column", default=d.timestamp,
                            help="Timestamp, or integer seconds since the epoch")
        parser.add_argument("--event_column", default=d.event, help="Optional event type, e.g. view/click/purchase")
        parser.add_argument("--weight_column", default=d.weight, help="Optional weight, e.g. a rating")


class EncodeOptions(PipelineOptions):
    """Which modalities to encode, how, and what to reuse from the last run."""

    @classmethod
    def _add_argparse_args(cls, parser: argparse.ArgumentParser) -> None:
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
        parser.add_argument("--precision", default="auto", choices=("auto", "float32", "bfloat16"),
                            help="The text and image encoders' arithmetic. auto: bfloat16 for text where the "
                                 "hardware runs it natively (an --encode_accelerator, or a CPU with AMX or "
                                 "AVX512-BF16 where the job is launched), float32 elsewhere and for images, whose "
                                 "vectors bfloat16 moves further (docs/encoders.md)")


class AlignOptions(PipelineOptions):
    """How modalities are put in one space and fused."""

    @classmethod
    def _add_argparse_args(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--align", default="contrastive", choices=("contrastive", "pca"),
                            help="contrastive: projection heads trained on the catalog and interactions; "
                                 "pca: tf.Transform z-score and PCA per modality")
        parser.add_argument("--dim", type=int, default=None,
                            help="Dimension of the shared space (default: chosen on the fit's validation split "
                                 "among 64, 128 and 256 with the cf modality, by cf's own figures, within "
                                 "--dim_budget_tflop; 64 without cf)")
        parser.add_argument("--dim_budget_tflop", type=float, default=100.0,
                            help="A dim above 64 is a candidate only while the exact top-k at that dim, "
                                 "2 x dim x (users x items + items x items) FLOP, stays within this many TFLOP: "
                                 "the search's cost grows with the dim")
        parser.add_argument("--fusion", default="", choices=("", "auto", *FUSIONS),
                            help="How present modalities are weighted (default: auto for contrastive, chosen on "
                                 "the fit's validation split among attention and cf-weighted; mean for pca); "
                                 "attention is learned and needs --align=contrastive")
        parser.add_argument("--fusion_weights", default="",
                            help="For --fusion=weighted: MODALITY:WEIGHT,... (renormalised over present ones)")
        parser.add_argument("--collaborative", default="true", choices=("true", "false"),
                            help="Add the collaborative modality 'cf', in closed form from the interactions "
                                 "(contrastive only)")
        parser.add_argument("--cf_beta", type=float, default=None,
                            help="How far an item's popularity tilts its cf vector, in [0, 1) (default: chosen on "
                                 "the fit's validation split among 0.25, 0.5, 0.75)")
        parser.add_argument("--cf_anchors", type=int, default=ANCHORS,
                            help="Most interacted items whose cf vectors come from EASE directly (dense: about "
                                 "12 x N^2 bytes); other items with interactions are folded in")
        parser.add_argument("--fit_events", type=int, default=1_000_000,
                            help="The fit trains on the newest this many interactions")
        parser.add_argument("--fit_items", type=int, default=100_000,
                            help="Most items the fit holds: those its interactions touch most, then a seeded "
                                 "sample of the others; every item still gets a vector")
        parser.add_argument("--fit_minutes", type=float, default=10.0,
                            help="Training time of the fit (the validation fit and the refit together); epochs stop "
                                 "early past it")
        parser.add_argument("--align_epochs", type=int, default=40, help="Most training epochs (early stopping)")
        parser.add_argument("--seed", type=int, default=0, help="Seed of every random choice in fitting")
        parser.add_argument("--refit", default="always", choices=tuple(REFIT_DAYS),
                            help="Fit the alignment every night, when the last fit is a week old, or only when "
                                 "there is none to reuse (the previous run's, copied into this run)")


class RecommendOptions(PipelineOptions):
    """How user vectors are built and how many recommendations and similar items are written."""

    @classmethod
    def _add_argparse_args(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--top_k", type=int, default=20, help="Recommendations per user")
        parser.add_argument("--similar_k", type=int, default=20, help="Similar items per item")
        parser.add_argument("--event_weights", default="",
                            help="Weight of each event type in a user vector, e.g. view:1,click:2,purchase:5; "
                                 "other events (and a missing event) weigh --default_event_weight")
        parser.add_argument("--default_event_weight", type=float, default=1.0,
                            help="Weight of events not named in --event_weights")
        parser.add_argument("--use_rating", default="true", choices=["true", "false"],
                            help="Multiply each interaction by its weight column (e.g. the rating) when present")
        parser.add_argument("--recency_half_life_days", type=float, default=0.0,
                            help="An interaction this many days older than the user's newest counts half; "
                                 "0: no decay")
        parser.add_argument("--last_n_interactions", type=int, default=0,
                            help="Build a user's vector from their newest N interactions only; 0: all")
        parser.add_argument("--popular_days", type=float, default=30.0,
                            help="Fallback for users without usable history: the items with the most "
                                 "interactions in this many days before the newest interaction")
        parser.add_argument("--user_batch_size", type=int, default=topk.USER_BATCH,
                            help="Queries (users, or items for similar items) ranked together, where they are made")
        parser.add_argument("--item_shard_size", type=int, default=topk.ITEM_SHARD,
                            help="Items per shard: no worker holds more than one shard and one query batch")


class NightlyOptions(PipelineOptions):
    """How long dated runs are kept."""

    @classmethod
    def _add_argparse_args(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--keep_days", type=int, default=None,
                            help="Once a run is complete, remove runs and staging dated more than this many days "
                                 "before --run_date; the newest complete run always stays (default: keep all)")


INPUT_GROUPS = (RunOptions, PrivacyOptions, CatalogOptions, InteractionOptions, EncodeOptions)
class AlertOptions(PipelineOptions):
    """Alert thresholds: a breach is written to metrics.json ("alerts"), printed, and exits 4; the night is complete."""

    @classmethod
    def _add_argparse_args(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--alert_churn_above", type=float, default=None,
                            help="Alert when the mean share of a user's recommendations that are new since the "
                                 "previous night is above this (0-1)")
        parser.add_argument("--alert_coverage_below", type=float, default=None,
                            help="Alert when the share of the catalogue recommended at least once is below this")
        parser.add_argument("--alert_dead_fraction_above", type=float, default=None,
                            help="Alert when any stage dead-letters more than this share of its records (below "
                                 "--max_dead_fraction, which fails the run instead)")


STAGE_GROUPS = {"ingest": (*INPUT_GROUPS, AlertOptions), "encode": (*INPUT_GROUPS, AlertOptions),
                "nightly": (*INPUT_GROUPS, AlignOptions, RecommendOptions, NightlyOptions, AlertOptions)}


def help_text(stage: str) -> str:
    """``--help`` for a stage: the option groups of what it runs; any Beam option may be added."""
    import argparse
    parser = argparse.ArgumentParser(prog=f"mmfuse {stage}", epilog="Any Apache Beam pipeline option may be "
                                     "added, e.g. --runner, --direct_running_mode, --direct_num_workers.")
    for group in STAGE_GROUPS[stage]:
        group._add_argparse_args(parser.add_argument_group(group.__name__, group.__doc__.split("\n")[0]))
    return parser.format_help()


def check_known(argv: list[str]) -> None:
    """Refuse arguments that neither mmfuse nor Beam defines: Beam alone ignores them, so a misspelt option
    would run with its default. Any stage's options are accepted by every stage (a scheduler may pass one
    set to each)."""
    import difflib

    from apache_beam.options.pipeline_options import _BeamArgumentParser

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
