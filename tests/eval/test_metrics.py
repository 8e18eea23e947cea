import numpy as np
import pytest
import scipy.stats
import torch

from edgeprune.core.onnxio import mean_pool_normalize
from edgeprune.eval.metrics import (agreement, rankdata, sliding_window_perplexity, spearman,
                                    token_nll)


def test_spearman_matches_scipy_with_ties():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, 200).astype(float)
    b = a + rng.normal(0, 2, 200)
    assert spearman(a, b) == pytest.approx(scipy.stats.spearmanr(a, b).statistic, abs=1e-12)
    assert np.array_equal(rankdata(a), scipy.stats.rankdata(a))


def test_mean_pool_ignores_padding():
    hidden = np.array([[[1.0, 0.0], [3.0, 0.0], [100.0, 100.0]]], dtype=np.float32)
    pooled = mean_pool_normalize(hidden, np.array([[1, 1, 0]]))
    assert np.allclose(pooled, [[1.0, 0.0]])


def test_token_nll_matches_torch():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(7, 11)).astype(np.float32)
    targets = rng.integers(0, 11, 7)
    expected = torch.nn.functional.cross_entropy(torch.tensor(logits, dtype=torch.float64), torch.tensor(targets),
                                                 reduction="none").numpy()
    assert np.allclose(token_nll(logits, targets), expected)


def test_sliding_window_scores_every_token_once():
    # A "model" whose logits depend only on the current token: windowing cannot change the answer,
    # so the result must equal the exact full-sequence perplexity.
    rng = np.random.default_rng(2)
    table = rng.normal(size=(13, 13))
    ids = rng.integers(0, 13, 1000)
    ppl, n = sliding_window_perplexity(ids, lambda chunk: table[chunk], window=64, stride=24)
    exact = float(np.exp(token_nll(table[ids[:-1]], ids[1:]).mean()))
    assert n == len(ids) - 1
    assert ppl == pytest.approx(exact, rel=1e-9)


def test_agreement_identical_outputs():
    x = np.random.default_rng(3).normal(size=(4, 5, 6))
    result = agreement(x, x)
    assert result["top1_agreement"] == 1.0 and result["cosine_min"] == pytest.approx(1.0)


def test_perplexity_eval_on_tiny_decoder(tiny_models, tmp_path):
    from edgeprune.eval.api import EvalConfig, evaluate
    from tiny import sample_texts

    corpus = tmp_path / "text.txt"
    corpus.write_text("\n".join(sample_texts(60)))
    result = evaluate(str(tiny_models("llama")), corpus, EvalConfig(task="perplexity", window=32, stride=16),
                      progress=False)
    assert result["metric"] == "perplexity" and result["n"] > 100
    assert 1.0 < result["value"] < 1000  # random 128-token model: about vocab size


def test_sts_batches_do_not_depend_on_string_hashing():
    """Issue 13, item 24: sentences were batched in set order, so padding (and an INT8 model's score) changed
    from run to run. The batches must be identical under any PYTHONHASHSEED."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = ("import json\nimport numpy as np\nfrom edgeprune.core.datasets import STSPair\n"
              "from edgeprune.eval.metrics import sts_spearman\n"
              "words = ['a dog runs', 'a cat sat', 'the sky', 'red car', 'one tree', 'big ball', 'two cats', 'old man']\n"
              "pairs = [STSPair(a, b, float(i)) for i, (a, b) in enumerate(zip(words, reversed(words)))]\n"
              "seen = []\n"
              "def embed(batch):\n    seen.append(list(batch))\n    return np.eye(len(batch), 4)[: len(batch)]\n"
              "sts_spearman(embed, pairs, batch_size=3)\nprint(json.dumps(seen))")
    root = str(Path(__file__).resolve().parents[2])
    runs = {subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                           env=dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=root)).stdout
            for seed in ("1", "2", "3", "4")}
    assert len(runs) == 1


def test_token_nll_in_row_chunks_equals_the_whole_computation():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(3, 70, 50)).astype(np.float32)  # 210 rows: several chunks, the last one short
    targets = rng.integers(0, 50, size=(3, 70))
    wide = logits.astype(np.float64)
    peak = wide.max(axis=-1, keepdims=True)
    whole = peak[..., 0] + np.log(np.exp(wide - peak).sum(axis=-1)) - np.take_along_axis(wide, targets[..., None], -1)[..., 0]
    got = token_nll(logits, targets)
    assert got.shape == targets.shape
    np.testing.assert_array_equal(got, whole)
