"""Dated run folders: complete only with _SUCCESS, replaced whole on rerun, found by date."""
from pathlib import Path

from transforms.runs import RunFolder, is_complete, latest_complete


def _stage(run: RunFolder, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = Path(run.staging) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_commit_replaces_partial_folder_and_marks_last(tmp_path):
    partial = tmp_path / "2026-11-02"
    (partial / "items").mkdir(parents=True)
    (partial / "items" / "stale.parquet").write_text("left by a killed run")
    run = RunFolder(str(tmp_path), "2026-11-02")
    _stage(run, {"items/part-00000-of-00001.parquet": "new"})
    assert not is_complete(str(partial))
    run.commit({"stages": {}})
    assert sorted(p.relative_to(partial).as_posix() for p in partial.rglob("*") if p.is_file()) == [
        "_SUCCESS", "items/part-00000-of-00001.parquet", "metrics.json"]
    assert is_complete(str(partial)) and list((tmp_path / "_staging").iterdir()) == []


def test_latest_complete_skips_incomplete_and_later_runs(tmp_path):
    for date, done in [("2026-11-01", True), ("2026-11-02", False), ("2026-11-03", True), ("2026-11-05", True)]:
        (tmp_path / date).mkdir()
        if done:
            (tmp_path / date / "_SUCCESS").write_text("")
    (tmp_path / "_staging").mkdir()
    assert latest_complete(str(tmp_path), "2026-11-03") == str(tmp_path / "2026-11-01")
    assert latest_complete(str(tmp_path), "2026-11-04") == str(tmp_path / "2026-11-03")
    assert latest_complete(str(tmp_path), "2026-11-01") is None
    assert latest_complete(str(tmp_path / "nothing"), "2026-11-01") is None


def test_stale_staging_of_the_same_date_is_cleared(tmp_path):
    old, other_date = RunFolder(str(tmp_path), "2026-11-02"), RunFolder(str(tmp_path), "2026-11-03")
    _stage(old, {"a.parquet": "x"})
    _stage(other_date, {"a.parquet": "x"})
    new = RunFolder(str(tmp_path), "2026-11-02")
    new.clear_stale_staging()
    assert not Path(old.staging).exists() and Path(other_date.staging).exists()
