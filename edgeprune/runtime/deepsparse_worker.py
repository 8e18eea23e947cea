"""DeepSparse worker: runs under the DeepSparse virtualenv's python (deepsparse 1.8.0, onnx<1.15, numpy<2).

Self-contained on purpose (stdlib + numpy + onnx + deepsparse only): it must not import edgeprune, whose
dependencies need newer numpy/onnx. It loads one model, then serves requests until told to stop.

Protocol (parent <-> worker over stdin/stdout): each message is an 8-byte big-endian length followed by a
pickled dict. Requests: {"op": "load", "path", "threads"}, {"op": "run", "feeds", "outputs"},
{"op": "benchmark", "feeds", "iterations", "warmup"}, {"op": "decode_timings", "prompt", "steps",
"capacity", "layout"}, {"op": "close"}. Replies carry the result keys or
{"error": "one line"}. Anything the libraries print goes to stderr, never into the protocol stream.

DeepSparse compiles for fixed input shapes, so an engine is compiled per distinct set of input shapes on
first use (from a static-shape copy of the graph in a temp dir; the artifact is never modified) and cached.
"""

import os
import pickle
import struct
import sys
import tempfile
import time
from collections import OrderedDict

PROTOCOL_VERSION = 1
MAX_ENGINES = 8  # compiled engines kept per worker; each holds its own weights copy


def _read_message(stream):
    header = stream.read(8)
    if len(header) < 8:
        return None
    (size,) = struct.unpack(">Q", header)
    payload = stream.read(size)
    return pickle.loads(payload)


def _write_message(stream, message):
    payload = pickle.dumps(message, protocol=4)
    stream.write(struct.pack(">Q", len(payload)) + payload)
    stream.flush()


_ONNX_TO_NUMPY = {1: "float32", 2: "uint8", 3: "int8", 6: "int32", 7: "int64", 9: "bool", 10: "float16",
                  11: "float64"}


def _value_info(value):
    dims = []
    for d in value.type.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        else:
            dims.append(d.dim_param or None)
    return (value.name, tuple(dims), _ONNX_TO_NUMPY.get(value.type.tensor_type.elem_type, "float32"))


class Worker:
    def __init__(self):
        self.path = None
        self.threads = None
        self.graph_model = None  # onnx ModelProto without external data, for shape rewriting
        self.inputs = []
        self.outputs = []
        self.engines = OrderedDict()
        self.tempdir = tempfile.TemporaryDirectory(prefix="edgeprune-deepsparse-")
        self.compile_seconds = {}

    def load(self, path, threads):
        import onnx

        import deepsparse

        model = onnx.load(path, load_external_data=False)
        if model.ir_version > 9:
            raise ValueError(f"{path}: ONNX IR version {model.ir_version}; DeepSparse 1.8 accepts IR <= 9 "
                             "(export with the deepsparse target)")
        if len(model.graph.sparse_initializer):
            raise ValueError(f"{path}: holds sparse initializers, which DeepSparse cannot read; use the "
                             "dense-with-zeros file of the export (deepsparse target)")
        initializers = {i.name for i in model.graph.initializer}
        self.path, self.threads, self.graph_model = path, threads, model
        self.inputs = [_value_info(v) for v in model.graph.input if v.name not in initializers]
        self.outputs = [_value_info(v) for v in model.graph.output]
        self.external = sorted({entry.value for init in model.graph.initializer
                                for entry in init.external_data if entry.key == "location"})
        return {"inputs": self.inputs, "outputs": self.outputs, "deepsparse": deepsparse.__version__,
                "protocol": PROTOCOL_VERSION}

    def _static_copy(self, shapes):
        """A copy of the graph with every input dimension fixed; external weight files are symlinked."""
        import onnx

        model = onnx.ModelProto()
        model.CopyFrom(self.graph_model)
        initializers = {i.name for i in model.graph.initializer}
        real_inputs = [v for v in model.graph.input if v.name not in initializers]
        for value, shape in zip(real_inputs, shapes):
            dims = value.type.tensor_type.shape.dim
            for dim, size in zip(dims, shape):
                dim.Clear()
                dim.dim_value = int(size)
        folder = os.path.join(self.tempdir.name, "x".join(str(s) for s in shapes[0]) + f"-{len(self.engines)}-{time.time_ns()}")
        os.makedirs(folder)
        source_dir = os.path.dirname(os.path.abspath(self.path))
        for location in self.external:
            target = os.path.join(folder, location)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.symlink(os.path.join(source_dir, location), target)
        out = os.path.join(folder, "model.onnx")
        onnx.save(model, out)
        return out

    def engine_for(self, arrays):
        shapes = tuple(tuple(int(s) for s in a.shape) for a in arrays)
        if shapes in self.engines:
            self.engines.move_to_end(shapes)
            return self.engines[shapes]
        import deepsparse

        for (name, declared, _), shape in zip(self.inputs, shapes):
            if len(declared) != len(shape):
                raise ValueError(f"input {name}: rank {len(shape)} given, model expects {len(declared)}")
        started = time.perf_counter()
        path = self._static_copy(shapes)
        batch = shapes[0][0] if shapes and shapes[0] else 1
        engine = deepsparse.Engine(path, batch_size=batch, num_cores=self.threads)
        self.compile_seconds[str(shapes)] = time.perf_counter() - started
        self.engines[shapes] = engine
        while len(self.engines) > MAX_ENGINES:
            self.engines.popitem(last=False)
        return engine

    def _arrays(self, feeds):
        import numpy as np

        missing = [name for name, _, _ in self.inputs if name not in feeds]
        if missing:
            raise ValueError(f"missing model inputs: {', '.join(missing)}")
        return [np.ascontiguousarray(feeds[name], dtype=dtype) for name, _, dtype in self.inputs]

    def run(self, feeds, outputs=None):
        arrays = self._arrays(feeds)
        values = self.engine_for(arrays).run(arrays, val_inp=False)
        names = [name for name, _, _ in self.outputs]
        result = dict(zip(names, values))
        return {"outputs": {n: result[n] for n in (outputs or names)}}

    def benchmark(self, feeds, iterations, warmup=0):
        arrays = self._arrays(feeds)
        engine = self.engine_for(arrays)
        sink = 0.0
        for _ in range(warmup):
            engine.run(arrays, val_inp=False)
        times = []
        for _ in range(iterations):
            start = time.perf_counter()
            values = engine.run(arrays, val_inp=False)
            sink += float(values[0].flat[0])  # consume the output
            times.append(time.perf_counter() - start)
        return {"times": times, "sink": sink}

    def decode_timings(self, prompt, steps, capacity, layout=None):
        """KV-cache greedy decode timed inside this process, in DeepSparse's fixed-capacity layout (as
        edgeprune's FixedCapacityCache): one run of the whole ``prompt`` [1, P] with a ``capacity - P`` slot
        cache, then ``steps`` one-token runs with a ``capacity - 1`` slot cache, the oldest (empty) slot dropped
        from ``present`` each time; ``attention_mask`` (length ``capacity``) masks the empty slots. Two engines.
        ``layout``: [kv heads, head size] per layer (the export manifest's ``kv_layout``) where the graph's
        past inputs leave them symbolic. Returns (prefill seconds, per-step seconds, checksum of the tokens)."""
        import numpy as np

        names = [name for name, _, _ in self.inputs]
        past = [(name, declared) for name, declared, _ in self.inputs if name.startswith("past_key_values")]
        if not past:
            raise ValueError("the model has no past_key_values inputs (a --no-past export): nothing to decode with")
        sizes = {}
        for name, declared in past:
            layer = int(name.split(".")[1])
            sizes[name] = tuple(layout[layer]) if layout and layer < len(layout) else (declared[1], declared[3])
            if not all(isinstance(d, int) for d in sizes[name]):
                raise ValueError(f"cannot size the cache: {name} has no fixed head count and head size")
        outputs = [name for name, _, _ in self.outputs]
        present = [outputs.index(name.replace("past_key_values", "present", 1)) for name, _ in past]
        length = int(prompt.shape[1])
        if capacity <= length + steps - 1:
            raise ValueError(f"capacity {capacity} does not hold a {length}-token prompt and {steps} steps")
        clock = time.perf_counter

        def arrays(ids, positions, real, cache):
            mask = np.zeros((1, capacity), np.int64)
            mask[0, capacity - real:] = 1
            values = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, **cache}
            missing = [name for name in names if name not in values]
            if missing:
                raise ValueError(f"cannot decode: no value for the inputs {', '.join(missing)}")
            return [np.ascontiguousarray(values[name], dtype=dtype) for name, _, dtype in self.inputs]

        def after(values):  # the next step's cache: every present minus its oldest slot
            return {name: np.ascontiguousarray(values[index][:, :, 1:]) for (name, _), index in zip(past, present)}

        cache = {name: np.zeros((1, sizes[name][0], capacity - length, sizes[name][1]), np.float32) for name, _ in past}
        feeds = arrays(np.asarray(prompt, np.int64), np.arange(length, dtype=np.int64)[None], length, cache)
        engine = self.engine_for(feeds)
        start = clock()
        values = engine.run(feeds, val_inp=False)
        token = int(values[0][0, -1].argmax())
        prefill = clock() - start
        cache, real, step_times, checksum = after(values), length, [], 0.0
        for _ in range(steps):
            real += 1
            feeds = arrays(np.array([[token]], np.int64), np.array([[real - 1]], np.int64), real, cache)
            engine = self.engine_for(feeds)  # compiled on the first step; a warm-up call covers that
            start = clock()
            values = engine.run(feeds, val_inp=False)
            token = int(values[0][0, -1].argmax())
            step_times.append(clock() - start)
            cache = after(values)
            checksum += token
        return {"prefill": prefill, "steps": step_times, "checksum": checksum}


def _die_with_parent():
    """Linux: get SIGTERM when the parent dies, so a killed benchmark never leaves a busy worker behind."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def main():
    import signal

    _die_with_parent()
    # Ctrl-C reaches the whole process group; the parent handles it and closes this worker.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # SIGTERM (also sent when the parent dies): exit through Python so the temporary directory is removed
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    # Keep the real stdout for the protocol; route every library print to stderr.
    protocol_out = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    protocol_in = sys.stdin.buffer
    worker = Worker()
    try:
        _serve(worker, protocol_in, protocol_out)
    except BrokenPipeError:  # the parent went away: nothing left to answer, no traceback
        pass
    finally:
        worker.tempdir.cleanup()


def _serve(worker, protocol_in, protocol_out):
    while True:
        request = _read_message(protocol_in)
        if request is None or request.get("op") == "close":
            break
        op = request.get("op")
        try:
            if op == "load":
                reply = worker.load(request["path"], request.get("threads"))
            elif op == "run":
                reply = worker.run(request["feeds"], request.get("outputs"))
            elif op == "benchmark":
                reply = worker.benchmark(request["feeds"], int(request["iterations"]), int(request.get("warmup", 0)))
            elif op == "decode_timings":
                reply = worker.decode_timings(request["prompt"], int(request["steps"]), int(request["capacity"]),
                                              request.get("layout"))
            elif op == "stats":
                reply = {"compile_seconds": dict(worker.compile_seconds), "engines": len(worker.engines)}
            else:
                reply = {"error": f"unknown request {op!r}"}
        except Exception as exc:  # report, keep serving
            text = str(exc).strip().splitlines()
            reply = {"error": f"{exc.__class__.__name__}: {text[0] if text else ''}"}
        _write_message(protocol_out, reply)


if __name__ == "__main__":
    main()
