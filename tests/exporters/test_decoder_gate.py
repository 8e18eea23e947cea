"""The decoder quality gate on synthetic logits callables: the numbers it reports are the ones defined."""

import json

import numpy as np
import pytest

from edgeprune.core.errors import EdgePruneError
from edgeprune.eval.metrics import sliding_window_perplexity
from edgeprune.exporters.decoder_gate import decoder_quality_gate, greedy_path

VOCAB = 17


def bigram(table):
    """A 'model' whose next-token logits depend only on the current token."""
    return lambda ids: table[ids].astype(np.float32)


@pytest.fixture
def setup():
    rng = np.random.default_rng(0)
    table = rng.normal(size=(VOCAB, VOCAB)) * 3
    probs = np.exp(table) / np.exp(table).sum(-1, keepdims=True)
    ids = [0]
    for _ in range(299):  # text the reference models well, so a worse candidate has a higher perplexity
        ids.append(int(rng.choice(VOCAB, p=probs[ids[-1]])))
    return table, np.array(ids)


def test_identical_models_pass_with_exact_numbers(setup):
    table, ids = setup
    report = decoder_quality_gate(bigram(table), bigram(table), ids, window=64, greedy_prompt_len=8,
                                  greedy_tokens=12, max_ppl_ratio=1.03, min_greedy_agreement=0.9)
    expected, scored = sliding_window_perplexity(ids, bigram(table), 64, 32)
    assert report["perplexity"]["reference"] == pytest.approx(expected)
    assert report["perplexity"]["ratio"] == pytest.approx(1.0) and report["perplexity"]["tokens"] == scored
    assert report["greedy"]["agreement"] == 1.0 and report["greedy"]["exact_prefix"] == 12
    assert report["greedy"]["reference_tokens"] == greedy_path(bigram(table), ids[:8], 12)
    assert report["window_top1_agreement"] == 1.0 and report["passed"]
    json.dumps(report, allow_nan=False)  # JSON-able as the manifest needs


def test_one_wrong_row_counts_teacher_forced_positions(setup):
    table, ids = setup
    path = greedy_path(bigram(table), ids[:8], 12)
    inputs = [int(ids[7])] + path[:-1]  # the token each greedy position is predicted from
    wrong = inputs[3]  # make the candidate choose differently after this token
    cand = table.copy()
    first, second = np.argsort(table[wrong])[::-1][:2]
    cand[wrong, [first, second]] = table[wrong, [second, first]]  # swap its two best next tokens
    report = decoder_quality_gate(bigram(table), bigram(cand), ids, window=64, greedy_prompt_len=8,
                                  greedy_tokens=12, max_ppl_ratio=10.0, min_greedy_agreement=0.99)
    agrees = [t != wrong for t in inputs]
    assert report["greedy"]["agreement"] == pytest.approx(sum(agrees) / 12)
    assert report["greedy"]["exact_prefix"] == agrees.index(False) <= 3
    assert report["greedy"]["candidate_top1"][3] != path[3]
    assert report["perplexity"]["ratio"] > 1.0 and report["perplexity"]["passed"]
    assert not report["greedy"]["passed"] and not report["passed"]


def test_uniform_candidate_fails_on_perplexity(setup):
    table, ids = setup
    flat = lambda x: np.zeros((*x.shape, VOCAB), np.float32)
    report = decoder_quality_gate(bigram(table), flat, ids, window=64, greedy_prompt_len=8, greedy_tokens=4,
                                  max_ppl_ratio=1.5, min_greedy_agreement=0.0)
    assert report["perplexity"]["candidate"] == pytest.approx(VOCAB)
    assert not report["perplexity"]["passed"] and not report["passed"]


def test_non_finite_candidate_fails_and_stays_json(setup):
    table, ids = setup
    nan = lambda x: np.full((*x.shape, VOCAB), np.nan, np.float32)
    report = decoder_quality_gate(bigram(table), nan, ids, window=64, greedy_prompt_len=8, greedy_tokens=4,
                                  max_ppl_ratio=1.5, min_greedy_agreement=0.0)
    assert report["perplexity"]["ratio"] is None and not report["passed"]
    json.dumps(report, allow_nan=False)


def test_bad_inputs_are_one_clear_error(setup):
    table, _ = setup
    with pytest.raises(EdgePruneError, match="need at least 32"):
        decoder_quality_gate(bigram(table), bigram(table), np.arange(10) % VOCAB, max_ppl_ratio=1.1,
                             min_greedy_agreement=0.5)
    with pytest.raises(EdgePruneError, match=r"expected \[1, T, V\]"):
        decoder_quality_gate(bigram(table), lambda x: np.zeros((x.shape[1], VOCAB)), np.arange(100) % VOCAB,
                             max_ppl_ratio=1.1, min_greedy_agreement=0.5)


def test_a_reference_run_computed_first_gives_the_same_report():
    from edgeprune.exporters.decoder_gate import reference_run

    rng = np.random.default_rng(3)
    table, cand = rng.normal(size=(VOCAB, VOCAB)), rng.normal(size=(VOCAB, VOCAB))
    ids = rng.integers(0, VOCAB, size=200)
    settings = dict(window=64, greedy_prompt_len=8, greedy_tokens=6)
    direct = decoder_quality_gate(bigram(table), bigram(cand), ids, max_ppl_ratio=2.0, min_greedy_agreement=0.5,
                                  **settings)
    run = reference_run(bigram(table), ids, **settings)
    assert decoder_quality_gate(run, bigram(cand), ids, max_ppl_ratio=2.0, min_greedy_agreement=0.5,
                                **settings) == direct
    with pytest.raises(EdgePruneError, match="other tokens or settings"):
        decoder_quality_gate(run, bigram(cand), ids[:150], max_ppl_ratio=2.0, min_greedy_agreement=0.5, **settings)
