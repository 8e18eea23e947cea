"""Executors for pipeline / sweep builds: the Ray path's bad input (Ray missing, unreachable address) fails in
one line within seconds and before any output exists; outputs built on another host come back intact;
and (marked ``ray``) a sweep built by a local Ray instance equals the serial sweep."""

from __future__ import annotations

import builtins
import json
import time

import pytest

from edgeprune.bench import executors
from edgeprune.bench.executors import ExecutorConfig, _receive, _remote_build, check_address
from edgeprune.core.errors import EdgePruneError


def _sweep_recipe(tmp_path, model):
    from tests.bench.test_pipeline import _sts_file

    data = _sts_file(tmp_path / "sts.tsv")
    recipe = tmp_path / "sweep.yaml"
    recipe.write_text(f"""
model: {model}
data: {data}
eval_limit: null
levels: [0.25, 0.5]
quantize: [none, int8-dynamic]
bench: {{batches: [2], seqs: [16], threads: 1, rounds: 2, warmup: 1, round_seconds: 0.02}}
""")
    return recipe


def test_ray_missing_is_one_line_with_the_install_command(tmp_path, monkeypatch, capsys):
    from edgeprune.cli import main

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    out = tmp_path / "sweep"
    # the check comes before any model is read: the model named here is never loaded
    assert main(["sweep", str(_sweep_recipe(tmp_path, "minilm")), "-o", str(out), "--executor", "ray"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["edgeprune: error: --executor ray needs Ray, which is not installed: "
                   "pip install 'edgeprune[ray]'  (ray==2.60.0)"]
    assert not out.exists()


def test_unreachable_address_fails_in_seconds(tmp_path, capsys):
    pytest.importorskip("ray", reason="pip install 'edgeprune[ray]'")
    from edgeprune.cli import main

    out = tmp_path / "sweep"
    started = time.monotonic()
    # nothing listens on 127.0.0.1:9 here: refused at once (a dropped-packet address meets the 3 s timeout)
    for address in ("127.0.0.1:9", "ray://127.0.0.1:9"):
        assert main(["sweep", str(_sweep_recipe(tmp_path, "minilm")), "-o", str(out), "--executor", "ray",
                     "--address", address]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"edgeprune: error: --address {address}: no Ray cluster reachable")
    assert time.monotonic() - started < 10
    assert not out.exists()


@pytest.mark.parametrize("address,message", [("nohost", "expected host:port"), ("host:port", "expected host:port")])
def test_malformed_address(address, message):
    with pytest.raises(EdgePruneError, match=message):
        check_address(address)


def test_executor_config_errors():
    with pytest.raises(EdgePruneError, match="--executor must be one of local, ray"):
        ExecutorConfig(kind="dask")
    with pytest.raises(EdgePruneError, match="--address needs --executor ray"):
        ExecutorConfig(address="1.2.3.4:6379")
    with pytest.raises(EdgePruneError, match="--ray-cpus must be > 0"):
        ExecutorConfig(kind="ray", cpus_per_task=0)


class _FakeBuild:
    """Writes a compressed dir and an export the way the pipeline's build does, recording what it reused."""

    def __init__(self):
        self.seen = []

    def __call__(self, name, work, reused):
        self.seen.append(None if reused is None else (reused["export"], (work / "exports").is_dir()))
        if reused is not None:  # a dependant reads its dependency's export, wherever it was built
            assert (executors.Path(reused["export"]) / "model.onnx").read_text() == "onnx of dense"
        (work / "compressed" / name).mkdir(parents=True)
        (work / "compressed" / name / "weights.bin").write_bytes(b"\x00" * 1000)
        (work / "exports" / name).mkdir(parents=True)
        (work / "exports" / name / "model.onnx").write_text(f"onnx of {name}")
        return {"source": str(work / "compressed" / name), "export": str(work / "exports" / name), "compress_s": 0.1}


def test_outputs_built_on_another_host_come_back(tmp_path):
    """A task on another host builds into scratch and ships a tar; the driver unpacks it into its own work
    directory, and a dependant task on a third host receives its dependency's export."""
    build = _FakeBuild()
    dense = _remote_build(build, "dense", str(tmp_path / "unused"), "driver-host", None, force_ship=True)
    assert dense["export"] == "work:exports/dense" and isinstance(dense["blob"], bytes)
    pruned = _remote_build(build, "pruned", str(tmp_path / "unused"), "driver-host", dense, force_ship=True)
    work = tmp_path / "work"
    for result in (dense, pruned):
        notes = _receive(result, work)
        name = "dense" if result is dense else "pruned"
        assert notes["export"] == str(work / "exports" / name) and notes["host"] == executors.host_name()
        assert (work / "exports" / name / "model.onnx").read_text() == f"onnx of {name}"
        assert (work / "compressed" / name / "weights.bin").stat().st_size == 1000
    assert not (tmp_path / "unused").exists()  # nothing was written into the driver's path by the tasks


def test_local_executor_runs_in_order_with_dependencies(tmp_path):
    build = _FakeBuild()
    results = executors.run_builds(["dense", "pruned"], {"dense": None, "pruned": "dense"}, build, tmp_path,
                                   ExecutorConfig(), log=lambda m: None)
    assert build.seen == [None, (str(tmp_path / "exports" / "dense"), True)]
    assert results["pruned"]["host"] == executors.host_name()


@pytest.mark.ray
@pytest.mark.slow
def test_ray_sweep_equals_serial_sweep(tiny_models, tmp_path):
    """Same variants, qualities and choice whether built here one by one or as tasks of a local Ray."""
    pytest.importorskip("ray", reason="pip install 'edgeprune[ray]'")
    from edgeprune.pipeline import SweepConfig, run_sweep

    config = SweepConfig.from_file(_sweep_recipe(tmp_path, tiny_models("bert")))
    # a latency bound every variant meets: the choice is the best quality, which timing noise cannot flip
    serial = run_sweep(config, tmp_path / "serial", max_latency_ms=1e9, log=lambda m: None)
    ray_result = run_sweep(config, tmp_path / "ray", max_latency_ms=1e9, log=lambda m: None,
                           executor=ExecutorConfig(kind="ray", local_cpus=2))
    quality = lambda r: {p["model"]: p["quality"] for p in r["points"]}  # noqa: E731
    assert quality(ray_result) == pytest.approx(quality(serial), rel=1e-6)
    # the choice: the best quality; variants that tie on it (the tiny model's int8 and fp32 forms can score
    # alike) are ordered by latency, which is timing noise between two runs
    def best(result):
        top = max(p["quality_ratio"] for p in result["points"])
        return {p["model"] for p in result["points"] if p["quality_ratio"] == top}

    assert best(ray_result) == best(serial), (ray_result["points"], serial["points"])
    assert ray_result["chosen"]["model"] in best(serial) and serial["chosen"]["model"] in best(serial)
    assert set(ray_result["executor"]["built_on"]) == {"dense", "dense-int8-dynamic", "prune-25",
                                                       "prune-25-int8-dynamic", "prune-50", "prune-50-int8-dynamic"}
    assert json.loads((tmp_path / "ray" / "summary.json").read_text())["executor"]["kind"] == "ray"
