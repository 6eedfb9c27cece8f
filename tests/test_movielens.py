"""MovieLens-small converted to the contract and run through the nightly job: nothing valid is lost."""
import pytest

from examples import movielens
from pipelines import nightly
from tests.conftest import RUN_DATE, dataset, metrics, shared

pytestmark = pytest.mark.slow


def test_movielens_runs_whole(tmp_path):
    paths = movielens.convert(shared("movielens"), tmp_path / "ml")
    assert nightly.main([f"--catalog={paths['catalog']}", f"--interactions={paths['interactions']}",
                         f"--output={tmp_path / 'out'}", f"--run_date={RUN_DATE}"]) == 0
    run_dir = tmp_path / "out" / RUN_DATE
    stages = metrics(run_dir)["stages"]
    assert stages["catalog"] == {"in": 9742, "out": 9742, "dead": 0}
    assert stages["media:image"] == {"in": 2947, "out": 2947, "dead": 0}
    # ratings.csv holds 100,836 ratings plus one orphan row for a movieId that movies.csv lacks.
    assert stages["interactions"] == {"in": 100837, "out": 100836, "dead": 1}
    [orphan] = dataset(run_dir, "dead_letter").to_pylist()
    assert orphan["error"] == "unknown_item" and "'999999' is not in the catalog" in orphan["message"]
    assert len(dataset(run_dir, "embeddings")) == 9742
