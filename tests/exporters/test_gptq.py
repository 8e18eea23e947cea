"""GPTQ's math (exporters/gptq.py): packing as MatMulNBits reads it, RTN when the inputs are uncorrelated,
a smaller output error than RTN when they are correlated, Hessians that skip padding."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeprune.core.errors import EdgePruneError
from edgeprune.core.onnxio import ort_session
from edgeprune.exporters import gptq


def _matmulnbits_model(codes, scales, zeros, k, n, block, bits, integer=False):
    inputs = ["x", "b", "s"] + (["z"] if zeros is not None else [])
    nodes = [helper.make_node("MatMulNBits", inputs, ["y"], domain="com.microsoft",
                              K=k, N=n, bits=bits, block_size=block)]
    inits = [numpy_helper.from_array(gptq.pack_codes(codes, block, bits), "b"), numpy_helper.from_array(scales, "s")]
    if zeros is not None:
        inits.append(numpy_helper.from_array(gptq.pack_zero_points(zeros) if integer else zeros, "z"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 9
    return model.SerializeToString()


@pytest.mark.parametrize("k, bits, zero_point", [(64, 4, "none"), (40, 4, "none"), (64, 8, "none"), (64, 4, "float"),
                                                 (40, 4, "float"), (96, 4, "integer"), (40, 4, "integer")])
def test_packed_codes_compute_the_dequantized_product(k, bits, zero_point):  # 40: a pruned width, a partial block
    """What onnxruntime's MatMulNBits computes from our packing (and float zero points) equals
    x @ dequantize(codes, scales, zeros)."""
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((k, 24)).astype(np.float32)
    settings = gptq.GPTQSettings(block_size=32, bits=bits, zero_point=zero_point)
    codes, scales, zeros = gptq.gptq_quantize(weight, np.eye(k), settings)
    x = rng.standard_normal((2, k)).astype(np.float32)
    model = _matmulnbits_model(codes, scales, None if zero_point == "none" else zeros, k, 24, 32, bits,
                               integer=zero_point == "integer")
    got = ort_session(model).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, x @ gptq.dequantize(codes, scales, zeros, k), atol=1e-4)
    assert np.abs(got - x @ weight).max() > 1e-3  # a quantized product, not the fp32 one
    if zero_point == "integer":
        assert (zeros == np.rint(zeros)).all() and zeros.min() >= 0 and zeros.max() <= 15
    if zero_point == "none":
        assert (zeros == 1 << (bits - 1)).all()
        if k % 32:
            assert (codes[:, k:] == 1 << (bits - 1)).all()  # padding sits on the zero code


def test_a_block_already_on_an_asymmetric_grid_is_reproduced_exactly():
    """A dequantized GGUF Q4_1 block (scale d, float minimum m: w = d*q + m) comes back unchanged, and so
    GPTQ has no error to spread: the pruned columns of a Q4_1 source cost nothing."""
    rng = np.random.default_rng(5)
    d, m = rng.uniform(0.01, 0.05, (8, 2)), rng.uniform(-0.4, 0.1, (8, 2))
    q = rng.integers(0, 16, (8, 2, 32))
    q[:, :, 0], q[:, :, 1] = 0, 15  # Q4_1 blocks use their whole range
    weight = (d[:, :, None] * q + m[:, :, None]).reshape(8, 64).T  # [K=64, N=8]
    hessian = np.cov(rng.standard_normal((64, 500))) * 500
    codes, scales, zeros = gptq.gptq_quantize(weight, hessian, gptq.GPTQSettings(zero_point="float"))
    np.testing.assert_allclose(gptq.dequantize(codes, scales, zeros, 64), weight, atol=1e-6)


def test_uncorrelated_inputs_give_round_to_nearest():
    """With H = I there is nothing to compensate: GPTQ's codes are the grid's nearest points, and the scale of
    each block puts its largest-magnitude weight on code 0 (onnxruntime's symmetric convention)."""
    rng = np.random.default_rng(2)
    weight = rng.standard_normal((64, 16))
    codes, scales, _ = gptq.gptq_quantize(weight, np.eye(64), gptq.GPTQSettings(zero_point="none", clip_search=False))
    blocks = weight.T.reshape(16, 2, 32)
    extreme = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=2)[..., None], axis=2)[..., 0]
    np.testing.assert_allclose(scales, extreme / -8, rtol=1e-6)
    rtn = np.clip(np.rint(blocks / scales[..., None]) + 8, 0, 15).reshape(16, 64)
    assert (codes == rtn).all()


def test_correlated_inputs_lower_the_output_error_below_rtn():
    rng = np.random.default_rng(3)
    mix = rng.standard_normal((96, 96)) * 0.3 + np.eye(96)
    x = rng.standard_normal((4096, 96)) @ mix  # correlated input channels, as real activations are
    weight = rng.standard_normal((96, 40)).astype(np.float32)
    hessian = x.T @ x
    for zero_point in ("none", "integer", "float"):
        settings = gptq.GPTQSettings(zero_point=zero_point, clip_search=False)
        rtn = gptq.gptq_quantize(weight, np.eye(96), settings)

        def error(codes, scales, zeros):
            return float(((x @ weight - x @ gptq.dequantize(codes, scales, zeros, 96)) ** 2).mean())

        assert error(*gptq.gptq_quantize(weight, hessian, settings)) < 0.8 * error(*rtn)
        # act-order and the clip search are options of the same solver: each still beats RTN here
        for variant in (gptq.GPTQSettings(zero_point=zero_point, act_order=True),
                        gptq.GPTQSettings(zero_point=zero_point, clip_search=True)):
            assert error(*gptq.gptq_quantize(weight, hessian, variant)) < error(*rtn)


def test_hessians_skip_masked_rows():
    rng = np.random.default_rng(4)

    class Session:  # the one call accumulate_hessians makes
        def __init__(self, values):
            self.values = iter(values)

        def run(self, names, feeds):
            return [next(self.values)]

    values = [rng.standard_normal((2, 5, 3)).astype(np.float32) for _ in range(2)]
    masks = [np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]), np.ones((2, 5))]
    sums, tokens = gptq.accumulate_hessians(Session(values), [{}, {}], ["h"], masks)
    rows = np.concatenate([values[0].reshape(-1, 3)[masks[0].reshape(-1) == 1], values[1].reshape(-1, 3)])
    assert tokens == 18
    np.testing.assert_allclose(sums["h"], rows.T.astype(np.float64) @ rows, rtol=1e-5)


def test_a_singular_hessian_is_one_clear_error():
    with pytest.raises(EdgePruneError, match="not positive definite"):
        gptq.gptq_quantize(np.ones((32, 4)), -np.eye(32), gptq.GPTQSettings(damp=0.0))


@pytest.mark.parametrize("qtype", sorted(gptq.GGML_GRIDS))
def test_ggml_blocks_read_back_by_the_gguf_package_as_gptq_chose_them(qtype):
    """llama.cpp's block layouts (read by the gguf package's own dequantizer) hold exactly the grid values
    GPTQ rounded to, fp16 scales (and q4_1/q5_1 offsets) included."""
    import gguf

    rng = np.random.default_rng(3)
    k, n = 96, 10
    weight = rng.standard_normal((k, n)).astype(np.float32)
    x = rng.standard_normal((400, k)) @ rng.standard_normal((k, k))
    codes, scales, zeros = gptq.gptq_quantize(weight, x.T @ x, gptq.ggml_settings(qtype))
    raw = gptq.pack_ggml_blocks(codes, scales, zeros, qtype)
    kind = gguf.GGMLQuantizationType[qtype.upper()]
    assert raw.dtype == np.uint8 and raw.shape == tuple(gguf.quant_shape_to_byte_shape((n, k), kind))
    np.testing.assert_allclose(gguf.dequantize(raw, kind), gptq.dequantize(codes, scales, zeros, k).T,
                               rtol=0, atol=1e-6)
    assert (scales.astype(np.float16).astype(np.float32) == scales).all()  # on the stored fp16 grid


def test_gptq_on_the_q4_0_grid_beats_ggmls_round_to_nearest_on_correlated_inputs():
    import gguf

    rng = np.random.default_rng(4)
    k, n = 128, 32
    weight = rng.standard_normal((k, n)).astype(np.float32)
    x = rng.standard_normal((2000, k)) @ (np.eye(k) + 0.6 * rng.standard_normal((k, k)))
    codes, scales, zeros = gptq.gptq_quantize(weight, x.T @ x, gptq.ggml_settings("q4_0"))
    ours = gguf.dequantize(gptq.pack_ggml_blocks(codes, scales, zeros, "q4_0"), gguf.GGMLQuantizationType.Q4_0)
    rtn = gguf.dequantize(gguf.quantize(weight.T.copy(), gguf.GGMLQuantizationType.Q4_0),
                          gguf.GGMLQuantizationType.Q4_0)
    error = lambda w: float(np.square(x @ (w.T - weight)).mean())  # noqa: E731
    assert error(ours) < 0.7 * error(rtn)


def test_ggml_packing_refuses_partial_blocks_and_unknown_types():
    with pytest.raises(EdgePruneError, match="whole 32-weight blocks"):
        gptq.pack_ggml_blocks(np.zeros((2, 40), np.uint8), np.ones((2, 2), np.float32), np.zeros((2, 2)), "q4_0")
    with pytest.raises(EdgePruneError, match="not 'q6_k'"):
        gptq.ggml_settings("q6_k")
