"""Least-squares reconstruction strictly lowers every layer's reconstruction error on calibration data."""

import copy
import json

import pytest
import torch

from edgeprune.compress.api import CalibrationConfig, CompressConfig, compress, structured_prune
from edgeprune.compress.calibration import load_calibration
from edgeprune.compress.plan import StructuredConfig
from edgeprune.compress.reconstruct import reconstruct
from edgeprune.core.errors import EdgePruneError
from edgeprune.core.loading import load_model
from tiny import sample_texts


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("\n".join(t for t in sample_texts(200, seed=5) if len(t) > 20) + "\n")
    return path


def pruned_and_dense(tiny_models, family, calib_file):
    loaded = load_model(tiny_models(family))
    dense = copy.deepcopy(loaded.model)
    calib = load_calibration(loaded, CalibrationConfig(path=str(calib_file), samples=48, max_length=24, batch_size=16))
    structured_prune(loaded, StructuredConfig(heads=0.5, ffn=0.5))
    return loaded, dense, calib


def embedding_error(model, dense, calib):
    with torch.no_grad():
        total = 0.0
        for batch in calib:
            a, b = model(**batch), dense(**batch)
            key = "logits" if hasattr(a, "logits") else "last_hidden_state"
            mask = batch["attention_mask"].bool()
            total += float((getattr(a, key) - getattr(b, key))[mask].pow(2).sum())
    return total


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])  # Linear with bias, Conv1D, GQA without bias
@pytest.mark.parametrize("mode", ["full", "scales"])
def test_reconstruction_strictly_lowers_layer_error(tiny_models, family, calib_file, mode):
    loaded, dense, calib = pruned_and_dense(tiny_models, family, calib_file)
    before = embedding_error(loaded.model, dense, calib)
    report = reconstruct(loaded.model, dense, loaded.adapter, calib, damping=1e-2, mode=mode, progress=False)
    assert len(report) == len(loaded.adapter.layers(loaded.model))
    for entry in report:
        for module in ("attention", "ffn"):
            errors = entry[module]
            assert errors["mse_after"] < errors["mse_before"], (entry["layer"], module, errors)
            assert errors["rel_after"] < errors["rel_before"]
    if mode == "full":  # with a full re-fit the end-to-end output on calibration data also gets closer
        assert embedding_error(loaded.model, dense, calib) < before


def test_reconstruction_of_identity_is_a_no_op(tiny_models, calib_file):
    loaded = load_model(tiny_models("bert"))
    dense = copy.deepcopy(loaded.model)
    calib = load_calibration(loaded, CalibrationConfig(path=str(calib_file), samples=16, max_length=24))
    report = reconstruct(loaded.model, dense, loaded.adapter, calib, progress=False)
    assert all(e[m]["mse_before"] < 1e-9 for e in report for m in ("attention", "ffn"))
    for (name, a), b in zip(loaded.model.state_dict().items(), dense.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-4), name


def test_compress_records_reconstruction(tiny_models, calib_file, tmp_path):
    config = CompressConfig.from_dict({
        "structured": {"heads": 0.5, "ffn": 0.5, "importance": "fisher"},
        "calibration": {"path": str(calib_file), "samples": 32, "max_length": 24},
        "reconstruct": {"enabled": True, "mode": "scales"},
    })
    out = compress(tiny_models("bert"), tmp_path / "out", config)
    manifest = json.loads((out / "manifest.json").read_text())
    assert {"calibration_s", "structured_s", "reconstruct_s"} <= set(manifest["timings"])
    rec = manifest["reconstruction"]
    assert rec[0]["ffn"]["mse_after"] < rec[0]["ffn"]["mse_before"]
    reloaded = load_model(out)
    batch = reloaded.tokenizer(sample_texts(2), padding=True, return_tensors="pt")
    assert torch.isfinite(reloaded.model(**batch).last_hidden_state).all()


def test_reconstruct_without_calibration_is_a_clear_error(tiny_models, tmp_path):
    config = CompressConfig.from_dict({"structured": {"heads": 0.5}, "reconstruct": {"enabled": True}})
    with pytest.raises(EdgePruneError, match="--calib"):
        compress(tiny_models("bert"), tmp_path / "out", config)


def _hidden_of(call):
    args, kwargs = call
    return args[0] if args else kwargs["hidden_states"]


@pytest.mark.parametrize("mode", ["full", "scales"])
@pytest.mark.parametrize("in_place", [False, True])  # in memory (a pruned copy) / sequential (pruned in place)
def test_batchwise_refit_equals_all_at_once(tiny_models, calib_file, mode, in_place):
    """refit_block's normal equations, summed batch by batch (and, in place, the attention inputs taken from
    the dense block sliced to the kept heads), give the re-fit of all windows' activations concatenated."""
    from edgeprune.compress.reconstruct import (_accumulate, _consumer_input, _fit_consumer, _hidden,
                                                _token_mask, _with_hidden, capture_layer_inputs, refit_block)
    from edgeprune.core.arch.base import LayerPlan, kept_rows

    loaded = load_model(tiny_models("llama"))
    model, adapter = loaded.model.eval(), loaded.adapter
    calib = load_calibration(loaded, CalibrationConfig(path=str(calib_file), samples=48, max_length=24, batch_size=16))
    assert len(calib) == 3
    inputs_d = capture_layer_inputs(model, adapter, calib)
    calib[0] = dict(calib[0], attention_mask=calib[0]["attention_mask"].clone())
    calib[0]["attention_mask"][0, -5:] = 0  # tokens the statistics must skip (as padding), in every path
    gen = torch.Generator().manual_seed(1)  # the pruned stream: what an earlier pruned block passes on
    inputs_p = [_with_hidden(c, _hidden_of(c) + 0.3 * torch.randn(_hidden_of(c).shape, generator=gen)) for c in inputs_d]
    neurons = tuple(sorted(torch.randperm(48, generator=gen)[:30].tolist()))
    plan, shape = LayerPlan((0, 1, 3, 4), (0, 1), neurons), adapter.dense_shapes(model.config)[0]
    head_dim, damping = adapter.head_dim(model.config), 1e-2
    masks = [_token_mask(b, _hidden_of(c).shape) for b, c in zip(calib, inputs_d)]
    assert not bool(masks[0].all())

    # all at once: every window's targets and consumer inputs concatenated, one solve per consumer
    reference = copy.deepcopy(model)
    adapter.prune_layer(reference, 0, plan, shape)
    layer_r, consumers_r = adapter.layers(reference)[0], adapter.unit_consumers(reference, 0)
    targets = {0: [], 1: []}
    handles = [spec.module.register_forward_hook(lambda m, a, out, slot=slot: targets[slot].append(out))
               for slot, spec in enumerate(adapter.unit_consumers(model, 0))]
    with torch.no_grad():
        dense_out = [_hidden(adapter.layers(model)[0](*a, **k)) for a, k in inputs_d]
    for handle in handles:
        handle.remove()
    y = {slot: torch.cat([t[m] for t, m in zip(targets[slot], masks)]) for slot in (0, 1)}
    with torch.no_grad():
        x0 = torch.cat([_consumer_input(layer_r, consumers_r[0].module, c)[m] for c, m in zip(inputs_p, masks)])
        ref = {"attention": _fit_consumer(consumers_r[0], _accumulate(None, x0, y[0]), mode, damping, False, head_dim)}
        x1 = torch.cat([_consumer_input(layer_r, consumers_r[1].module, c)[m] for c, m in zip(inputs_p, masks)])
        ref["ffn"] = _fit_consumer(consumers_r[1], _accumulate(None, x1, y[1]), mode, damping, False, 1)
        ref_out = [_hidden(layer_r(*a, **k)) for a, k in inputs_p]

    # batch by batch
    work = copy.deepcopy(model)
    layer_w = adapter.layers(work)[0]
    if in_place:
        consumers_d = adapter.unit_consumers(work, 0)
        rows = kept_rows(consumers_d[0], plan, shape, head_dim)
        attention_input = lambda i, call: _consumer_input(layer_w, consumers_d[0].module, call).index_select(-1, rows)

        def pruned():
            adapter.prune_layer(work, 0, plan, shape)
            return layer_w, adapter.unit_consumers(work, 0)
    else:
        consumers_d = adapter.unit_consumers(model, 0)
        adapter.prune_layer(work, 0, plan, shape)
        consumers_w = adapter.unit_consumers(work, 0)
        attention_input = lambda i, call: _consumer_input(layer_w, consumers_w[0].module, call)
        pruned = lambda: (layer_w, consumers_w)
    stream_d, stream_p = list(inputs_d), list(inputs_p)
    entry = refit_block(adapter.layers(work if in_place else model)[0], consumers_d, stream_d, stream_p, calib,
                        attention_input, pruned, damping, mode, False, head_dim)

    for name in ("attention", "ffn"):
        assert ref[name]["mse_after"] < ref[name]["mse_before"]  # the re-fit did something
        for key, value in ref[name].items():
            assert entry[name][key] == pytest.approx(value, rel=1e-6), (name, key)
    for (name, a), b in zip(layer_w.state_dict().items(), layer_r.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    for got, want in zip(stream_d, dense_out):  # the next block's dense inputs, replaced in place
        assert torch.equal(_hidden_of(got), want)
    for got, want in zip(stream_p, ref_out):  # and its pruned inputs, through the re-fitted block
        torch.testing.assert_close(_hidden_of(got), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("width,has_bias", [(1, True), (4, True), (4, False)])
def test_scale_fit_in_units_space_equals_the_full_equations(width, has_bias):
    """_fit_scales frees the Gram matrix before its solve and reports its errors from the units' equations:
    they must equal the errors of the same parameters from the full normal equations."""
    from edgeprune.compress.reconstruct import _accumulate, _error, _fit_scales

    gen = torch.Generator().manual_seed(3)
    x, out = torch.randn(200, 24, generator=gen), 7
    weight = torch.randn(out, 24, generator=gen)
    bias = torch.randn(out, generator=gen) if has_bias else torch.zeros(out)
    y = x @ (weight * (1 + 0.3 * torch.randn(24, generator=gen))).T + 0.1 * torch.randn(200, out, generator=gen)
    current = torch.cat([weight, bias[:, None]], dim=1).double()
    full = _accumulate(None, x, y)
    expected_before = _error(current, full)
    solution, before, after = _fit_scales(_accumulate(None, x, y), current, width, 1e-2)
    assert before == pytest.approx(expected_before, rel=1e-7)
    assert after == pytest.approx(_error(solution, full), rel=1e-7)
    assert after < before
    scales = solution[:, :24] / current[:, :24]  # one scale per unit of ``width`` columns, bias kept
    assert torch.allclose(scales, scales[:1].expand_as(scales))
    assert torch.allclose(scales[0].view(-1, width), scales[0].view(-1, width)[:, :1].expand(-1, width))
    assert torch.equal(solution[:, 24], current[:, 24])


@pytest.mark.parametrize("has_bias,fit_bias", [(True, True), (True, False), (False, False)])
def test_full_solve_leaves_the_normal_equations_as_they_were(has_bias, fit_bias):
    from edgeprune.compress.reconstruct import _accumulate, _solve

    gen = torch.Generator().manual_seed(4)
    x, y = torch.randn(100, 12, generator=gen), torch.randn(100, 5, generator=gen)
    normal = _accumulate(None, x, y)
    gram = normal.gram.clone()
    current = torch.randn(5, 13, generator=gen, dtype=torch.float64)
    solution = _solve(normal, current, 1e-2, has_bias, fit_bias)
    assert torch.equal(normal.gram, gram)  # the ridge went on in place and came off exactly
    reference = torch.linalg.lstsq(torch.cat([x, torch.ones(100, 1)], 1).double(), y.double()).solution.T
    if has_bias and fit_bias:  # a small ridge: near the plain least-squares fit
        assert torch.allclose(solution, reference, atol=0.05)
    if not has_bias:
        assert torch.equal(solution[:, 12], torch.zeros(5, dtype=torch.float64))
    elif not fit_bias:
        assert torch.allclose(solution[:, 12], current[:, 12], atol=1e-6)


def test_in_place_positive_solve_and_its_refusal():
    from edgeprune.compress.reconstruct import _pack_leading_block, _solve_positive_in_place

    gen = torch.Generator().manual_seed(5)
    a = torch.randn(9, 9, generator=gen, dtype=torch.float64)
    square = a @ a.T + torch.eye(9, dtype=torch.float64)
    leading, rhs = square[:-1, :-1].clone(), torch.randn(8, generator=gen, dtype=torch.float64)
    packed = _pack_leading_block(square)
    assert torch.equal(packed, leading) and packed.data_ptr() == square.data_ptr()
    x = _solve_positive_in_place(packed, rhs)
    assert torch.allclose(leading @ x, rhs)
    assert _solve_positive_in_place(-leading.clone(), rhs) is None  # not positive definite: no solution
