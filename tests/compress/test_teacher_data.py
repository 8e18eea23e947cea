"""Teacher-generated distillation data (sampled from the dense model, cached, seeded), LoRA and the decoder
hidden-state term of recovery fine-tuning, on a tiny random Llama."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from edgeprune.compress.api import CompressConfig, FinetuneConfig, check_options
from edgeprune.compress.finetune import finetune
from edgeprune.compress.teacher_data import start_token, teacher_blocks
from edgeprune.core.errors import EdgePruneError
from edgeprune.core.loading import load_model


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEPRUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def llama(tiny_models):
    return load_model(tiny_models("llama"))


def test_teacher_tokens_are_seeded_cached_and_plain_text(llama, cache):
    blocks, record = teacher_blocks(llama.model, llama.tokenizer, llama.source, 100, 16, seed=3, progress=False)
    assert record["sequences"] == 7 and record["tokens"] == 112 and not record["cached"]
    assert len(blocks) == 7 and all(len(b) == 16 for b in blocks)
    start = start_token(llama.tokenizer)
    assert all(b[0] == start for b in blocks)
    special = set(llama.tokenizer.all_special_ids)
    assert not any(t in special for b in blocks for t in b[1:])  # sampled text has no special tokens
    again, record2 = teacher_blocks(llama.model, llama.tokenizer, llama.source, 100, 16, seed=3, progress=False)
    assert record2["cached"] and again == blocks and record2["cache"] == record["cache"]
    other, _ = teacher_blocks(llama.model, llama.tokenizer, llama.source, 100, 16, seed=4, progress=False)
    assert other != blocks
    # the generator itself is deterministic (not only the cache)
    from pathlib import Path

    Path(record["cache"]).unlink()
    fresh, record3 = teacher_blocks(llama.model, llama.tokenizer, llama.source, 100, 16, seed=3, progress=False)
    assert fresh == blocks and not record3["cached"]


def test_teacher_data_refuses_bad_sizes(llama, cache):
    with pytest.raises(EdgePruneError, match="less than one sequence"):
        teacher_blocks(llama.model, llama.tokenizer, llama.source, 8, 16)
    with pytest.raises(EdgePruneError, match="needs --teacher-tokens"):
        FinetuneConfig(data="teacher", distill=True)
    with pytest.raises(EdgePruneError, match="add --distill"):
        check_options(CompressConfig(finetune=FinetuneConfig(data="teacher", teacher_tokens=64)))
    with pytest.raises(EdgePruneError, match=">= 0"):
        FinetuneConfig(data="x", lora_rank=-1)


def _student(llama):
    student = copy.copy(llama)
    student.model = copy.deepcopy(llama.model)
    return student


def test_distillation_on_teacher_data_records_its_size(llama, cache):
    student = _student(llama)
    cfg = FinetuneConfig(data="teacher", distill=True, teacher_tokens=128, max_length=16, batch_size=2,
                         max_steps=3, learning_rate=1e-3, temperature=1.0, hidden_weight=0.5)
    before = [p.detach().clone() for p in student.model.parameters()]
    summary, log = finetune(student, cfg, teacher=llama.model, progress=False)
    assert summary["steps"] == 3 and summary["tokens_seen"] == 3 * 2 * 16
    assert summary["teacher_data"]["tokens"] == 128 and summary["teacher_data"]["corpus_blocks"] == 0
    assert "final_hidden_mse" in summary["objective"] and summary["training"] == "full"
    assert any(not torch.equal(a, b) for a, b in zip(before, student.model.parameters()))


def test_lora_trains_low_rank_updates_and_merges_them(llama, cache, tmp_path):
    student = _student(llama)
    text = tmp_path / "t.txt"
    text.write_text(" ".join(["the dog runs in the park"] * 200))
    cfg = FinetuneConfig(data=str(text), distill=True, max_length=16, batch_size=2, max_steps=4,
                         learning_rate=1e-2, lora_rank=2, temperature=1.0)
    before = {n: p.detach().clone() for n, p in student.model.named_parameters()}
    summary, _ = finetune(student, cfg, teacher=llama.model, progress=False)
    after = dict(student.model.named_parameters())
    assert summary["training"] == "lora(r=2)"
    assert set(before) == set(after) and all(before[n].shape == after[n].shape for n in before)  # plain shapes
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert changed and all(".layers." in n and n.endswith(".weight") for n in changed)  # block matrices only
    assert not any(m._forward_hooks for m in student.model.modules())  # merged: no adapters left
    delta = (after[changed[0]] - before[changed[0]]).detach().numpy()
    assert np.linalg.matrix_rank(delta, tol=1e-6) <= 2
