"""The evaluation protocol of ``docs/evaluation.md``, so every reported number is comparable.

Warm split: per user, the last 20% of interactions by time is test; tuning uses the last 10% of each
user's training interactions, never test. Every item of the catalogue is ranked (no sampled negatives),
with the user's training items removed. Cold split: 20% of the items are held out with all their
interactions, and only content can rank them. Baselines share one interface, ``fit(train)`` then
``score(user_indices) -> (n, n_items) float32``, and are scored in user batches so no users x items
matrix is ever built whole.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp

KS = (10, 20)
MIN_USER_INTERACTIONS = 5
TEST_FRACTION, VALIDATION_FRACTION, COLD_FRACTION = 0.2, 0.1, 0.2
# Small on purpose (8 fits, seconds on MovieLens-small); it holds the reference configuration.
ALS_GRID = {"factors": [32, 64], "regularization": [0.01, 0.1], "alpha": [1.0, 5.0], "iterations": [15]}

Scores = np.ndarray | Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Interactions:
    """Interaction arrays indexed into fixed user and item vocabularies.

    Splits keep both vocabularies, so an item index means the same item in train, test and in any
    item-vector matrix aligned with ``item_ids``.
    """

    user: np.ndarray  # int64 index into user_ids
    item: np.ndarray  # int64 index into item_ids
    timestamp: np.ndarray  # int64; only the order matters
    weight: np.ndarray  # float32
    user_ids: np.ndarray  # str
    item_ids: np.ndarray  # str

    @classmethod
    def from_table(cls, table: pa.Table, items: Sequence[str] | None = None,
                   min_interactions: int = MIN_USER_INTERACTIONS) -> Interactions:
        """Read a contract interactions table, keep interactions on ``items`` and then users with at least
        ``min_interactions`` of them.

        ``items`` (default: every item seen, sorted) fixes the item indices. Timestamp ties are broken by
        item index, so pass the catalog's order: for MovieLens that is by movieId, as the protocol asks.
        """
        item_ids = np.asarray(sorted(set(table["item_id"].to_pylist())) if items is None else list(items),
                              dtype=str)
        item = pc.index_in(table["item_id"], value_set=pa.array(item_ids)).to_numpy(zero_copy_only=False)
        keep = ~np.isnan(item)
        timestamp = table["timestamp"]
        if pa.types.is_timestamp(timestamp.type):
            timestamp = pc.cast(timestamp, pa.int64())
        weight = (pc.fill_null(table["weight"], 1.0).to_numpy() if "weight" in table.column_names
                  else np.ones(len(table)))
        users = np.asarray(table["user_id"].to_pylist(), dtype=str)[keep]
        user_ids, user, counts = np.unique(users, return_inverse=True, return_counts=True)
        active = counts >= min_interactions
        rows = active[user]
        new_index = np.cumsum(active) - 1
        return cls(user=new_index[user[rows]],
                   item=item[keep][rows].astype(np.int64),
                   timestamp=timestamp.to_numpy()[keep][rows].astype(np.int64),
                   weight=np.asarray(weight, dtype=np.float32)[keep][rows],
                   user_ids=user_ids[active], item_ids=item_ids)

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def __len__(self) -> int:
        return len(self.user)

    def subset(self, mask: np.ndarray) -> Interactions:
        """The interactions where ``mask`` holds, with the same vocabularies."""
        return dataclasses.replace(self, user=self.user[mask], item=self.item[mask],
                                   timestamp=self.timestamp[mask], weight=self.weight[mask])

    def matrix(self) -> sp.csr_matrix:
        """Binary users x items matrix: every interaction is one positive, repeats count once."""
        m = sp.csr_matrix((np.ones(len(self), np.float32), (self.user, self.item)),
                          shape=(self.n_users, self.n_items))
        m.data[:] = 1.0
        return m

    def align(self, ids: Sequence[str], vectors: np.ndarray) -> np.ndarray:
        """Rows of ``vectors`` (one per id in ``ids``) placed at their item index; NaN rows for items
        without a vector, ids outside the vocabulary dropped. Turns an embeddings table into the item
        matrix that :class:`ContentKNN` takes."""
        vectors = np.asarray(vectors, dtype=np.float32)
        out = np.full((self.n_items, vectors.shape[1]), np.nan, np.float32)
        index = pc.index_in(pa.array(list(ids), pa.string()), value_set=pa.array(self.item_ids))
        index = index.to_numpy(zero_copy_only=False)
        found = ~np.isnan(index)
        out[index[found].astype(np.int64)] = vectors[found]
        return out


def _last_per_user(inter: Interactions, fraction: float) -> np.ndarray:
    """Mask of each user's last ``fraction`` of interactions (rounded down, at least one) by time, ties by item.

    Rounding down reproduces the reference figures of EVALUATION.md (rounding to nearest does not)."""
    order = np.lexsort((inter.item, inter.timestamp, inter.user))
    user = inter.user[order]
    starts = np.flatnonzero(np.r_[True, user[1:] != user[:-1]])
    counts = np.diff(np.r_[starts, len(user)])
    n_last = np.maximum(1, np.floor(counts * fraction + 1e-9).astype(np.int64))
    position = np.arange(len(user)) - np.repeat(starts, counts)
    mask = np.empty(len(user), bool)
    mask[order] = position >= np.repeat(counts - n_last, counts)
    return mask


def warm_split(inter: Interactions) -> tuple[Interactions, Interactions]:
    """(train, test): per user the last 20% by time (at least one) is test."""
    test = _last_per_user(inter, TEST_FRACTION)
    return inter.subset(~test), inter.subset(test)


def validation_split(train: Interactions) -> tuple[Interactions, Interactions]:
    """(fit, val): the last 10% of each user's training interactions, for tuning without touching test."""
    val = _last_per_user(train, VALIDATION_FRACTION)
    return train.subset(~val), train.subset(val)


def cold_split(inter: Interactions, seed: int = 0) -> tuple[Interactions, Interactions, np.ndarray]:
    """(train, test, held_out): ``default_rng(seed)`` holds out round(20%) of the items (sorted indices)
    with all their interactions; ID-only models cannot score them."""
    n_held = round(COLD_FRACTION * inter.n_items)
    held_out = np.sort(np.random.default_rng(seed).choice(inter.n_items, n_held, replace=False))
    test = np.isin(inter.item, held_out)
    return inter.subset(~test), inter.subset(test), held_out


def _as_scorer(scores: Scores) -> Callable[[np.ndarray], np.ndarray]:
    return (lambda users: scores[users]) if isinstance(scores, np.ndarray) else scores


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Column indices of each row's k best scores, best first; ties go to the lower index, as in the
    reference figures (it matters for popularity, where many items tie)."""
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def user_figures(scores: Scores, truth: sp.csr_matrix, seen: sp.csr_matrix | None = None,
                 columns: np.ndarray | None = None, batch_size: int = 256) -> tuple[dict[str, np.ndarray], float]:
    """Recall and NDCG at each of KS for every user with test items (``truth`` rows, in user order), ranking
    ``columns`` (default all) with ``seen`` items removed, and coverage at the largest k. A -inf or NaN score
    means "not recommended": both sort last (numpy puts NaN at the end), and such a slot is never a hit nor
    covered."""
    score = _as_scorer(scores)
    if columns is not None:
        truth = truth[:, columns]
    users = np.flatnonzero(np.diff(truth.indptr))
    k_max = min(max(KS), truth.shape[1])
    discount = 1.0 / np.log2(np.arange(2, k_max + 2))
    ideal = np.cumsum(discount)
    figures: dict[str, list] = {f"{m}@{k}": [] for m in ("recall", "ndcg") for k in KS}
    covered = np.zeros(truth.shape[1], bool)
    for start in range(0, len(users), batch_size):
        batch = users[start:start + batch_size]
        s = np.array(score(batch), dtype=np.float32)
        if columns is not None:
            s = s[:, columns]
        if seen is not None:
            rows, cols = seen[batch].nonzero()
            s[rows, cols] = -np.inf
        top = _top_k(s, k_max)
        shown = np.take_along_axis(s, top, 1) > -np.inf
        relevant = truth[batch].toarray() > 0
        hits = np.take_along_axis(relevant, top, 1) & shown
        n_test = relevant.sum(1)
        for k in KS:
            figures[f"recall@{k}"].append(hits[:, :k].sum(1) / n_test)
            figures[f"ndcg@{k}"].append((hits[:, :k] @ discount[:k]) / ideal[np.minimum(n_test, min(k, k_max)) - 1])
        covered[top[:, :max(KS)][shown[:, :max(KS)]]] = True
    return {key: np.concatenate(v) if v else np.zeros(0) for key, v in figures.items()}, float(covered.mean())


def _evaluate(scores: Scores, truth: sp.csr_matrix, seen: sp.csr_matrix | None, columns: np.ndarray | None,
              batch_size: int) -> dict[str, float]:
    """The means over users of ``user_figures``, and coverage@max(KS)."""
    figures, coverage = user_figures(scores, truth, seen, columns, batch_size)
    result = {key: float(v.sum()) / max(len(v), 1) for key, v in figures.items()}
    result[f"coverage@{max(KS)}"] = coverage
    return result


def evaluate(scores: Scores, train: Interactions, test: Interactions, batch_size: int = 256) -> dict[str, float]:
    """Warm metrics: recall@10/20, ndcg@10/20 and coverage@20.

    ``scores`` is a (n_users, n_items) matrix or a ``score(user_indices)`` callable, called per batch.
    """
    return _evaluate(scores, test.matrix(), train.matrix(), None, batch_size)


def evaluate_cold(scores: Scores, test: Interactions, held_out: np.ndarray,
                  batch_size: int = 256) -> dict[str, float]:
    """Cold metrics (recall@20, ndcg@20): each user ranks only the held-out items."""
    result = _evaluate(scores, test.matrix(), None, held_out, batch_size)
    return {key: result[key] for key in ("recall@20", "ndcg@20")}


def score_lists(recommended: Mapping[str, Sequence[str]], held: Mapping[str, Iterable[str]], n_items: int,
                ks: Sequence[int] = KS) -> dict[str, float]:
    """The protocol's recall and NDCG at ``ks`` of ranked lists (best first, as a night wrote them) against
    held-out items, over the users with held-out items (a user without a list scores 0), and coverage at
    the largest k: the distinct items those users were shown, over ``n_items``. Same definitions as
    :func:`evaluate`: recall divides the hits by all of a user's held-out items, NDCG by the ideal DCG of
    min(held-out, k) hits."""
    k_max = max(ks)
    discount = 1.0 / np.log2(np.arange(2, k_max + 2))
    ideal = np.cumsum(discount)
    users = sorted(u for u, items in held.items() if items)
    sums = dict.fromkeys([f"{m}@{k}" for m in ("recall", "ndcg") for k in ks], 0.0)
    shown: set = set()
    for user in users:
        truth = set(held[user])
        ranked = list(recommended.get(user, ()))[:k_max]
        shown.update(ranked)
        hits = np.zeros(k_max, bool)
        hits[:len(ranked)] = [item in truth for item in ranked]
        for k in ks:
            sums[f"recall@{k}"] += hits[:k].sum() / len(truth)
            sums[f"ndcg@{k}"] += (hits[:k] @ discount[:k]) / ideal[min(len(truth), k) - 1]
    result = {key: float(value) / max(len(users), 1) for key, value in sums.items()}
    result[f"coverage@{k_max}"] = len(shown) / n_items if n_items else 0.0
    result["users"] = len(users)
    return result


def cross_modal_recall(queries: np.ndarray, targets: np.ndarray, k: int = 10) -> dict[str, float]:
    """Recall@k of retrieving each item's own ``targets`` row (e.g. its poster) from its ``queries`` row (its
    text) among all the rows, by cosine; rows are items that have both. Chance is k / n: an aligned space
    puts an item's modalities near each other, unaligned spaces are not even comparable."""
    q = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
    t = targets / np.maximum(np.linalg.norm(targets, axis=1, keepdims=True), 1e-12)
    scores = q @ t.T
    rank = (scores > np.diag(scores)[:, None]).sum(1)  # how many other items beat its own
    return {f"recall@{k}": float((rank < k).mean()), "chance": min(k, len(q)) / max(len(q), 1), "items": len(q)}


class MostPopular:
    """Items by number of training interactions: the floor a personalised model must clear."""

    def fit(self, train: Interactions) -> MostPopular:
        self.counts = np.bincount(train.item, minlength=train.n_items).astype(np.float32)
        return self

    def score(self, users: np.ndarray) -> np.ndarray:
        return np.tile(self.counts, (len(users), 1))


class Random:
    """Seeded random scores, the sanity floor. Each user's scores depend only on (seed, user), so
    results do not depend on the batch size."""

    def __init__(self, seed: int = 0):
        self.seed = seed

    def fit(self, train: Interactions) -> Random:
        self.n_items = train.n_items
        return self

    def score(self, users: np.ndarray) -> np.ndarray:
        return np.stack([np.random.default_rng([self.seed, int(u)]).random(self.n_items, np.float32)
                         for u in users])


class ItemKNN:
    """Item-based kNN on interactions: cosine between item columns of the binary matrix, each item's
    ``k`` nearest neighbours kept; a user's score for i sums the similarities of her items to i."""

    def __init__(self, k: int = 100, block: int = 1024):
        self.k, self.block = k, block

    def fit(self, train: Interactions) -> ItemKNN:
        self.seen = train.matrix()
        norms = np.sqrt(np.asarray(self.seen.sum(0)).ravel())
        normed = (self.seen @ sp.diags(1.0 / np.maximum(norms, 1.0))).tocsc()
        normed_t = normed.T.tocsr()
        n, k = train.n_items, min(self.k, train.n_items - 1)
        rows, cols, vals = [], [], []
        for start in range(0, n, self.block):  # a block of rows at a time: never the whole n x n matrix
            sim = (normed_t[start:start + self.block] @ normed).toarray()
            sim[np.arange(len(sim)), start + np.arange(len(sim))] = 0.0
            top = np.argpartition(-sim, k - 1, axis=1)[:, :k]
            rows.append(np.repeat(start + np.arange(len(sim)), k))
            cols.append(top.ravel())
            vals.append(np.take_along_axis(sim, top, 1).ravel())
        self.similarity = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                                        shape=(n, n))
        return self

    def score(self, users: np.ndarray) -> np.ndarray:
        return (self.seen[users] @ self.similarity).toarray().astype(np.float32)


class ALS:
    """ID-only matrix factorisation: ``implicit``'s ALS (Hu, Koren, Volinsky) on the binary matrix, where a
    positive's confidence is ``alpha`` (implicit 0.7's convention). Seeded, so a configuration is one number."""

    def __init__(self, factors: int = 32, regularization: float = 0.01, alpha: float = 1.0,
                 iterations: int = 15, seed: int = 0):
        self.params = dict(factors=factors, regularization=regularization, alpha=alpha, iterations=iterations)
        self.seed = seed

    def fit(self, train: Interactions) -> ALS:
        from implicit.cpu.als import AlternatingLeastSquares
        from threadpoolctl import threadpool_limits
        with threadpool_limits(1, "blas"):  # implicit parallelises over users itself
            model = AlternatingLeastSquares(**self.params, random_state=self.seed)
            model.fit(train.matrix(), show_progress=False)
        self.user_factors, self.item_factors = model.user_factors, model.item_factors
        return self

    def score(self, users: np.ndarray) -> np.ndarray:
        return self.user_factors[users] @ self.item_factors.T


def tune(fit: Interactions, val: Interactions, grid: dict[str, list] = ALS_GRID, metric: str = "ndcg@20",
         seed: int = 0) -> tuple[dict, list[tuple[dict, dict[str, float]]]]:
    """Pick ALS hyper-parameters by ``metric`` on the validation split (fit on ``fit``, scored on ``val``):
    returns the best parameters and every (parameters, metrics) tried. Refit on the full train after."""
    trials = []
    for values in itertools.product(*grid.values()):
        params = dict(zip(grid, values))
        trials.append((params, evaluate(ALS(**params, seed=seed).fit(fit).score, fit, val)))
    return max(trials, key=lambda trial: trial[1][metric])[0], trials


class ContentKNN:
    """Content-based scores: user vector = mean of the user's training item vectors, cosine to every item.

    ``vectors`` is (n_items, d) aligned with the item vocabulary (see :meth:`Interactions.align`); rows that
    are NaN, or False in ``mask``, are items without content: left out of user vectors, never recommended.
    Works for unseen items, which is what the cold split measures.
    """

    def __init__(self, vectors: np.ndarray, mask: np.ndarray | None = None):
        vectors = np.asarray(vectors, dtype=np.float32)
        present = ~np.isnan(vectors).any(1) if mask is None else np.asarray(mask, bool)
        self.vectors = np.where(present[:, None], vectors, 0.0).astype(np.float32)
        self.present = present
        norms = np.linalg.norm(self.vectors, axis=1, keepdims=True)
        self.unit = self.vectors / np.maximum(norms, 1e-12)

    def fit(self, train: Interactions) -> ContentKNN:
        seen = train.subset(self.present[train.item]).matrix()
        counts = np.maximum(np.asarray(seen.sum(1)).ravel(), 1.0)
        self.user_vectors = np.asarray(seen @ self.vectors) / counts[:, None]
        return self

    def score(self, users: np.ndarray) -> np.ndarray:
        s = self.user_vectors[users] @ self.unit.T
        s[:, ~self.present] = -np.inf
        return s.astype(np.float32)


class ContentPrior(ContentKNN):
    """Non-personalised content prior: one user vector for everyone, the mean item vector over all training
    interactions, so items rank by how much their content looks like what is popular. The gap between it and
    :class:`ContentKNN` on the same vectors is what personalisation adds."""

    def fit(self, train: Interactions) -> ContentPrior:
        items = train.item[self.present[train.item]]
        mean = self.vectors[items].mean(0) if len(items) else np.zeros(self.vectors.shape[1], np.float32)
        self.user_vectors = np.broadcast_to(mean, (train.n_users, len(mean)))
        return self


class PopularityRegressor:
    """Non-personalised content baseline: ridge regression from an item's content vector to the log of its
    training interactions, fitted on the items in ``known`` (the cold split hides its held-out items there, so
    they are not taught to be unpopular); every user gets the predicted popularity. The ridge penalty is
    ``penalty`` times the mean diagonal of the centred XᵀX (0: least squares, the smallest solution where
    several fit); ``tune_penalty`` picks it on the validation split."""

    def __init__(self, vectors: np.ndarray, known: np.ndarray, penalty: float = 1.0):
        vectors = np.asarray(vectors, dtype=np.float32)
        self.present = ~np.isnan(vectors).any(1)
        self.vectors = np.where(self.present[:, None], vectors, 0.0)
        self.known, self.penalty = np.asarray(known, bool) & self.present, penalty

    def fit(self, train: Interactions) -> PopularityRegressor:
        x = self.vectors[self.known].astype(np.float64)
        y = np.log1p(np.bincount(train.item, minlength=train.n_items)[self.known])
        mean_x, mean_y = x.mean(0), y.mean()
        x = x - mean_x
        # Ridge through the thin SVD: (items x min(items, dims)) work where the stacked least-squares system
        # is (items + dims) x dims; singular values below lstsq's cut-off are dropped (the smallest solution).
        u, sv, vt = np.linalg.svd(x, full_matrices=False)
        keep = sv > sv.max(initial=0.0) * max(x.shape) * np.finfo(x.dtype).eps
        shrink = np.where(keep, sv / np.maximum(sv ** 2 + self.penalty * (x ** 2).sum() / x.shape[1], 1e-300), 0.0)
        w = vt.T @ (shrink * (u.T @ (y - mean_y)))
        self.scores = np.where(self.present, (self.vectors - mean_x) @ w + mean_y, -np.inf).astype(np.float32)
        return self

    def score(self, users: np.ndarray) -> np.ndarray:
        return np.tile(self.scores, (len(users), 1))

    @classmethod
    def tune_penalty(cls, vectors: np.ndarray, known: np.ndarray, fit: Interactions, val: Interactions,
                     penalties: Sequence[float] = (0.01, 0.1, 1.0, 10.0), metric: str = "ndcg@20") -> float:
        return max(penalties, key=lambda p: evaluate(cls(vectors, known, p).fit(fit).score, fit, val)[metric])
