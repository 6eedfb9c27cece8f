"""``mmfuse explain``: a user's recommendations as the night wrote them, each score split exactly by the history
items behind it; the split checked against the night's own vectors."""
from __future__ import annotations

import numpy as np
import pytest

from mmfuse.models.ranking import because
from mmfuse.pipelines import explain
from tests.conftest import dataset


def test_because_names_the_largest_shares_of_the_score():
    history = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], np.float32)
    rows, shares = because(history, np.array([0.5, 0.2, 0.4], np.float32), np.array([[0.0, 1.0]], np.float32), 2)
    assert rows.tolist() == [[2, 1]] and shares[0] == pytest.approx([0.32, 0.2])


@pytest.mark.slow  # reads a nightly run
def test_explain_splits_each_score_by_history_item(demo_night, demo, capsys):
    users = {u["user_id"]: u for u in dataset(demo_night, "users").to_pylist()}
    vectors = {i["item_id"]: np.array(i["vector"], np.float32) for i in dataset(demo_night, "items").to_pylist()}
    recs = sorted((r for r in dataset(demo_night, "recommendations").to_pylist()),
                  key=lambda r: (r["user_id"], r["rank"]))
    user = next(u for u in sorted(users) if not users[u]["fallback"])
    assert all(not r["because"] for r in recs if users[r["user_id"]]["fallback"])
    got = explain.explain(str(demo_night), user)

    mine = [r for r in recs if r["user_id"] == user]
    assert [(r["rank"], r["item_id"]) for r in got["recommendations"]] == [(r["rank"], r["item_id"]) for r in mine]
    history = users[user]["history"]
    assert len(history) <= 50 and {h["item_id"] for h in got["history"]} == {h["item_id"] for h in history}
    # the kept history rebuilds the user vector, so each score splits into one share per history item
    rebuilt = sum(h["weight"] * vectors[h["item_id"]] for h in history)
    np.testing.assert_allclose(rebuilt, users[user]["vector"], atol=1e-5)
    for r in got["recommendations"]:
        shares = {h["item_id"]: h["weight"] * float(vectors[h["item_id"]] @ vectors[r["item_id"]]) for h in history}
        best = sorted(shares, key=lambda i: -shares[i])[:explain.BECAUSE]
        assert [b["item_id"] for b in r["because"]] == best
        assert [b["share"] for b in r["because"]] == pytest.approx([shares[i] for i in best], abs=1e-5)
        assert sum(shares.values()) == pytest.approx(r["score"], abs=1e-5) and r["rest"] == pytest.approx(0, abs=1e-5)
        assert sum(r["contributions"].values()) == pytest.approx(r["score"], abs=1e-5)
        # the night wrote the same "because" into the recommendation row
        [row] = [m for m in mine if m["rank"] == r["rank"]]
        assert [b["item_id"] for b in row["because"]] == best
        assert [b["share"] for b in row["because"]] == pytest.approx([shares[i] for i in best], abs=1e-5)

    assert explain.main([f"--run={demo_night}", f"--user={user}", f"--catalog={demo['catalog']}"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"user {user}: ") and len(lines) == 1 + len(mine)
    assert "because: " in lines[1] and "'" in lines[1]  # titles quoted beside the ids

    assert explain.main([f"--run={demo_night}", "--user=nobody"]) == 2
    assert explain.main([f"--run={demo_night.parent}", f"--user={user}"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "nobody" in err[0] and "not a complete run" in err[1]
