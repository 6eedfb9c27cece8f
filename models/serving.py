"""A night as a TensorFlow SavedModel: the rankings the night wrote, answered in one graph.

``Night`` holds the night's item matrix (fused vectors and their modality parts, rows sorted by item id),
its user vectors with what each user has seen, and the fallback's popular list. Its signatures:

- ``recommend(user_id (B,) string, k () int32)``: each user's top ``k`` unseen items by ``<user, item>``
  (ties: item id), with each score's per-modality contributions; a user without a vector, or one the night
  never saw, gets the popular items they have not seen, with one contribution, ``popularity``;
- ``recommend_history(item_id, timestamp (epoch seconds, float64), weight (float32, NaN: none), event
  (B, L) each, k)``, given the night's weighting: the same for a posted history ('' item ids pad it), its
  user vector made as the night made its users' (``transforms.users``), and a history without a usable
  item gets the popular list;
- ``similar(item_id (B,) string, k () int32)``: each item's top ``k`` other items;
- ``embed_item(text (B,) string, image (B,) string, <modality> (B, d) float32 ..., k () int32)``, when the
  night's alignment is contrastive: new items' raw content (any subset: '' or a NaN row where absent)
  through the night's encoders, alignment and fusion, giving their fused ``vector`` (B, D), fusion
  ``weights`` (B, M) and their ``k`` most similar catalogue items. Text is tokenised in the graph
  (TensorFlow Text's WordPiece, normalised as MiniLM's tokenizer does) and images are decoded, resized
  and cropped in it, so any TensorFlow server runs it; other modalities (audio encodings, declared vector
  columns) come as vectors.

Outputs, per query: ``item_id`` (B, k) ('' past the end), ``score`` (B, k) (-inf there), ``contributions``
(B, k, M) in the order ``metadata`` names (NaN where the item lacks the modality), ``fallback`` (B,) bool.
The scores are exact products over the whole matrix, so the answers are the night's own rankings.

Memory: the item matrix (items x dim x (1 + modalities)) and the user vectors (users x dim), kept as float32,
bfloat16 or int8 (``dtype``), and, with ``embed_item``, the encoders' weights are variables; a request holds
(B x items) float32 scores and a float32 copy of the item matrix, and, with a last-N cut, a posted history
of L items compares every pair of them (B x L x L). Nothing here reads or writes files but ``save``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import tensorflow as tf
import tensorflow_text as tf_text

POPULARITY = "popularity"
META = "mmfuse.json"  # under the SavedModel's assets/: what ``metadata`` reads


class Arrays(NamedTuple):
    """What a night's datasets hold, as arrays: items sorted by id; users in any order."""
    item_ids: np.ndarray       # (n,) str, sorted
    vectors: np.ndarray        # (n, D) float32, fused
    modalities: tuple          # (M,) names of the parts
    parts: np.ndarray          # (M, n, D) float32, zero where absent
    has: np.ndarray            # (n, M) bool
    user_ids: np.ndarray       # (u,) str
    user_vectors: np.ndarray   # (u, D) float32, zero for fallback users
    personal: np.ndarray       # (u,) bool: has a vector
    seen_splits: np.ndarray    # (u + 1,) int64: user r's seen item rows are seen_rows[splits[r]:splits[r + 1]]
    seen_rows: np.ndarray      # (s,) int64 item rows (items without a vector are left out: never ranked)
    popular_rows: np.ndarray   # (p,) int64 item rows, most popular first
    popular_shares: np.ndarray  # (p,) float32


class Content(NamedTuple):
    """What ``embed_item`` runs: the night's alignment model and the encoders of its raw modalities."""
    aligner: Any                # models.align.AlignmentModel
    text: Any | None            # models.text.MiniLM, when the alignment has a text modality
    vocab: list | None          # its WordPiece vocabulary, by id
    max_tokens: int             # texts are cut to this many tokens, [CLS] and [SEP] included
    image: Any | None           # MobileNetV2's embedding model, when the alignment has an image modality


class Night(tf.Module):
    """The night's arrays as variables and lookup tables, with the signatures above (``recommend_history``
    given the night's ``weighting``, a ``transforms.users.Weighting``; ``embed_item`` given ``content``)."""

    def __init__(self, a: Arrays, content: Content | None = None, weighting: Any = None, dtype: str = "float32"):
        super().__init__()
        n, m = len(a.item_ids), len(a.modalities)
        self.modalities, self.dtype = (*a.modalities, POPULARITY), dtype
        self._item_ids = tf.Variable(a.item_ids.astype(object), trainable=False, dtype=tf.string)
        self._vectors = _Stored(a.vectors, dtype)
        self._parts = _Stored(a.parts, dtype)
        self._has = tf.Variable(a.has, trainable=False)
        self._user_vectors = _Stored(a.user_vectors, dtype)
        self._personal = tf.Variable(a.personal, trainable=False)
        self._seen_splits = tf.Variable(a.seen_splits, trainable=False)
        self._seen_rows = tf.Variable(a.seen_rows, trainable=False)
        self._popular_rows = tf.Variable(a.popular_rows, trainable=False)
        self._popular_shares = tf.Variable(a.popular_shares, trainable=False)
        self._items = _table(a.item_ids)
        self._users = _table(a.user_ids)
        self._n, self._m = n, m
        if weighting is not None:
            self._weighting(weighting)
        if content is not None:
            self._content(content)

    def _weighting(self, w: Any) -> None:
        """Adds ``recommend_history``, which weighs a posted history as the night weighed its users'."""
        self._last_n, self._half_life_s, self._use_rating = int(w.last_n), float(w.half_life_s), bool(w.use_rating)
        self._default_event, self._event_weights = float(w.default_event), None
        if w.event_weights:  # a lookup table cannot be empty
            self._event_weights = tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(
                tf.constant(list(w.event_weights), tf.string),
                tf.constant(list(w.event_weights.values()), tf.float64)), self._default_event)
        self.recommend_history = tf.function(self._recommend_history, input_signature=[
            tf.TensorSpec([None, None], tf.string, name="item_id"),
            tf.TensorSpec([None, None], tf.float64, name="timestamp"),
            tf.TensorSpec([None, None], tf.float32, name="weight"),
            tf.TensorSpec([None, None], tf.string, name="event"), tf.TensorSpec([], tf.int32, name="k")])

    def _content(self, c: Content) -> None:
        """Adds ``embed_item``: its signature has one input per raw modality the alignment reads."""
        # The Keras models stay out of the module's object graph (saving would retrace their own functions);
        # their variables are tracked instead, as keras.export.ExportArchive does.
        self._models = _Untracked(c.aligner, c.text, c.image)
        self._model_variables = [v for m in (c.aligner, c.text, c.image) if m is not None for v in m.variables]
        self._max_tokens = c.max_tokens
        if c.vocab is not None:  # the table is an attribute so that it is saved with the tokenizer using it
            self._vocab = tf.lookup.StaticVocabularyTable(tf.lookup.KeyValueTensorInitializer(
                tf.constant(c.vocab), tf.range(len(c.vocab), dtype=tf.int64)), 1)
            self._wordpiece = tf_text.BertTokenizer(self._vocab, lower_case=False, token_out_type=tf.int32,
                                                   unknown_token="[UNK]")
        self.vector_modalities = [m for m in c.aligner.dims if m not in ("text", "image")]
        specs = [tf.TensorSpec([None], tf.string, name="text"), tf.TensorSpec([None], tf.string, name="image")]
        specs += [tf.TensorSpec([None, c.aligner.dims[m]], tf.float32, name=m) for m in self.vector_modalities]
        self.embed_item = tf.function(self._embed_item, input_signature=[*specs, tf.TensorSpec([], tf.int32, name="k")])

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string), tf.TensorSpec([], tf.int32)])
    def recommend(self, user_id: tf.Tensor, k: tf.Tensor) -> dict:
        rows = self._users.lookup(user_id)
        known = rows >= 0
        row = tf.maximum(rows, 0)
        personal = known & tf.gather(self._personal, row)
        starts = tf.gather(self._seen_splits, row)
        ends = tf.where(known, tf.gather(self._seen_splits, row + 1), starts)  # an unknown user has seen nothing
        seen = tf.gather(self._seen_rows, tf.ragged.range(starts, ends))
        return self._answer(self._user_vectors.read(row), personal, seen, k)

    def _recommend_history(self, item_id: tf.Tensor, timestamp: tf.Tensor, weight: tf.Tensor, event: tf.Tensor,
                           k: tf.Tensor) -> dict:
        """``transforms.users``' user vector of each posted history, ranked as ``recommend`` ranks a night's
        user: the night's event weights, rating (``weight``, NaN for none), recency half-life from the newest
        interaction and last-N cut (in (timestamp, item id) order). Ids the night has no vector for ('' pads
        a history) are left out, as the night dead-letters interactions on items it does not know."""
        rows = self._items.lookup(item_id)  # rows are in item id order
        counted = known = rows >= 0
        if self._last_n:
            t_i, t_j, r_i, r_j = timestamp[:, :, None], timestamp[:, None, :], rows[:, :, None], rows[:, None, :]
            later = ((t_j > t_i) | ((t_j == t_i) & (r_j > r_i))) & known[:, None, :]  # [b, i, j]: j after i
            counted = known & (tf.reduce_sum(tf.cast(later, tf.int32), axis=-1) < self._last_n)
        w = (tf.fill(tf.shape(event), tf.constant(self._default_event, tf.float64)) if self._event_weights is None
             else self._event_weights.lookup(event))
        if self._use_rating:
            w *= tf.where(tf.math.is_nan(weight), tf.ones_like(w), tf.cast(weight, tf.float64))
        if self._half_life_s:
            newest = tf.reduce_max(tf.where(counted, timestamp, -np.inf), axis=1, keepdims=True)
            w *= tf.pow(tf.constant(0.5, tf.float64), (newest - timestamp) / self._half_life_s)
        w = tf.where(counted, tf.cast(w, tf.float32), 0.0)
        total = tf.reduce_sum(tf.cast(w[..., None] * self._vectors.read(tf.maximum(rows, 0)), tf.float64), axis=1)
        norm = tf.norm(total, axis=1)
        personal = (norm > 1e-12) & tf.math.is_finite(norm)
        users = tf.cast(total / tf.where(personal, norm, 1.0)[:, None], tf.float32)
        return self._answer(users, personal, tf.ragged.boolean_mask(rows, known), k)

    def _answer(self, users: tf.Tensor, personal: tf.Tensor, seen: tf.RaggedTensor, k: tf.Tensor) -> dict:
        """Each user's ranking, or the popular list where ``personal`` is False; ``seen`` left out of both."""
        ranked = self._ranked(users, seen, k)
        popular = self._popular(seen, k)
        pick = personal[:, None]
        return {"item_id": tf.where(pick, ranked["item_id"], popular["item_id"]),
                "score": tf.where(pick, ranked["score"], popular["score"]),
                "contributions": tf.where(pick[..., None], ranked["contributions"], popular["contributions"]),
                "fallback": ~personal}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string), tf.TensorSpec([], tf.int32)])
    def similar(self, item_id: tf.Tensor, k: tf.Tensor) -> dict:
        rows = self._items.lookup(item_id)
        known = rows >= 0
        row = tf.maximum(rows, 0)
        itself = tf.RaggedTensor.from_row_lengths(tf.boolean_mask(rows, known), tf.cast(known, tf.int64))
        ranked = self._ranked(self._vectors.read(row), itself, k)
        missing = ~known[:, None]
        return {"item_id": tf.where(missing, "", ranked["item_id"]),
                "score": tf.where(missing, -np.inf, ranked["score"]),
                "contributions": tf.where(missing[..., None], np.nan, ranked["contributions"]),
                "fallback": tf.zeros_like(known)}

    def _embed_item(self, text: tf.Tensor, image: tf.Tensor, *rest: tf.Tensor) -> dict:
        *vectors, k = rest
        given = dict(zip(self.vector_modalities, vectors))
        inputs, present = {}, []
        aligner = self._models.aligner
        for m in aligner.dims:
            if m == "text":
                ok = tf.strings.length(tf.strings.strip(text)) > 0
                x = self._encode_text(text)
            elif m == "image":
                ok = tf.strings.length(image) > 0
                given_rows = tf.where(ok)  # the image model runs on the items that have an image, only
                pixels = tf.map_fn(_image_input, tf.gather_nd(image, given_rows),
                                   fn_output_signature=tf.TensorSpec([CROP, CROP, 3]))
                found = self._models.image(pixels)
                x = tf.scatter_nd(given_rows, found, tf.cast(tf.stack([tf.size(image), tf.shape(found)[1]]), tf.int64))
            else:
                x = given[m]
                ok = ~tf.reduce_any(tf.math.is_nan(x), axis=1)
            inputs[m], present = tf.where(ok[:, None], x, 0.0), [*present, ok]
        if aligner.collaborative:  # a new item has no interactions, so no cf vector
            inputs["cf"] = tf.zeros([tf.size(text), aligner.dim])
            present.append(tf.zeros_like(present[0]))
        inputs["mask"] = tf.cast(tf.stack(present, 1), tf.float32)
        out = aligner(inputs)
        some = tf.reduce_any(tf.stack(present, 1), axis=1)
        vector = tf.where(some[:, None], out["fused"], np.nan)
        nothing = tf.RaggedTensor.from_row_lengths(tf.zeros([0], tf.int64), tf.zeros([tf.size(text)], tf.int64))
        ranked = self._ranked(out["fused"], nothing, k)
        none = ~some[:, None]
        return {"vector": vector, "weights": out["weights"], "item_id": tf.where(none, "", ranked["item_id"]),
                "score": tf.where(none, -np.inf, ranked["score"]),
                "contributions": tf.where(none[..., None], np.nan, ranked["contributions"])}

    def _encode_text(self, text: tf.Tensor) -> tf.Tensor:
        """MiniLM's vectors of raw texts: normalised as its tokenizer's BertNormalizer does (lower case, accents
        stripped), WordPiece, cut to ``max_tokens`` with [CLS] and [SEP], packed as ``models.text.pack``."""
        x = tf.strings.regex_replace(tf_text.normalize_utf8(tf.strings.lower(text, encoding="utf-8"), "NFD"),
                                     r"\p{Mn}", "")
        tokens = self._wordpiece.tokenize(x).merge_dims(1, 2)[:, :self._max_tokens - 2]
        b = tf.size(text)
        ids = tf.concat([tf.fill([b, 1], CLS), tokens, tf.fill([b, 1], SEP)], axis=1)
        lengths = tf.cast(ids.row_lengths(), tf.int32)
        filled = tf.range(tf.reduce_max(lengths))[None, :] < lengths[:, None]
        grid = tf.where(filled, tf.reshape(tf.cumsum(tf.cast(tf.reshape(filled, [-1]), tf.int32)) - 1,
                                           tf.shape(filled)), -1)
        slots = tf.cast(tf.where(tf.reshape(filled, [-1]))[:, 0], tf.int32)
        return self._models.text((ids.flat_values, slots, grid))

    def _ranked(self, queries: tf.Tensor, excluded: tf.RaggedTensor, k: tf.Tensor) -> dict:
        """Top ``k`` items of each query by ``<query, item>``, ``excluded`` (ragged item rows) left out."""
        scores = self._vectors.products(queries)
        where = tf.stack([tf.cast(excluded.value_rowids(), tf.int64), tf.cast(excluded.flat_values, tf.int64)], 1)
        scores = tf.tensor_scatter_nd_update(scores, where, tf.fill(tf.shape(where)[:1], -np.inf))
        best, rows = tf.math.top_k(scores, tf.minimum(k, self._n))  # ties: the lower row, i.e. item id
        found = best > -np.inf
        parts = self._parts.read(rows, axis=1)                           # (M, B, k, D)
        contributions = tf.transpose(tf.reduce_sum(parts * queries[None, :, None, :], -1), (1, 2, 0))
        contributions = tf.where(tf.gather(self._has, rows) & found[..., None], contributions, np.nan)
        contributions = tf.pad(contributions, [[0, 0], [0, 0], [0, 1]], constant_values=np.nan)
        return _padded({"item_id": tf.where(found, tf.gather(self._item_ids, rows), ""),
                        "score": tf.where(found, best, -np.inf), "contributions": contributions}, k)

    def _popular(self, seen: tf.RaggedTensor, k: tf.Tensor) -> dict:
        """The popular list without what each user has seen, its first ``k``."""
        b = tf.shape(seen.row_splits)[0] - 1
        where = tf.stack([tf.cast(seen.value_rowids(), tf.int64), tf.cast(seen.flat_values, tf.int64)], 1)
        seen_dense = tf.scatter_nd(where, tf.ones(tf.shape(where)[:1], tf.bool), tf.cast([b, self._n], tf.int64))
        unseen = ~tf.gather(seen_dense, self._popular_rows, axis=1)      # (B, p)
        order = tf.argsort(tf.cast(~unseen, tf.int32), axis=1, stable=True)[:, :k]  # unseen first, in list order
        rows = tf.gather(self._popular_rows, order)
        found = tf.gather(unseen, order, batch_dims=1)
        shares = tf.gather(self._popular_shares, order)
        contributions = tf.concat([tf.fill(tf.concat([tf.shape(rows), [self._m]], 0), np.nan),
                                   tf.where(found, shares, np.nan)[..., None]], -1)
        return _padded({"item_id": tf.where(found, tf.gather(self._item_ids, rows), ""),
                        "score": tf.where(found, shares, -np.inf), "contributions": contributions}, k)

    def save(self, folder: str | Path) -> None:
        signatures = {"recommend": self.recommend, "similar": self.similar, "serving_default": self.recommend}
        for optional in ("recommend_history", "embed_item"):
            if hasattr(self, optional):
                signatures[optional] = getattr(self, optional)
        tf.saved_model.save(self, str(folder), signatures=signatures)
        (Path(folder) / "assets").mkdir(exist_ok=True)
        vectors = {m: self._models.aligner.dims[m] for m in getattr(self, "vector_modalities", [])}
        (Path(folder) / "assets" / META).write_text(json.dumps({
            "modalities": list(self.modalities), "dtype": self.dtype,
            "recommend_history": hasattr(self, "recommend_history"),
            "embed_item": {"vectors": vectors, "modalities": self._models.aligner.modalities}
            if hasattr(self, "embed_item") else None}))


class _Stored(tf.Module):
    """A float32 array kept as ``dtype``: float32, bfloat16 (rounded to nearest), or int8 with one scale per
    vector (its largest magnitude maps to 127); ``read`` gives float32 back, all of it or some ``rows``."""

    def __init__(self, x: np.ndarray, dtype: str):
        super().__init__()
        self.scale = None
        if dtype == "int8":
            peak = np.abs(x).max(axis=-1)
            scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
            self.values = tf.Variable(np.round(x / scale[..., None]).astype(np.int8), trainable=False)
            self.scale = tf.Variable(scale, trainable=False)
        else:
            self.values = tf.Variable(tf.cast(x, dtype), trainable=False)

    def products(self, queries: tf.Tensor) -> tf.Tensor:
        """``queries @ array.T`` (a 2-D array): int8's scales apply to the products, not to the whole array."""
        products = tf.matmul(queries, tf.cast(self.values, tf.float32), transpose_b=True)
        return products if self.scale is None else products * self.scale[None, :]

    def read(self, rows: tf.Tensor | None = None, axis: int = 0) -> tf.Tensor:
        def take(v: tf.Variable) -> tf.Tensor:
            return v if rows is None else tf.gather(v, rows, axis=axis)
        x = tf.cast(take(self.values), tf.float32)
        return x if self.scale is None else x * take(self.scale)[..., None]


class _Untracked:
    """A plain holder: what it holds is not part of a tf.Module's object graph."""

    def __init__(self, aligner: Any, text: Any, image: Any):
        self.aligner, self.text, self.image = aligner, text, image


CLS, SEP = 101, 102  # MiniLM's [CLS] and [SEP] ids
SIZE, CROP = 256, 224  # torchvision's Resize(256) and CenterCrop(224), as models.image.resize_crop
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _image_input(data: tf.Tensor) -> tf.Tensor:
    """``models.image.image_input`` in the graph: decoded (transparency onto white), the shorter side resized
    to 256 (bilinear, antialiased), the centre 224 x 224 cut and normalised. Unlike Pillow it does not turn a
    JPEG upright by its EXIF orientation tag."""
    def jpeg() -> tf.Tensor:  # Pillow's libjpeg decodes with the accurate integer DCT
        return tf.cast(tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE"), tf.float32)

    def other() -> tf.Tensor:
        pixels = tf.cast(tf.io.decode_image(data, expand_animations=False), tf.float32)
        channels = tf.shape(pixels)[-1]
        alpha = tf.cond(channels % 2 == 0, lambda: pixels[..., -1:] / 255.0, lambda: tf.ones_like(pixels[..., :1]))
        color = tf.cond(channels >= 3, lambda: pixels[..., :3], lambda: tf.tile(pixels[..., :1], [1, 1, 3]))
        return tf.round(color * alpha + 255.0 * (1.0 - alpha))

    rgb = tf.cond(tf.io.is_jpeg(data), jpeg, other)
    h, w = tf.shape(rgb)[0], tf.shape(rgb)[1]
    new_h = tf.where(w <= h, tf.cast(SIZE * h / w, tf.int32), SIZE)
    new_w = tf.where(w <= h, SIZE, tf.cast(SIZE * w / h, tf.int32))
    # Pillow resamples rows, rounds to 8 bits, then columns: so does this
    wide = tf.clip_by_value(tf.round(tf.image.resize(rgb, [h, new_w], antialias=True)), 0.0, 255.0)
    resized = tf.clip_by_value(tf.round(tf.image.resize(wide, [new_h, new_w], antialias=True)), 0.0, 255.0)
    top = tf.cast(tf.round((new_h - CROP) / 2), tf.int32)
    left = tf.cast(tf.round((new_w - CROP) / 2), tf.int32)
    crop = resized[top:top + CROP, left:left + CROP] / 255.0
    return tf.reshape((crop - MEAN) / STD, [CROP, CROP, 3])


def metadata(folder: str | Path) -> dict:
    """A saved night's ``modalities`` (the contributions' names) and ``embed_item`` (None, or the vector
    inputs it takes: modality -> dim)."""
    return json.loads((Path(folder) / "assets" / META).read_text())


def _table(keys: np.ndarray) -> tf.lookup.StaticHashTable:
    """id -> row, -1 for an unknown id."""
    return tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(
        tf.constant(keys.astype(object), tf.string), tf.range(len(keys), dtype=tf.int64)), -1)


def _padded(out: dict, k: tf.Tensor) -> dict:
    """Rankings shorter than ``k`` (fewer items than asked for) padded to ``k`` columns."""
    short = k - tf.shape(out["score"])[1]
    return {"item_id": tf.pad(out["item_id"], [[0, 0], [0, short]], constant_values=""),
            "score": tf.pad(out["score"], [[0, 0], [0, short]], constant_values=-np.inf),
            "contributions": tf.pad(out["contributions"], [[0, 0], [0, short], [0, 0]], constant_values=np.nan)}
