"""Energy per inference: a RAPL reading where the kernel exposes one, otherwise a labelled estimate.

Linux powercap (``/sys/class/powercap/intel-rapl*/energy_uj``; AMD Zen exposes the same interface) gives
package energy counters. They are often unreadable (virtual machines, no root since CVE-2020-8694), and
then the only honest number is an *estimate*: process CPU time x a stated power per busy core. The two are
never mixed: every figure carries ``method`` ("measured" or "estimate") and the model used.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass

POWERCAP_GLOB = "/sys/class/powercap/intel-rapl*/energy_uj"
# Assumed power of one fully busy core when no counter is readable. 4 W per thread is the fallback
# codecarbon uses for CPUs it does not know (it has no entry for "AMD EPYC"); stated, not measured.
DEFAULT_WATTS_PER_CORE = 4.0


def _package_counters() -> list[str]:
    """Top-level package domains only (intel-rapl:0, not the nested intel-rapl:0:0 sub-domains)."""
    found = []
    for path in sorted(glob.glob(POWERCAP_GLOB)):
        domain = os.path.basename(os.path.dirname(path))
        if domain.count(":") == 1:
            found.append(path)
    return found


def _read_uj(path: str) -> int | None:
    try:
        with open(path) as handle:
            return int(handle.read().strip())
    except (OSError, ValueError):
        return None


def _max_range(path: str) -> int | None:
    return _read_uj(os.path.join(os.path.dirname(path), "max_energy_range_uj"))


@dataclass
class EnergyMeter:
    """Reads all package counters; ``readable`` is False when none can be read."""

    counters: list[str]

    @classmethod
    def open(cls) -> "EnergyMeter":
        return cls([p for p in _package_counters() if _read_uj(p) is not None])

    @property
    def readable(self) -> bool:
        return bool(self.counters)

    def read(self) -> list[int] | None:
        if not self.counters:
            return None
        values = [_read_uj(p) for p in self.counters]
        return None if any(v is None for v in values) else values

    def delta_uj(self, start: list[int] | None, end: list[int] | None) -> int | None:
        if start is None or end is None:
            return None
        total = 0
        for path, a, b in zip(self.counters, start, end):
            if b < a:  # counter wrapped
                b += _max_range(path) or 0
            total += b - a
        return total


def describe_method(meter: EnergyMeter, watts_per_core: float) -> dict:
    if meter.readable:
        return {"method": "measured", "source": "linux powercap RAPL " + ", ".join(meter.counters),
                "note": "package energy during the timed calls; includes anything else running on the package"}
    return {"method": "estimate", "watts_per_core": watts_per_core,
            "model": f"process CPU time x {watts_per_core:g} W per busy core (assumed, not measured)",
            "note": "no readable RAPL/powercap counter on this machine; this is not a reading"}


def energy_per_inference(method: dict, cpu_seconds: float, energy_uj: int | None, calls: int) -> float | None:
    """Joules per call by the stated method (None if measured counters went missing mid-run)."""
    if calls <= 0:
        return None
    if method["method"] == "measured":
        return None if energy_uj is None else energy_uj / 1e6 / calls
    return cpu_seconds * method["watts_per_core"] / calls
