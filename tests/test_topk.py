"""Exact top-k: the numpy kernel and the sharded Beam transform against a brute-force numpy reference."""

import collections
import pickle

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.portability.fn_api_runner import FnApiRunner

from mmfuse.models import ranking, topk
from mmfuse.transforms import topk as sharded
from mmfuse.transforms.topk import TopK

MULTI_PROCESS = ["--direct_running_mode=multi_processing", "--direct_num_workers=2"]


def reference(queries, items, k, excluded, item_ids):
    """Score every pair, drop the excluded, order by (score desc, item id asc), keep k."""
    scores = queries @ items.T
    out = []
    for row, banned in enumerate(excluded):
        s = scores[row].copy()
        s[list(banned)] = -np.inf
        order = [c for c in np.lexsort((item_ids, -s)) if s[c] > -np.inf][:k]
        out.append((order, s[order]))
    return out


def data(rng, n_queries, n_items, dim, integer=False):
    q = rng.standard_normal((n_queries, dim)).astype(np.float32)
    x = rng.standard_normal((n_items, dim)).astype(np.float32)
    if integer:  # small integers: dot products are exact, so many scores tie exactly
        q, x = np.round(q), np.round(x)
    return q, x


@pytest.mark.parametrize("n_queries,n_items,dim,k", [(40, 3000, 16, 5), (300, 5000, 8, 20), (7, 9, 4, 5),
                                                     (64, 2048, 3, 20), (5, 1500, 64, 1)])
@pytest.mark.parametrize("integer", [False, True])
@pytest.mark.parametrize("n_excluded", [0, 50])
def test_kernel_equals_brute_force(n_queries, n_items, dim, k, integer, n_excluded):
    rng = np.random.default_rng(n_queries * n_items + dim)
    q, x = data(rng, n_queries, n_items, dim, integer)
    excluded = [rng.choice(n_items, min(n_excluded, n_items), replace=False) for _ in range(n_queries)]
    excluded[0] = np.arange(n_items)  # a query that may get nothing
    rows = np.repeat(np.arange(n_queries), [len(e) for e in excluded])
    columns, scores = topk.top_k(q, x, k, (rows, np.concatenate(excluded)), rows_per_tile=32, columns_per_tile=700)
    for row, (want, want_scores) in enumerate(reference(q, x, k, excluded, np.arange(n_items))):
        assert columns[row, :len(want)].tolist() == list(want)
        assert (columns[row, len(want):] == -1).all() and (scores[row, len(want):] == -np.inf).all()
        np.testing.assert_allclose(scores[row, :len(want)], want_scores, rtol=1e-5, atol=1e-5)
        assert not set(columns[row].tolist()) & set(excluded[row].tolist())
    assert (columns[0] == -1).all()


def test_kernel_answer_does_not_depend_on_the_other_rows():
    """A query's top k and scores are the same bits whichever queries share its tiles (the BLAS's float32
    products depend on a row's place in the tile for some kernels; the answer is rescored in float64)."""
    rng = np.random.default_rng(11)
    q, x = data(rng, 300, 2000, 16)
    whole = topk.top_k(q, x, 10, rows_per_tile=64, columns_per_tile=256)
    order = rng.permutation(300)
    shuffled = topk.top_k(q[order], x, 10, rows_per_tile=64, columns_per_tile=256)
    alone = topk.top_k(q[5:12], x, 10, rows_per_tile=64, columns_per_tile=256)
    for got, rows in ((shuffled, order), (alone, np.arange(5, 12))):
        assert got[0].tolist() == whole[0][rows].tolist()
        assert got[1].tobytes() == whole[1][rows].tobytes()


def test_kernel_ties_break_by_column():
    columns, scores = topk.top_k(np.ones((2, 2)), np.zeros((3000, 2)), 4, (np.array([1]), np.array([0])))
    assert columns.tolist() == [[0, 1, 2, 3], [1, 2, 3, 4]] and (scores == 0).all()


def test_hash_index_is_exact_when_hashes_collide():
    ids = np.array(["a", "b", "c", "d"])  # sorted
    wanted = np.array(["c", "x", "a", "d", "d"])
    for hashes, wanted_hashes in ((topk.mixed_hash(ids.tolist()), topk.mixed_hash(wanted.tolist())),
                                  (np.zeros(4, np.uint64), np.zeros(5, np.uint64))):  # every hash collides
        found, rows = topk.HashIndex(ids, hashes).find(wanted, wanted_hashes)
        assert found.tolist() == [True, False, True, True, True]
        assert rows[found].tolist() == [2, 0, 3, 3]


def test_hash_index_stays_shallow_for_one_shards_ids():
    """A shard holds a narrow range of buckets (the hashes' high bits), so its table must place ids by other
    bits: placed by the high bits, one of 8 shards crowds into an eighth of the table and every probe walks a
    run as long as the shard (a 10^6-item night spent most of its hours there)."""
    ids = topk.utf8([f"item{i}" for i in range(400_000)])
    hashes = topk.mixed_hash(ids)
    mine = topk.bucket(hashes, sharded.BUCKETS) < sharded.BUCKETS // 8
    index = topk.HashIndex(ids[mine], hashes[mine])
    slots = np.flatnonzero(index.table >= 0)
    home = (hashes[mine][index.table[slots]] & np.uint64(len(index.table) - 1)).astype(np.int64)
    assert len(slots) == mine.sum() and ((slots - home) % len(index.table)).max() < 100


def test_utf8_ids_keep_their_order_and_round_trip():
    ids = np.array(["b", "a1", "é", "𝒾", "z", "", "ïx"])
    for raw in (topk.utf8(ids), topk.utf8(ids[[1, 4]])):  # the ASCII path and the UTF-8 one
        assert raw.dtype.kind == "S"
    assert topk.text(topk.utf8(ids)).tolist() == ids.tolist()
    assert np.argsort(topk.utf8(ids)).tolist() == np.argsort(ids).tolist()
    assert topk.mixed_hash(ids).tolist() == topk.mixed_hash(topk.utf8(ids)).tolist()


def test_spans_cover_the_counted_buckets_in_near_equal_ranges():
    counts = np.random.default_rng(0).integers(0, 50, sharded.BUCKETS)
    counts[:5] = 0  # empty ranges are left out
    spans = ranking.spans(counts, 300)
    assert sum(s.rows for s in spans) == counts.sum() and all(s.rows > 0 for s in spans)
    assert len(spans) <= int(np.ceil(counts.sum() / 300))
    assert all(a.hi <= b.lo for a, b in zip(spans, spans[1:]))
    assert len(ranking.spans(counts, 1)) == np.count_nonzero(counts)  # at most one span per bucket


def test_compile_kernels_compiles_what_top_k_runs():
    # A worker compiles before it holds a shard: the types compiled must be those top_k and the transform use,
    # or the first real call compiles again in the middle of a task.
    kernels = (topk._scan, topk._rescore, topk.contributions, topk._fnv1a, topk._hash_table, topk._probe)
    topk.compile_kernels()
    compiled = [len(kernel.signatures) for kernel in kernels]
    rng = np.random.default_rng(0)
    q, x = rng.standard_normal((5, 8)).astype(np.float32), rng.standard_normal((30, 8)).astype(np.float32)
    shard = ranking.Shard.stack([{"item_id": f"i{j}", "vector": x[j], "parts": {"text": x[j]}} for j in range(30)])
    shard = shard.take(np.argsort(shard.ids))
    batch = ranking.Batch.stack([("u", q[0], ["i3", "i7"])])
    found, cols = topk.HashIndex(shard.ids, shard.hashes).find(batch.excluded_ids, topk.mixed_hash(batch.excluded_ids))
    columns, _ = topk.top_k(q, shard.vectors, 3, (np.zeros(found.sum(), np.int64), cols[found]))
    topk.contributions(q, shard.parts, shard.has, columns)
    assert min(compiled) >= 1
    assert [len(kernel.signatures) for kernel in kernels] == compiled


def test_id_hash_is_fnv1a():
    # Published FNV-1a 64-bit test vectors: the hash must not depend on the process (unlike hash()).
    assert topk.id_hash(["", "a", "foobar"]).tolist() == [0xCBF29CE484222325, 0xAF63DC4C8601EC8C,
                                                          0x85944171F73967E8]
    assert topk.id_hash(["é"]).tolist() == topk.id_hash(["é", "x"]).tolist()[:1]


def run_topk(tmp_path, queries, items, k, batch, shard, flags=()):
    """Run TopK on the FnApiRunner; returns {query_id: Ranked}."""
    out = tmp_path / f"ranked-{batch}-{shard}.pkl"
    with beam.Pipeline(runner=FnApiRunner(), options=PipelineOptions(list(flags))) as p:
        ranked = ({"queries": p | "Queries" >> beam.Create(queries), "items": p | "Items" >> beam.Create(items)}
                  | TopK(k, batch, shard))
        _ = ranked | beam.combiners.ToList() | beam.Map(lambda r: out.write_bytes(pickle.dumps(r)))
    return dict(pickle.loads(out.read_bytes())) if out.exists() else {}


def problem(n_queries, n_items, dim, n_excluded):
    """Random queries and items with two modalities (every third item text only) and exclusions."""
    rng = np.random.default_rng(n_items)
    q, x = data(rng, n_queries, n_items, dim, integer=n_items == 40)
    share = rng.uniform(0, 1, (n_items, 1)).astype(np.float32)
    # string order differs from number order; ids of 1 to 4 UTF-8 bytes a character, whose byte order is
    # their code-point order
    item_ids = np.array([f"{'iïé𝒾'[j % 4]}{j}" for j in range(n_items)])
    items = [{"item_id": item_ids[j], "vector": x[j],
              "parts": {"text": share[j] * x[j], "image": x[j] - share[j] * x[j]} if j % 3 else {"text": x[j]}}
             for j in range(n_items)]
    excluded = [rng.choice(n_items, n_excluded, replace=False) for _ in range(n_queries)]
    queries = [(f"u{i}", q[i], item_ids[excluded[i]].tolist()) for i in range(n_queries)]
    return q, x, item_ids, items, excluded, queries


def check_against_brute_force(got, q, x, k, excluded, item_ids):
    assert len(got) == len(q)
    for i, (want, want_scores) in enumerate(reference(q, x, k, excluded, item_ids)):
        r = got[f"u{i}"]
        assert r.item_ids.tolist() == item_ids[want].tolist()
        np.testing.assert_allclose(r.scores, want_scores, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.nansum(r.contributions, axis=1), r.scores, rtol=1e-4, atol=1e-5)
        image = r.contributions[:, r.modalities.index("image")]
        assert np.isnan(image).tolist() == [int(item[1:]) % 3 == 0 for item in r.item_ids.tolist()]


@pytest.mark.slow
@pytest.mark.parametrize("n_queries,n_items,dim,k,n_excluded", [(300, 2500, 8, 10, 30), (50, 40, 4, 20, 0),
                                                                (120, 1500, 16, 5, 0)])
def test_sharded_transform_equals_brute_force(tmp_path, n_queries, n_items, dim, k, n_excluded):
    q, x, item_ids, items, excluded, queries = problem(n_queries, n_items, dim, n_excluded)
    got = run_topk(tmp_path, queries, items, k, batch=64, shard=700)
    check_against_brute_force(got, q, x, k, excluded, item_ids)
    whole = run_topk(tmp_path, queries, items, k, batch=10_000, shard=10_000)
    same = lambda ranked: {u: (r.item_ids.tolist(), r.scores.tobytes()) for u, r in ranked.items()}  # noqa: E731
    assert same(whole) == same(got)  # the same bits however the queries and items are cut up


@pytest.mark.slow
def test_two_worker_processes_equal_brute_force(tmp_path):
    """Several shards and batches over two SDK worker processes: each worker gets a share of every stage,
    the pieces travel between processes, and the partials of a batch come from both workers."""
    q, x, item_ids, items, excluded, queries = problem(900, 4000, 16, 40)
    got = run_topk(tmp_path, queries, items, 10, batch=150, shard=600, flags=MULTI_PROCESS)
    check_against_brute_force(got, q, x, 10, excluded, item_ids)


def test_lost_or_duplicated_pieces_fail_the_job():
    """What the runner drops or repeats is caught where pieces meet, never turned into a wrong ranking."""
    shard = ranking.Shard.stack([{"item_id": f"i{j}", "vector": np.ones(2), "parts": {}} for j in range(50)])
    pieces = {key: [piece] for key, piece in sharded._cut(shard, 7)}
    counts = collections.Counter({key: len(p.ids) for key, (p,) in pieces.items()})
    (span,) = ranking.spans(sharded.bucket_counts(counts), 1000)
    assert len(sharded._read(side_input(pieces), span, counts).ids) == 50
    first = min(pieces)
    lost = {key: p for key, p in pieces.items() if key != first}
    with pytest.raises(RuntimeError, match=f"hold {50 - len(pieces[first][0].ids)} records where 50 were counted"):
        sharded._read(side_input(lost), span, counts)
    with pytest.raises(RuntimeError, match="hold 0 records where 50 were counted"):
        sharded._read(side_input({}), span, counts)
    doubled = {key: p + p if key == first else p for key, p in pieces.items()}
    with pytest.raises(RuntimeError, match=f"hold {50 + len(pieces[first][0].ids)} records where 50 were counted"):
        sharded._read(side_input(doubled), span, counts)


def test_pieces_are_keyed_by_bucket_and_group():
    """A side-input lookup returns one group's share of a bucket, so its size does not grow with the
    catalogue: consecutive blocks a worker cuts, in one bundle or several, form groups of up to the group
    size. Groups that share a name (an item read twice) add up under one key."""
    blocks = [ranking.Shard.stack([{"item_id": f"b{b}i{j}", "vector": np.ones(2), "parts": {}} for j in range(300)])
              for b in range(3)]
    cut = sharded._Cut(600)
    cut.setup()
    keys = []
    for block in blocks:  # a bundle each
        cut.start_bundle()
        keys.append([key for key, _ in cut.process(block)])
    groups = [{g for _, g in k} for k in keys]
    assert all(len(k) == len(set(k)) for k in keys)  # one piece per bucket in a block
    assert all(len(g) == 1 for g in groups) and groups[0] == groups[1] != groups[2]
    assert {b for b, _ in keys[0]} <= set(range(sharded.BUCKETS))
    twice, counts = collections.defaultdict(list), collections.Counter()
    for block in (blocks[0], blocks[0]):
        cut.setup()  # each in a worker of its own
        for key, piece in cut.process(block):
            twice[key].append(piece)
            counts[key] += len(piece.ids)
    (span,) = ranking.spans(sharded.bucket_counts(counts), 10_000)
    assert sharded.bucket_counts(counts).sum() == 600 == len(sharded._read(side_input(twice), span, counts).ids)


def test_batch_keeps_each_querys_exclusions():
    rng = np.random.default_rng(3)
    queries = [(f"u{i}", rng.standard_normal(4), [f"i{j}" for j in rng.choice(100, i % 4, replace=False)])
               for i in range(300)]
    batch = ranking.Batch.stack(queries)
    ids, excluded = topk.text(batch.ids).tolist(), topk.text(batch.excluded_ids)
    got = {u: sorted(excluded[batch.excluded_rows() == row].tolist()) for row, u in enumerate(ids)}
    assert got == {q[0]: sorted(q[2]) for q in queries}


def test_shard_moves_without_its_last_part():
    """A pickled shard leaves out its last modality's part and derives it from the fused vector: the same
    parts come back, zero where an item lacks that modality."""
    rng = np.random.default_rng(5)
    parts = [{"image": rng.standard_normal(8), "text": rng.standard_normal(8)}, {"image": rng.standard_normal(8)},
             {"text": rng.standard_normal(8)}, {}]
    items = [{"item_id": f"i{j}", "vector": sum(p.values(), np.zeros(8)), "parts": p} for j, p in enumerate(parts)]
    shard = ranking.Shard.stack(items)
    moved = pickle.loads(pickle.dumps(shard))
    assert len(pickle.dumps(shard)) < len(pickle.dumps(tuple(shard)))
    assert moved.modalities == ("image", "text") and moved.has.tolist() == shard.has.tolist()
    np.testing.assert_allclose(moved.parts, shard.parts, atol=1e-6)
    assert (moved.parts[1, [1, 3]] == 0).all()


def test_transform_refuses_windowed_records():
    p = beam.Pipeline(runner=FnApiRunner())  # refused while the pipeline is built, never run
    windowed = p | beam.Create([("u", np.ones(2), [])]) | beam.WindowInto(beam.window.FixedWindows(60))
    items = p | "Items" >> beam.Create([{"item_id": "a", "vector": np.ones(2), "parts": {}}])
    with pytest.raises(ValueError, match="global window"):
        _ = {"queries": windowed, "items": items} | TopK(2)


def side_input(pieces):
    """A multimap side input's behaviour: a key with no pieces reads as empty."""
    return collections.defaultdict(list, pieces)


def test_transform_refuses_vectors_of_different_lengths(tmp_path):
    items = [{"item_id": "a", "vector": np.ones(4), "parts": {}}, {"item_id": "b", "vector": np.ones(3), "parts": {}}]
    with pytest.raises(Exception, match="vectors of different lengths"):
        run_topk(tmp_path, [("u", np.ones(4), [])], items, 2, 10, 10)


@pytest.mark.slow
def test_queries_with_history_name_the_history_items_a_score_comes_from(tmp_path):
    """Each ranked item's ``because``: the 3 history items of largest weight x <history item, item>, largest
    first (ties: earlier history row), as brute force finds them, with the history items' vectors found
    among the items; the same however queries and items are cut up. A query with a short history names
    fewer, one without history none; a history item that is not among the items is never named."""
    q, x, item_ids, items, excluded, queries = problem(150, 1500, 8, 10)
    rng = np.random.default_rng(9)
    histories = []
    for i in range(len(queries)):
        rows = rng.choice(len(x), i % 7, replace=False)
        histories.append((item_ids[rows].tolist() + ["not-an-item"], [*rng.uniform(-0.2, 1.0, len(rows)), 5.0]))
    got = run_topk(tmp_path, [(*query, h) for query, h in zip(queries, histories)], items, 10, batch=64, shard=700)
    check_against_brute_force(got, q, x, 10, excluded, item_ids)
    vectors = dict(zip(item_ids.tolist(), x))
    for i, (ids, weights) in enumerate(histories):
        ids, weights = ids[:-1], np.asarray(weights[:-1], np.float32)
        r = got[f"u{i}"]
        shares = np.array([[w * float(vectors[ids[h]] @ vectors[item]) for h, w in enumerate(weights)]
                           for item in r.item_ids.tolist()]).reshape(len(r.item_ids), len(ids))
        order = np.argsort(-shares, axis=1, kind="stable")[:, :3]
        named = [[b for b in row if b] for row in r.because_ids.tolist()]
        assert named == [[ids[h] for h in row] for row in order], i
        np.testing.assert_allclose(r.because_shares[:, :order.shape[1]], np.take_along_axis(shares, order, 1),
                                   rtol=1e-5, atol=1e-6)
        assert np.isnan(r.because_shares[:, order.shape[1]:]).all()
    whole = run_topk(tmp_path, [(*query, h) for query, h in zip(queries, histories)], items, 10, batch=10_000,
                     shard=10_000)
    assert all(whole[u].because_ids.tolist() == r.because_ids.tolist() for u, r in got.items())
