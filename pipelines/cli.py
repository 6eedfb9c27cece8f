"""``mmfuse <stage> [options]``: the console script; each stage is also ``python -m mmfuse.pipelines.<stage>``."""
from __future__ import annotations

import difflib
import importlib
import sys

STAGES = {
    "ingest": "check the catalog and interactions against the data contract",
    "encode": "ingest the catalog and write per-modality embeddings",
    "nightly": "the whole job: ingest, encode, align, fuse, recommend",
    "evaluate": "score a night's recommendations against held-out interactions (--run), or compare every "
                "method on a temporal and a cold-item split (docs/evaluation.md)",
    "explain": "one user's recommendations from a night, with modality shares and the history items behind them",
    "export": "a complete night as a TensorFlow SavedModel that answers recommend and similar",
    "serve": "the TF Serving REST API over an exported night",
}


def incomplete(stage: str, run: str) -> bool:
    """True, after the CLI's one error line, when ``run`` is not a complete run: a run still being written,
    or one that died, is never read."""
    from mmfuse.transforms.runs import is_complete
    if is_complete(run):
        return False
    print(f"mmfuse {stage}: error: {run} is not a complete run (no _SUCCESS)", file=sys.stderr)
    return True


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--version"]:
        from mmfuse import __version__
        print(f"mmfuse {__version__}")
        return 0
    if not argv or argv[0] not in STAGES:
        if argv and argv[0] not in ("-h", "--help"):
            close = difflib.get_close_matches(argv[0], STAGES, 1)
            print(f"mmfuse: unknown stage {argv[0]!r}" + (f" (did you mean {close[0]!r}?)" if close else ""),
                  file=sys.stderr)
        lines = "\n".join(f"  {name:10s} {what}" for name, what in STAGES.items())
        print(f"usage: mmfuse <stage> [options]   (mmfuse <stage> --help for a stage's options; mmfuse --version)"
              f"\n{lines}",
              file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    from mmfuse.runners import process  # Beam: loaded once a stage is named
    process.quiet_console(verbose="--verbose" in argv)
    return importlib.import_module(f"mmfuse.pipelines.{argv[0]}").main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
