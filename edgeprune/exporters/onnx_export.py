"""PyTorch (possibly pruned, uneven per layer) -> ONNX through optimum-onnx's per-architecture ONNX configs.

Pruned models keep the dense ``num_attention_heads`` / ``num_key_value_heads`` in their config and record the
real per-layer shapes in ``config.edgeprune_layers``. optimum's dummy past-key-value generators read the dense
counts, so decoders get a generator subclass that follows each layer's own KV-head count (uneven layers are
supported, not refused). After export, past inputs whose real layout differs from what
``optimum.onnxruntime.ORTModelForCausalLM`` derives from the config get a shape-tolerant entry (see
``make_past_tolerant``), so that class can still start generation with its empty past tensors.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path
from typing import Any

from edgeprune.core import onnxio
from edgeprune.core.errors import EdgePruneError
from edgeprune.core.logs import quiet_logs

# edgeprune task -> optimum task (decoders with KV cache get "-with-past").
OPTIMUM_TASKS = {
    "feature-extraction": "feature-extraction",
    "sequence-classification": "text-classification",
    "text-generation": "text-generation",
}
ONNX_FILE = "model.onnx"


def kv_layout(loaded) -> list[dict[str, int]]:
    """Per-layer KV heads and head_dim of a decoder, from the adapter (the one place that knows architectures)."""
    adapter, config = loaded.adapter, loaded.model.config
    head_dim = adapter.head_dim(config)
    return [{"kv_heads": shape.kv_heads, "head_dim": head_dim} for shape in adapter.shapes(config)]


def check_attention_everywhere(loaded) -> None:
    """ONNX decoders get one past_key_values pair per block (optimum's layout, which the runtimes rely on):
    a block whose attention depth pruning removed has none to give, so such a model is refused."""
    from edgeprune.core.errors import EdgePruneError

    free = [i for i, s in enumerate(loaded.adapter.shapes(loaded.model.config)) if s.heads == 0]
    if free:
        raise EdgePruneError(f"ONNX export: block(s) {','.join(map(str, free))} have no attention (half-block depth "
                             "pruning), and the ONNX decoder layout needs a KV cache in every block; export with "
                             "--target llamacpp (deci layers), or remove whole blocks (--drop-layers) instead")


def ort_assumed_layout(config) -> tuple[int, int]:
    """(kv_heads, head_dim) that ORTModelForCausalLM builds its initial empty past tensors with."""
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head")
    kv = getattr(config, "num_key_value_heads", None) or heads
    if config.model_type not in ("llama", "mistral", "qwen2", "qwen3"):
        kv = heads
    return kv, config.hidden_size // heads


def _layout_pkv_generator(base_cls, layout: list[dict[str, int]]):
    """A past-key-values dummy generator that follows per-layer KV heads instead of the config's dense count."""

    class LayoutPastKeyValuesGenerator(base_cls):
        def generate(self, input_name: str, framework: str = "pt", int_dtype: str = "int64", float_dtype: str = "fp32"):
            pairs = []
            for layer in layout:
                shape = (self.batch_size, layer["kv_heads"], self.sequence_length, layer["head_dim"])
                pairs.append((self.random_float_tensor(shape, framework=framework, dtype=float_dtype),
                              self.random_float_tensor(shape, framework=framework, dtype=float_dtype)))
            return pairs

    LayoutPastKeyValuesGenerator.__name__ = f"Layout{base_cls.__name__}"
    return LayoutPastKeyValuesGenerator


def _onnx_config(model, optimum_task: str, layout: list[dict[str, int]] | None, preprocessors):
    from optimum.exporters.tasks import TasksManager

    try:
        constructor = TasksManager.get_exporter_config_constructor(
            "onnx", model=model, task=optimum_task, library_name="transformers")
    except (KeyError, ValueError) as exc:
        raise EdgePruneError(f"optimum-onnx cannot export {model.config.model_type!r} for {optimum_task}: "
                             f"{str(exc).splitlines()[0]}") from None
    if layout is None:
        return constructor(model.config, preprocessors=preprocessors)
    base = constructor.func
    pkv_base = getattr(base, "DUMMY_PKV_GENERATOR_CLASS", None)
    if pkv_base is None:
        raise EdgePruneError(f"{model.config.model_type}: optimum ONNX config has no past-key-value generator")
    pkv = _layout_pkv_generator(pkv_base, layout)
    generators = tuple(pkv if g is pkv_base else g for g in base.DUMMY_INPUT_GENERATOR_CLASSES)
    custom = type(f"EdgePrune{base.__name__}", (base,), {
        "DUMMY_INPUT_GENERATOR_CLASSES": generators, "DUMMY_PKV_GENERATOR_CLASS": pkv})
    # As optimum's own decoder path does: the past is an input as well as an output.
    return functools.partial(custom, *constructor.args, **constructor.keywords)(
        model.config, preprocessors=preprocessors, use_past_in_inputs=True)


def export_with_optimum(loaded, out_dir: Path, task: str, with_past: bool, opset: int) -> dict[str, Any]:
    """Write model.onnx, config.json, tokenizer (and generation config) into ``out_dir``."""
    from optimum.exporters.onnx import onnx_export_from_model

    optimum_task = OPTIMUM_TASKS[task]
    decoder = task == "text-generation"
    layout = kv_layout(loaded) if decoder else None
    if decoder:
        check_attention_everywhere(loaded)
    if decoder and with_past:
        optimum_task += "-with-past"
    onnx_config = _onnx_config(loaded.model, optimum_task, layout if decoder and with_past else None,
                               [loaded.tokenizer])
    # optimum's post-processing (the tied-weight pass) sizes the whole graph as one protobuf, which fails over
    # 2 GB; there the same pass runs here and saves with external data
    large = sum(p.numel() for p in loaded.model.parameters()) * 4 > onnxio.EXTERNAL_DATA_ABOVE_BYTES
    # optimum and torch.onnx are chatty (tracer warnings); failures still raise.
    with quiet_logs("optimum"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            onnx_export_from_model(
                loaded.model, out_dir, task=optimum_task, opset=opset, do_validation=False,
                custom_onnx_configs={"model": onnx_config}, preprocessors=[loaded.tokenizer],
                no_post_process=large,
            )
        except (ValueError, KeyError, RuntimeError) as exc:
            raise EdgePruneError(f"ONNX export failed for {loaded.model.config.model_type} ({optimum_task}): "
                                 f"{str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__}") from None
    if not (out_dir / "tokenizer.json").is_file():
        # optimum skips tokenizers it did not load from a directory (e.g. one converted from GGUF); the
        # torch-free runtime needs tokenizer.json.
        loaded.tokenizer.save_pretrained(out_dir)
    if not (out_dir / ONNX_FILE).is_file():
        raise EdgePruneError(f"ONNX export wrote no {ONNX_FILE} (files: {sorted(p.name for p in out_dir.iterdir())})")
    info: dict[str, Any] = {"optimum_task": optimum_task}
    if large:
        info["tied_weights"] = deduplicate_tied_weights(loaded.model, out_dir / ONNX_FILE)
    if decoder:
        info["kv_layout"] = layout
        if with_past:
            info["past_tolerant"] = make_past_tolerant(out_dir / ONNX_FILE, layout, ort_assumed_layout(loaded.model.config))
    return info


def deduplicate_tied_weights(model, path: Path) -> str:
    """optimum's tied-weight pass (one initializer for a tied embedding and LM head) on a graph over 2 GB, with
    optimum's own helpers, saved with external data; what it did, for the manifest."""
    import onnx

    try:
        from accelerate.utils import find_tied_parameters
        from optimum.onnx.transformations_utils import (_deduplicate_gather_matmul, _find_matching_initializers,
                                                        _get_weights_to_tie)
    except ImportError:  # helpers of optimum~=2.1; without them the tied table is stored twice
        return "kept twice (optimum's tied-weight helpers not found)"
    tied = find_tied_parameters(model)
    if not tied:
        return "none tied"
    onnx_model = onnx.load(str(path))
    with_op, to_tie, _ = _get_weights_to_tie(tied, model)
    index = {init.name: i for i, init in enumerate(onnx_model.graph.initializer)}
    groups = _find_matching_initializers(with_op, onnx_model, index)
    onnxio.save_onnx(_deduplicate_gather_matmul(onnx_model, to_tie, groups, index), path)
    return "deduplicated"


def make_past_tolerant(path: Path, layout: list[dict[str, int]], assumed: tuple[int, int]) -> bool:
    """Let empty past tensors of the config-derived shape in when the real layout differs (pruned models).

    ``ORTModelForCausalLM`` starts generation with empty pasts of (batch, config kv heads, 0, config head_dim).
    For layers whose real (kv_heads, head_dim) differ, the past input's head dims become symbolic and it is
    reshaped to (batch, kv_heads, -1, head_dim) before use: a no-op for correctly shaped pasts, and an empty
    past of any head layout becomes an empty past of the right one. Returns whether anything changed.
    """
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    if all((layer["kv_heads"], layer["head_dim"]) == assumed for layer in layout):
        return False
    model = onnx.load(str(path))
    graph = model.graph
    inputs = {i.name: i for i in graph.input}
    new_nodes = []
    for index, layer in enumerate(layout):
        if (layer["kv_heads"], layer["head_dim"]) == assumed:
            continue
        for kind in ("key", "value"):
            name = f"past_key_values.{index}.{kind}"
            if name not in inputs:
                raise EdgePruneError(f"exported decoder has no input {name}")
            dims = inputs[name].type.tensor_type.shape.dim
            dims[1].dim_param = f"past_kv_heads_{index}"
            dims[3].dim_param = f"past_head_dim_{index}"
            shaped = f"{name}/edgeprune_reshaped"
            for node in graph.node:
                for j, used in enumerate(node.input):
                    if used == name:
                        node.input[j] = shaped
            shape_name = f"{name}/edgeprune_shape"
            graph.initializer.append(numpy_helper.from_array(
                np.array([0, layer["kv_heads"], -1, layer["head_dim"]], dtype=np.int64), shape_name))
            new_nodes.append(helper.make_node("Reshape", [name, shape_name], [shaped], name=f"{name}/edgeprune_reshape"))
    # Prepend so the graph stays topologically sorted.
    nodes = new_nodes + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    onnxio.save_onnx(model, path)
    return True


def io_signature(path: Path) -> dict[str, list[dict[str, Any]]]:
    """Input/output names, element types and (symbolic) shapes, for the manifest."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def describe(values):
        out = []
        for value in values:
            tensor = value.type.tensor_type
            out.append({
                "name": value.name,
                "dtype": onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name,
                "shape": [d.dim_param or d.dim_value for d in tensor.shape.dim],
            })
        return out

    return {"inputs": describe(model.graph.input), "outputs": describe(model.graph.output)}
