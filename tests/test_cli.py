"""The command line: stages run as `mmfuse <stage>` and `python -m mmfuse.pipelines.<stage>`; user errors are one
line."""
import re
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import DEMO_FLAGS, ROOT, metrics


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_not_parquet_stops_with_one_line(tmp_path):
    bad = tmp_path / "catalog.parquet"
    bad.write_text("item_id,title\na,b\n")
    proc = _run(sys.executable, "-m", "mmfuse.pipelines.nightly", f"--catalog={bad}", f"--interactions={bad}",
                f"--output={tmp_path / 'out'}")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"mmfuse nightly: error: {bad}: not a readable Parquet file "
        + proc.stderr.split("not a readable Parquet file ", 1)[1].strip()]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_catalog_without_required_columns_stops_with_one_line(tmp_path):
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"id": ["a"], "name": ["b"]}), path)
    proc = _run(str(ROOT / ".venv" / "bin" / "mmfuse"), "ingest", f"--catalog={path}", f"--output={tmp_path}")
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and f"{path}: catalog has no 'item_id' column" in proc.stderr


def test_usage_lists_stages_and_the_version_is_the_packages():
    proc = _run(str(ROOT / ".venv" / "bin" / "mmfuse"))
    assert proc.returncode == 2 and "nightly" in proc.stderr and "ingest" in proc.stderr
    from mmfuse import __version__
    proc = _run(str(ROOT / ".venv" / "bin" / "mmfuse"), "--version")
    assert proc.returncode == 0 and proc.stdout == f"mmfuse {__version__}\n"


@pytest.mark.slow
def test_ingest_stage_as_console_script(demo, tmp_path):
    proc = _run(str(ROOT / ".venv" / "bin" / "mmfuse"), "ingest", f"--catalog={demo['catalog']}",
                f"--interactions={demo['interactions']}", f"--output={tmp_path}", *DEMO_FLAGS)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run_dir = tmp_path / DEMO_FLAGS[1].split("=")[1]
    assert f"wrote {run_dir}" in proc.stdout and (run_dir / "_SUCCESS").exists()
    assert metrics(run_dir)["stages"]["catalog"] == {"in": 120, "out": 120, "dead": 0}


@pytest.mark.slow
def test_bad_text_template_stops_with_one_line(demo, tmp_path):
    proc = _run(sys.executable, "-m", "mmfuse.pipelines.encode", f"--catalog={demo['catalog']}", f"--output={tmp_path}",
                "--text_template={title} / {plot}")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "mmfuse encode: error: --text_template names ['plot'], which are not among the --text_columns "
        "['title', 'description', 'tags']"]


def test_misspelt_options_and_stages_are_refused_with_a_suggestion(tmp_path):
    """Beam alone ignores arguments it does not know: a typo would run the job with a default."""
    proc = _run(str(ROOT / ".venv" / "bin" / "mmfuse"), "nightly", f"--catalog={tmp_path}", f"--output={tmp_path}",
                "--top-k=10", "--modalites=text", "--runner=DirectRunner", "--direct_num_workers", "2")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "mmfuse nightly: error: unknown option --top-k (did you mean --top_k?); unknown option --modalites (did "
        "you mean --modalities?)"]
    proc = _run(str(ROOT / ".venv" / "bin" / "mmfuse"), "nightli")
    assert proc.returncode == 2 and proc.stderr.startswith("mmfuse: unknown stage 'nightli' (did you mean 'nightly'?)")


def test_every_stage_accepts_every_stages_options(demo, tmp_path):
    """A scheduler may hand one option set to each stage: ingest takes (and ignores) the alignment's."""
    from mmfuse.pipelines import ingest
    assert ingest.main([f"--catalog={demo['catalog']}", f"--output={tmp_path}", *DEMO_FLAGS, "--top_k=5",
                        "--runner=DirectRunner"]) == 0


@pytest.mark.slow
def test_catalog_without_rows_stops_with_one_line(tmp_path):
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"item_id": pa.array([], pa.string()), "title": pa.array([], pa.string())}), path)
    proc = _run(str(ROOT / ".venv" / "bin" / "mmfuse"), "nightly", f"--catalog={path}", f"--interactions={path}",
                f"--output={tmp_path / 'out'}")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"mmfuse nightly: error: {path}: the catalog has no rows"]
    assert not (tmp_path / "out").exists()


def test_options_page_is_current():
    """docs/options.md is every stage's --help: regenerate it with `make docs` when an option changes."""
    from mmfuse.pipelines import helpdoc
    assert (ROOT / "docs" / "options.md").read_text() == helpdoc.page(), "docs/options.md is stale: run `make docs`"


def test_help_docs_and_code_speak_of_the_product_only():
    """What users read names no folders they lack and no development history; nor does the code."""
    from mmfuse.pipelines import helpdoc
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    code = [p for folder in ("mmfuse", "models", "transforms", "pipelines", "runners", "examples", "bench", "tests")
            for p in sorted((ROOT / folder).rglob("*.py"))] + [ROOT / "setup.py", ROOT / "Makefile"]
    texts = {"--help": helpdoc.page(), **{str(p.relative_to(ROOT)): p.read_text() for p in docs + code}}
    history = re.compile(r"\.\./shared|shared/(docs|data)|\bsessions?\b(?! *[=()])|\bissues?\b|(?<![\w&])#\d+\b",
                         re.IGNORECASE)
    for name, text in texts.items():
        if name != "tests/test_cli.py":
            found = history.search(text.replace('scope="session"', "").replace("start_new_session", ""))
            assert not found, f"{name} mentions {found.group()!r}"


def test_evaluate_reads_only_a_complete_run(tmp_path, capsys):
    """A run still being written (or one that died) has no _SUCCESS: evaluate refuses it, as the nightly job does."""
    from mmfuse.pipelines import evaluate
    (tmp_path / "run" / "embeddings").mkdir(parents=True)
    assert evaluate.main([f"--catalog={tmp_path}/c.parquet", f"--interactions={tmp_path}/i.parquet",
                          f"--embeddings={tmp_path / 'run'}", f"--output={tmp_path / 'out'}"]) == 2
    assert "is not a complete run (no _SUCCESS)" in capsys.readouterr().err


def test_readme_is_short_and_links_every_doc():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    assert [p.name for p in sorted((ROOT / "docs").glob("*.md")) if f"(docs/{p.name})" not in readme] == []
