"""RuntimeTokenizer (tokenizers only) against transformers' AutoTokenizer on the same files."""

from __future__ import annotations

import numpy as np
import pytest
from tiny import sample_texts

from edgeprune.core.errors import EdgePruneError
from edgeprune.runtime.tokenizer import RuntimeTokenizer

TEXTS = sample_texts(5, seed=1) + ["The Dog, quickly; runs!", "unknownword the cat"]


def _check(directory, texts, max_length):
    from transformers import AutoTokenizer

    from edgeprune.core.loading import prepare_tokenizer

    ours = RuntimeTokenizer(directory)
    theirs = AutoTokenizer.from_pretrained(directory)
    prepare_tokenizer(theirs)
    batch = ours(texts, max_length=max_length)
    ref = theirs(texts, padding=True, truncation=True, max_length=max_length, return_tensors="np")
    np.testing.assert_array_equal(batch.input_ids, ref["input_ids"])
    np.testing.assert_array_equal(batch.attention_mask, ref["attention_mask"])
    if "token_type_ids" in ref:
        np.testing.assert_array_equal(batch.token_type_ids, ref["token_type_ids"])
    for text in texts:
        assert ours.encode(text) == theirs(text)["input_ids"]
        assert ours.encode(text, add_special_tokens=False) == theirs(text, add_special_tokens=False)["input_ids"]
        ids = theirs(text)["input_ids"]
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
    assert ours.pad_id == theirs.pad_token_id
    return ours


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_tiny_tokenizer_parity(tiny_models, family):
    _check(tiny_models(family), TEXTS, max_length=6)


def test_minilm_tokenizer_parity():
    from edgeprune.core.loading import minilm_path

    texts = ["A man is playing a guitar.", "Héllo, WORLD!! Tokenizers don't lowercase?", "x " * 300]
    ours = _check(minilm_path(), texts, max_length=128)
    assert ours.special_tokens["cls_token"] == "[CLS]"


def test_pad_to_multiple_and_errors(tiny_models, tmp_path):
    ours = RuntimeTokenizer(tiny_models("bert"))
    batch = ours(["the dog", "the dog runs in the park"], max_length=64, pad_to_multiple_of=16)
    assert batch.input_ids.shape == (2, 16) and batch.attention_mask[0].sum() == 4
    with pytest.raises(EdgePruneError, match="no tokenizer.json"):
        RuntimeTokenizer(tmp_path)
    with pytest.raises(EdgePruneError, match="no texts"):
        ours([])
