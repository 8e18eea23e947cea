"""Sparsity patterns, scopes and schedules on tiny models; movement scores; CLI and recipe round trip."""

import json

import pytest
import torch

from edgeprune.compress.api import CompressConfig, SparsityConfig, compress
from edgeprune.core.model_artifact import load_artifact
from edgeprune.compress.sparsity import (compute_masks, nm_mask, schedule, sparse_params, sparsify)
from edgeprune.core.errors import EdgePruneError
from edgeprune.core.loading import load_model


def weights(loaded):
    params, in_dims = sparse_params(loaded)
    return params, in_dims


@pytest.mark.parametrize("fam", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (3, 8)])
def test_nm_has_at_most_n_nonzeros_per_group(tiny_models, fam, nm):
    loaded = load_model(tiny_models(fam))
    n, m = nm
    sparsify(loaded, SparsityConfig(pattern=f"{n}:{m}"))
    params, in_dims = weights(loaded)
    for name, p in params.items():
        moved = p.detach().movedim(in_dims[name], -1)
        width = moved.shape[-1]
        full = moved[..., : width - width % m].reshape(*moved.shape[:-1], -1, m)
        assert int((full != 0).sum(-1).max()) <= n, name
        if width % m:  # partial trailing group
            assert int((moved[..., width - width % m:] != 0).sum(-1).max()) <= n


def test_nm_handles_partial_groups_and_keeps_largest():
    scores = torch.tensor([[1.0, 5.0, 3.0, 2.0, 9.0, 8.0, 7.0]])  # width 7: groups [4] + [3]
    keep = nm_mask(scores, 2, 4, in_dim=1)
    assert keep.tolist() == [[False, True, True, False, True, True, False]]


def test_gpt2_nm_groups_run_along_input_dim(tiny_models):
    loaded = load_model(tiny_models("gpt2"))
    _, in_dims = weights(loaded)
    assert set(in_dims.values()) == {0}  # Conv1D stores (in, out)


@pytest.mark.parametrize("scope", ["local", "global"])
def test_4x4_blocks_are_all_zero_or_kept(tiny_models, scope):
    loaded = load_model(tiny_models("bert"))
    params, _ = weights(loaded)
    original = {n: p.detach().clone() for n, p in params.items()}
    masks, stats = sparsify(loaded, SparsityConfig(fraction=0.5, pattern="4x4", scope=scope))
    for name, p in params.items():
        w = p.detach()
        r, c = w.shape
        for i in range(0, r, 4):
            for j in range(0, c, 4):
                block, ref = w[i:i + 4, j:j + 4], original[name][i:i + 4, j:j + 4]
                assert bool((block == 0).all()) or torch.equal(block, ref)
    assert stats["sparsity"] == pytest.approx(0.5, abs=0.02)


@pytest.mark.parametrize("fraction", [0.5, 0.8, 0.9])
def test_local_scope_hits_target_in_every_tensor(tiny_models, fraction):
    loaded = load_model(tiny_models("llama"))
    _, stats = sparsify(loaded, SparsityConfig(fraction=fraction, scope="local"))
    for t in stats["tensors"]:
        assert t["sparsity"] == pytest.approx(fraction, abs=1.0 / t["numel"] + 1e-6)


def test_global_scope_hits_total_with_one_threshold(tiny_models):
    loaded = load_model(tiny_models("bert"))
    params, _ = weights(loaded)
    original = {n: p.detach().abs().clone() for n, p in params.items()}
    _, stats = sparsify(loaded, SparsityConfig(fraction=0.7, scope="global"))
    assert stats["sparsity"] == pytest.approx(0.7, abs=1e-4)
    per_tensor = [t["sparsity"] for t in stats["tensors"]]
    assert max(per_tensor) - min(per_tensor) > 0.01  # tensors differ: not a per-tensor rule
    kept = torch.cat([original[n][p.detach() != 0] for n, p in params.items()])
    dropped = torch.cat([original[n][p.detach() == 0] for n, p in params.items()])
    assert float(dropped.max()) <= float(kept.min())  # one threshold across all tensors


@pytest.mark.parametrize("kind", ["cubic", "linear"])
def test_iterative_schedule_reaches_target_monotonically(tiny_models, kind):
    targets = schedule(0.8, 4, kind)
    assert targets[-1] == pytest.approx(0.8) and all(a < b for a, b in zip(targets, targets[1:]))
    loaded = load_model(tiny_models("bert"))
    _, stats = sparsify(loaded, SparsityConfig(fraction=0.8, steps=4, schedule=kind, scope="global"))
    achieved = [h["sparsity"] for h in stats["steps"]]
    assert achieved == sorted(achieved) and achieved[-1] == pytest.approx(0.8, abs=1e-4)
    assert stats["sparsity"] == pytest.approx(0.8, abs=1e-4)


def test_iterative_nm_ramps_through_denser_patterns(tiny_models):
    loaded = load_model(tiny_models("bert"))
    _, stats = sparsify(loaded, SparsityConfig(pattern="2:4", steps=2))
    assert [h["target"] for h in stats["steps"]] == ["3:4", "2:4"]
    assert stats["sparsity"] == pytest.approx(0.5, abs=1e-6)


def test_previous_masks_stay_pruned():
    scores = {"w": torch.tensor([[4.0, 3.0, 2.0, 1.0]])}
    first = compute_masks(scores, {"w": 1}, "unstructured", 0.25, "local")
    later = {"w": torch.tensor([[0.0, 3.0, 2.0, 9.0]])}  # the pruned weight's score rises
    second = compute_masks(later, {"w": 1}, "unstructured", 0.5, "local", first)
    assert not second["w"][0, 3] and second["w"].sum() == 2


def test_bad_patterns_are_user_errors():
    with pytest.raises(EdgePruneError):
        SparsityConfig(pattern="4:2")
    with pytest.raises(EdgePruneError):
        SparsityConfig(pattern="2:4", fraction=0.7)
    with pytest.raises(EdgePruneError):
        SparsityConfig(pattern="8x8", fraction=0.5)
    with pytest.raises(EdgePruneError, match="movement"):
        SparsityConfig(fraction=0.5, importance="moves")


def test_movement_sparsity_needs_finetune_data(tiny_models):
    loaded = load_model(tiny_models("bert"))
    with pytest.raises(EdgePruneError, match="fine-tuning data"):
        sparsify(loaded, SparsityConfig(fraction=0.5, importance="movement"))


def test_cli_and_recipe_round_trip(tiny_models, tmp_path, capsys):
    from edgeprune.cli import main

    out = tmp_path / "sparse"
    code = main(["compress", str(tiny_models("bert")), "-o", str(out), "--heads", "0.25", "--sparsity", "0.6",
                 "--scope", "global", "--steps", "2", "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["output"] == str(out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sparsity"]["sparsity"] == pytest.approx(0.6, abs=1e-3)
    recipe = CompressConfig.from_file(out / "recipe.yaml")
    assert recipe.sparsity == SparsityConfig(fraction=0.6, scope="global", steps=2)
    # the saved recipe reproduces the same weights
    again = compress(tiny_models("bert"), tmp_path / "again", recipe)
    a, b = load_artifact(out).model.state_dict(), load_artifact(again).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    reloaded = load_artifact(out)
    params, _ = sparse_params(reloaded)
    nonzero = sum(int((p != 0).sum()) for p in params.values())
    assert nonzero == manifest["sparsity"]["nonzero"]


@pytest.mark.parametrize("fam", ["bert", "llama"])
def test_embedding_table_is_sparsified_only_on_request(tiny_models, fam):
    loaded = load_model(tiny_models(fam))
    table = loaded.model.get_input_embeddings().weight
    before = table.detach().clone()  # the padding row starts at zero
    sparsify(loaded, SparsityConfig(fraction=0.5))
    assert torch.equal(table, before)
    sparsify(loaded, SparsityConfig(fraction=0.5, embeddings=True))
    assert float((table == 0).float().mean()) == pytest.approx(0.5, abs=0.01)
    params, _ = sparse_params(loaded, embeddings=True)
    assert any(p is table for p in params.values())
