"""The data contract's record rules and file checks, without Beam."""
import datetime as dt

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmfuse.transforms import contract
from mmfuse.transforms.contract import CatalogColumns, ContractError, InteractionColumns, Invalid
from mmfuse.transforms.parquet import list_files, plan

SPEC = CatalogColumns(vectors=(("features", 4),))
END = dt.datetime(2026, 11, 27, 23, 59, 59, tzinfo=dt.timezone.utc)


@pytest.mark.parametrize("item_id, error", [(None, "missing_item_id"), ("  ", "empty_item_id"),
                                            (17.5, "wrong_type"), (True, "wrong_type")])
def test_bad_item_ids(item_id, error):
    with pytest.raises(Invalid) as e:
        contract.catalog_item({"item_id": item_id, "title": "x"}, "/data/c.parquet", SPEC)
    assert e.value.error == error


def test_common_export_types_are_accepted():
    """BigQuery exports ids as INT64 and timestamps often travel as ISO-8601 strings; a null tag is dropped
    alone."""
    item = contract.catalog_item({"item_id": 17, "title": "x", "tags": ["a", None, "b"]}, "/c.parquet", SPEC)
    assert item["item_id"] == "17" and item["text"]["tags"] == ["a", "b"]
    for when in ("2025-11-24T16:00:00Z", "2025-11-24 16:00:00", "2025-11-24T17:00:00+01:00"):
        event = contract.interaction({"user_id": 5, "item_id": 17, "timestamp": when}, InteractionColumns(), END)
        assert (event["user_id"], event["item_id"], event["timestamp"]) == ("5", "17", 1764000000)


def test_item_normalised():
    item = contract.catalog_item({"item_id": "a", "title": "Film", "description": " ", "tags": ["x", ""],
                                  "image_uri": "../media/a.jpg", "audio_bytes": b"RIFF", "audio_uri": "a.wav",
                                  "features": [1, 2.5, 3, 4]}, "/data/catalog/c.parquet", SPEC)
    assert item["text"] == {"title": "Film", "tags": ["x"]}
    assert item["image_uri"] == "/data/media/a.jpg"
    assert item["audio"] == b"RIFF" and item["audio_uri"] is None  # inline bytes win over a URI
    assert item["vectors"] == {"features": [1, 2.5, 3, 4]}


@pytest.mark.parametrize("row", [{"title": 5}, {"tags": ["a", 3]}, {"image_bytes": "not bytes"},
                                 {"features": ["a"]}, {"updated_at": "yesterday"}])
def test_wrong_types(row):
    with pytest.raises(Invalid) as e:
        contract.catalog_item({"item_id": "a", **row}, "/c.parquet", SPEC)
    assert e.value.error in ("wrong_type", "bad_timestamp")


def test_uri_resolution():
    assert contract.resolve_uri("img/a.jpg", "gs://b/cat/c.parquet") == "gs://b/cat/img/a.jpg"
    assert contract.resolve_uri("../a.jpg", "gs://b/cat/c.parquet") == "gs://b/a.jpg"
    assert contract.resolve_uri("/abs/a.jpg", "gs://b/c.parquet") == "/abs/a.jpg"
    assert contract.resolve_uri("gs://x/a.jpg", "/c.parquet") == "gs://x/a.jpg"


@pytest.mark.parametrize("when", [1764000000, dt.datetime(2025, 11, 24, 16, 0),
                                  dt.datetime(2025, 11, 24, 16, 0, tzinfo=dt.timezone.utc)])
def test_timestamps_accepted(when):
    event = contract.interaction({"user_id": "u", "item_id": "i", "timestamp": when, "weight": 4},
                                 InteractionColumns(), END)
    assert event["timestamp"] == 1764000000 and event["weight"] == 4.0


@pytest.mark.parametrize("row, error", [
    ({"timestamp": None}, "bad_timestamp"), ({"timestamp": -5}, "bad_timestamp"),
    ({"timestamp": 1.5}, "bad_timestamp"), ({"timestamp": 4_000_000_000}, "bad_timestamp"),
    ({"timestamp": "last tuesday"}, "bad_timestamp"),
    ({"weight": float("nan")}, "bad_weight"), ({"weight": -1.0}, "bad_weight"),
    ({"user_id": None}, "missing_user_id"),
    ({"item_id": ""}, "empty_item_id"), ({"event": 3}, "wrong_type")])
def test_bad_interactions(row, error):
    base = {"user_id": "u", "item_id": "i", "timestamp": 1764000000}
    with pytest.raises(Invalid) as e:
        contract.interaction({**base, **row}, InteractionColumns(), END)
    assert e.value.error == error


def test_files_and_plan(tmp_path):
    (tmp_path / "cat" / "sub").mkdir(parents=True)
    table = pa.table({"item_id": ["a", "b"], "title": ["x", "y"]})
    pq.write_table(table, tmp_path / "cat" / "one.parquet", row_group_size=1)
    pq.write_table(table, tmp_path / "cat" / "sub" / "two.parquet")
    (tmp_path / "cat" / "_SUCCESS").write_text("")
    (tmp_path / "cat" / ".hidden.parquet").write_text("junk")
    files = list_files(str(tmp_path / "cat"))
    assert files == [str(tmp_path / "cat" / "one.parquet"), str(tmp_path / "cat" / "sub" / "two.parquet")]
    assert list_files(str(tmp_path / "cat" / "*.parquet")) == files[:1]
    work, columns = plan(str(tmp_path / "cat"), lambda f, c: contract.check_catalog_schema(f, c, SPEC))
    assert work == [(files[0], 0, 0), (files[0], 1, 1), (files[1], 0, 0)] and columns == {"item_id", "title"}


def test_unusable_files(tmp_path):
    with pytest.raises(ContractError, match="no such file"):
        list_files(str(tmp_path / "nope"))
    (tmp_path / "x.parquet").write_text("item_id,title\n")
    with pytest.raises(ContractError, match=r"x\.parquet: not a readable Parquet file"):
        plan(str(tmp_path / "x.parquet"), lambda f, c: None)
    pq.write_table(pa.table({"id": ["a"], "name": ["b"]}), tmp_path / "y.parquet")
    with pytest.raises(ContractError, match="no 'item_id' column"):
        plan(str(tmp_path / "y.parquet"), lambda f, c: contract.check_catalog_schema(f, c, SPEC))
    pq.write_table(pa.table({"item_id": ["a"], "name": ["b"]}), tmp_path / "z.parquet")
    with pytest.raises(ContractError, match="none of the content columns"):
        plan(str(tmp_path / "z.parquet"), lambda f, c: contract.check_catalog_schema(f, c, SPEC))


def test_dead_letters_echo_values_capped():
    from mmfuse.transforms.deadletter import MAX_CHARS, dead_letter
    letter = dead_letter("catalog", "k" * 10_000, "wrong_type", "title=" + "x" * 10_000, "/c.parquet#row=1")
    assert len(letter["key"]) < MAX_CHARS + 40 and len(letter["message"]) < MAX_CHARS + 40
    assert letter["message"].endswith("(10006 characters)")
