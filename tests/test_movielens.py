"""MovieLens-small through the nightly job: nothing valid is lost, every text and poster is encoded, and the
next night re-encodes only what changed."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageOps

from tests.conftest import dataset, metrics, movielens_run
from tests.test_recommend import check_movielens
from tests.test_report import score_night_against_a_seeded_holdout

pytestmark = pytest.mark.slow


@pytest.mark.timeout(2400)  # two nights of 9,742 items: encoding, an alignment fit, recommendations
def test_movielens_nights(movielens_night, tmp_path):
    paths, out, first = movielens_night["paths"], movielens_night["out"], movielens_night["first"]
    report = metrics(first)
    stages = report["stages"]
    assert stages["catalog"] == {"in": 9742, "out": 9742, "dead": 0}
    assert stages["media:image"] == {"in": 2947, "out": 2947, "dead": 0}
    # ratings.csv holds 100,836 ratings plus one orphan row for a movieId that movies.csv lacks.
    assert stages["interactions"] == {"in": 100837, "out": 100836, "dead": 1}
    [orphan] = dataset(first, "dead_letter").to_pylist()
    assert orphan["error"] == "unknown_item" and "'999999' is not in the catalog" in orphan["message"]
    assert report["modalities"]["text"] == {"encoded": 9742, "reused": 0, "dead": 0}
    assert report["modalities"]["image"] == {"encoded": 2947, "reused": 0, "dead": 0}
    embeddings = dataset(first, "embeddings")
    assert len(embeddings) == 9742 and embeddings.column("image").null_count == 9742 - 2947

    assert stages["align"] == {"in": 9742, "out": 9742, "dead": 0}
    # Every user (all 610 have a history) gets 20 ranked unseen items; every item its similar items.
    assert stages["recommend"] == {"in": 610, "out": 610, "dead": 0}
    recommendations = dataset(first, "recommendations")
    assert len(recommendations) == 610 * 20
    seen = set(zip(*(pq.read_table(paths["interactions"], columns=["user_id", "item_id"])[c].to_pylist()
                     for c in ("user_id", "item_id"))))
    assert not seen & set(zip(recommendations["user_id"].to_pylist(), recommendations["item_id"].to_pylist()))
    assert len(set(dataset(first, "similar_items")["item_id"].to_pylist())) == 9742
    # cf neighbours cross genres
    check_movielens(first, pq.read_table(paths["catalog"]).to_pylist(), sequel_first=False, same_genre=0.7)
    assert report["alignment"]["reused_from"] is None

    # The next night, after 10 retitled films and 5 new posters, re-encodes those alone.
    catalog = pq.read_table(paths["catalog"]).to_pylist()
    retitled = [r["item_id"] for r in catalog[100:110]]
    reposted = [r["item_id"] for r in catalog if r["image_uri"]][:5]
    for r in catalog:
        if r["item_id"] in retitled:
            r["title"] = r["title"] + " [Director's Cut]"
        if r["item_id"] in reposted:
            mirrored = tmp_path / "posters" / f"{r['item_id']}.jpg"
            mirrored.parent.mkdir(exist_ok=True)
            ImageOps.mirror(Image.open(r["image_uri"])).save(mirrored, quality=90)
            r["image_uri"] = str(mirrored)
    edited = tmp_path / "edited.parquet"
    pq.write_table(pa.Table.from_pylist(catalog, schema=pq.read_schema(paths["catalog"])), edited)
    second_dir = movielens_run(paths, out, "2026-11-26", catalog=edited, media=[tmp_path / "posters"])
    second = metrics(second_dir)
    assert second["alignment"]["reused_from"] == str(first / "alignment")
    assert second["modalities"]["text"] == {"encoded": 10, "reused": 9732, "dead": 0}
    assert second["modalities"]["image"] == {"encoded": 5, "reused": 2942, "dead": 0}
    before = {r["item_id"]: r["text_hash"] for r in embeddings.select(["item_id", "text_hash"]).to_pylist()}
    after = {r["item_id"]: r["text_hash"] for r in dataset(second_dir, "embeddings").to_pylist()}
    assert {i for i in after if after[i] != before[i]} == set(retitled)


def test_evaluate_scores_a_movielens_night_as_an_independent_scorer_does(movielens_night, tmp_path):
    score_night_against_a_seeded_holdout(movielens_night["first"], tmp_path, movielens_night["paths"]["interactions"])
