"""Where the variants of a pipeline, sweep or seed study are built: in this process, one after the other
(``local``, the default), or as Ray tasks (``--executor ray [--address ADDR]``), each with its CPU request.

Only building (compress -> export) fans out. Benchmark timing stays serial and interleaved on the host that
runs the pipeline: timing models side by side on shared cores would measure the contention, not the models.
A task on another host than the driver builds into a scratch directory there and sends its outputs back as
one tar archive (through Ray's object store), so the result lands in the same place as a local build.
"""

from __future__ import annotations

import io
import socket
import tarfile
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from edgeprune.core.configs import FrozenConfig
from edgeprune.core.errors import EdgePruneError

EXECUTORS = ("local", "ray")
RAY_INSTALL = "pip install 'edgeprune[ray]'  (ray==2.60.0)"
CONNECT_TIMEOUT_S = 3.0  # an unreachable --address fails within this (plus Ray's own start), not minutes


@dataclass(frozen=True)
class ExecutorConfig(FrozenConfig):
    kind: str = "local"
    address: str | None = None  # a running Ray cluster (host:port, ray://host:port, auto); None: start one here
    cpus_per_task: float = 1.0  # Ray CPU request of one variant's build
    local_cpus: int | None = None  # CPUs of a Ray instance started here (None: Ray's default, all cores)

    def __post_init__(self):
        if self.kind not in EXECUTORS:
            raise EdgePruneError(f"--executor must be one of {', '.join(EXECUTORS)} (got {self.kind!r})")
        if self.address is not None and self.kind != "ray":
            raise EdgePruneError("--address needs --executor ray")
        if not self.cpus_per_task > 0:
            raise EdgePruneError(f"--ray-cpus must be > 0 (got {self.cpus_per_task})")


def host_name() -> str:
    return socket.gethostname()


def import_ray():
    try:
        import ray
    except ImportError:
        raise EdgePruneError(f"--executor ray needs Ray, which is not installed: {RAY_INSTALL}") from None
    return ray


def check_address(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Fail in seconds when nothing listens at a host:port address (ray.init would retry for minutes)."""
    if address in ("auto", "local"):
        return
    target = address.split("://", 1)[-1]
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise EdgePruneError(f"--address {address!r}: expected host:port, ray://host:port or auto")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise EdgePruneError(f"--address {address}: no Ray cluster reachable there ({exc.strerror or exc}); start "
                             "one with `ray start --head` or drop --address to start a local one") from None


def preflight(config: ExecutorConfig) -> None:
    """Ray installed and the cluster reachable: checked before any output exists or any work starts."""
    if config.kind == "ray":
        import_ray()
        if config.address is not None:
            check_address(config.address)


@contextmanager
def ray_session(config: ExecutorConfig) -> Iterator[Any]:
    """ray.init for the run and ray.shutdown after it. With no address a local instance is started (without
    the dashboard: it is slow to start on a busy machine and nothing here reads it)."""
    ray = import_ray()
    if config.address is not None:
        check_address(config.address)
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True, "configure_logging": False}
    if config.address is None:
        kwargs["num_cpus"] = config.local_cpus
    try:
        ray.init(address=config.address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise EdgePruneError(f"ray.init({config.address or 'local'}) failed: {str(exc).splitlines()[0][:300]}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


# --- moving build outputs between hosts -----------------------------------------------------------------

def pack(root: Path, members: list[str]) -> bytes:
    """The directories ``members`` (relative to ``root``) as one uncompressed tar archive."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for member in members:
            if (root / member).exists():
                archive.add(root / member, arcname=member)
    return buffer.getvalue()


def unpack(blob: bytes, root: Path) -> None:
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r") as archive:
        archive.extractall(root, filter="data")  # "data": no absolute paths, links out of root or devices


# --- running the builds -----------------------------------------------------------------------------------

# (variant name, work root, notes of the variant it starts from) -> its notes (paths as strings)
BuildFn = Callable[[str, Path, "dict | None"], dict]
_WORK = "work:"  # prefix of a path relative to the work root, in notes that travel between hosts


def _relative(notes: dict, root: Path) -> dict:
    return {k: (_WORK + str(Path(v).relative_to(root)) if isinstance(v, str) and Path(v).is_absolute()
                and Path(v).is_relative_to(root) else v) for k, v in notes.items()}


def _absolute(notes: dict, root: Path) -> dict:
    return {k: (str(root / v[len(_WORK):]) if isinstance(v, str) and v.startswith(_WORK) else v)
            for k, v in notes.items()}


def _receive(result: dict, root: Path) -> dict:
    """A task's result with its shipped outputs unpacked under ``root`` and its paths pointing there."""
    result = dict(result)
    blob = result.pop("blob", None)
    if blob is not None:
        unpack(blob, root)
    return _absolute(result, root)


def _remote_build(build: BuildFn, name: str, work: str, driver_host: str, reused: dict | None,
                  force_ship: bool = False) -> dict:
    """One variant's build inside a Ray task. ``reused``: the task result of the variant it starts from. On
    the driver's host it builds straight into the work directory; elsewhere into a scratch directory whose
    outputs go back as a tar archive."""
    host = host_name()
    started = time.perf_counter()
    if host == driver_host and not force_ship:
        root = Path(work)
        notes = build(name, root, _receive(reused, root) if reused else None)
        return dict(_relative(notes, root), host=host, task_s=round(time.perf_counter() - started, 1))
    with tempfile.TemporaryDirectory(prefix="edgeprune-ray-") as scratch:
        root = Path(scratch)
        notes = build(name, root, _receive(reused, root) if reused else None)
        members = [m for m in (f"compressed/{name}", f"exports/{name}") if (root / m).exists()]
        return dict(_relative(notes, root), host=host, task_s=round(time.perf_counter() - started, 1),
                    blob=pack(root, members))


def run_builds(names: list[str], depends: dict[str, str | None], build: BuildFn, work: Path,
               config: ExecutorConfig, log: Callable[[str], None] = print, force_ship: bool = False) -> dict[str, dict]:
    """Build every variant in ``names`` (``depends[name]``: the variant it starts from, built first) and
    return {name: notes (with ``host``)}. Local: in order, in this process. Ray: one task per variant, all
    submitted at once; Ray starts a variant when its CPU request fits and the variant it reuses is done."""
    work = Path(work)
    results: dict[str, dict] = {}
    if config.kind == "local":
        host = host_name()
        for name in names:
            reused = depends.get(name)
            results[name] = dict(build(name, work, results[reused] if reused else None), host=host)
        return results
    with ray_session(config) as ray:
        task = ray.remote(num_cpus=config.cpus_per_task)(_remote_build)
        driver = host_name()
        refs = {}
        for name in names:  # in order: a reused variant's ref exists before its dependants are submitted
            reused = depends.get(name)
            refs[name] = task.remote(build, name, str(work), driver, refs[reused] if reused else None, force_ship)
        log(f"ray: {len(refs)} build tasks submitted ({config.cpus_per_task:g} CPU each) to "
            f"{config.address or 'a local Ray instance'}")
        try:
            for name in names:
                results[name] = _receive(ray.get(refs[name]), work)
                log(f"[{name}] built on {results[name]['host']} in {results[name]['task_s']:.0f}s")
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, EdgePruneError):
                raise EdgePruneError(str(cause)) from None
            raise
    return results


def executor_summary(config: ExecutorConfig, results: dict[str, dict]) -> dict:
    """Which host built which variant and which host timed them all (this one), for the report."""
    return {"kind": config.kind, "address": config.address,
            "cpus_per_task": config.cpus_per_task if config.kind == "ray" else None,
            "built_on": {name: r.get("host") for name, r in results.items()}, "timed_on": host_name(),
            "timing": "serial and interleaved on the timing host"}


def add_arguments(parser) -> None:
    parser.add_argument("--executor", choices=EXECUTORS, default="local",
                        help="build the variants here one by one (local) or as Ray tasks (ray); timing stays "
                             "serial and interleaved on this host")
    parser.add_argument("--address", help="--executor ray: a running Ray cluster (host:port, ray://host:port, "
                                          "auto); default: start a local Ray instance for the run")
    parser.add_argument("--ray-cpus", type=float, default=1.0, help="--executor ray: CPUs each variant's task requests")
    parser.add_argument("--ray-local-cpus", type=int, help="--executor ray without --address: CPUs of the local "
                                                           "instance (default: all)")


def from_arguments(args) -> ExecutorConfig:
    return ExecutorConfig(kind=args.executor, address=args.address, cpus_per_task=args.ray_cpus,
                          local_cpus=args.ray_local_cpus)
