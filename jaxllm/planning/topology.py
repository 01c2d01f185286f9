"""TPU topologies this host can compile for without owning them (libtpu's compile-only devices).

Names: a Cloud accelerator type ("v5p-128", "v5litepod-16", "v6e-256": v4 and v5p count
TensorCores, two per chip; v5e and v6e count chips) or a topology ("v5p:4x4x8", "v5e:4x4").
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

from jax.experimental import topologies

from jaxllm.config import ConfigError

# libtpu takes a host-wide lock file when it loads, so a second plan (or a test worker) on the
# same host would fail; compile-only use touches no TPU, so sharing is safe.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
    generation: str  # as topology names spell it: v4, v5p, v5e, v6e
    hbm_bytes: int
    peak_flops: float  # dense bf16 FLOP/s, as rated
    cores_per_chip: int  # what an accelerator-type name counts per chip
    dims: int  # 3-D torus or 2-D grid
    hbm_bandwidth: float  # bytes/s, as rated


CHIPS = {
    "v4": Chip("v4", 32 * GIB, 275e12, 2, 3, 1228e9),
    "v5p": Chip("v5p", 95 * GIB, 459e12, 2, 3, 2765e9),
    "v5e": Chip("v5e", 16 * GIB, 197e12, 1, 2, 819e9),
    "v6e": Chip("v6e", 32 * GIB, 918e12, 1, 2, 1640e9),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6lite": "v6e", "v6litepod": "v6e"}


@dataclasses.dataclass(frozen=True)
class Topology:
    chip: Chip
    name: str  # libtpu's topology name, e.g. "v5p:4x4x8"
    chips: int  # per slice
    num_slices: int = 1

    @property
    def num_devices(self) -> int:
        return self.chips * self.num_slices

    @property
    def accelerator_type(self) -> str:
        return f"{self.chip.generation}-{self.chips * self.chip.cores_per_chip}"

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(side) for side in self.name.split(":")[1].split("x"))

    @property
    def wraparound(self) -> tuple[bool, bool, bool]:
        """Which sides of the slice close into rings. A 3-D torus (v4, v5p) has its wraparound
        links once every side is a multiple of 4 (whole 4x4x4 cubes), none below that; a 2-D grid
        (v5e, v6e) wraps the sides of 16, a whole pod's. libtpu picks collective algorithms by it:
        without the rings an fsdp all-gather becomes an all-reduce of twice the traffic."""
        shape = self.shape
        if self.chip.dims == 3:
            return (all(side % 4 == 0 for side in shape),) * 3
        return tuple(side == 16 for side in shape) + (False,)

    def describe(self) -> str:
        slices = f"{self.num_slices} x " if self.num_slices > 1 else ""
        return f"{slices}{self.accelerator_type} ({self.name}, {self.chips} chips)"


def _grid(chips: int, dims: int) -> tuple[int, ...]:
    """The slice shape Cloud TPU uses for a chip count: as cubic (or square) as powers of two
    allow, smaller sides first."""
    if chips < 1 or chips & (chips - 1):
        raise ConfigError(f"{chips} chips is not a power of two; name the topology instead (e.g. v5p:4x4x8)")
    exponents = [0] * dims
    for k in range(int(math.log2(chips))):
        exponents[k % dims] += 1
    return tuple(sorted(2**e for e in exponents))


def parse(name: str, num_slices: int = 1) -> Topology:
    """A Topology from an accelerator type or a topology name; a one-line error otherwise."""
    m = re.fullmatch(r"(v\d+[a-z]*)(?:-(\d+)|:(\d+(?:x\d+)+))", name.strip().lower())
    generation = _ALIASES.get(m.group(1), m.group(1)) if m else None
    if generation not in CHIPS:
        raise ConfigError(f"unknown TPU topology {name!r}; give an accelerator type such as v5p-128 or "
                          f"v5e-16, or a topology such as v5p:4x4x8 (chips: {', '.join(CHIPS)})")
    if num_slices < 1:
        raise ConfigError(f"--num_slices must be at least 1, got {num_slices}")
    chip = CHIPS[generation]
    if m.group(2):
        cores = int(m.group(2))
        if cores % chip.cores_per_chip:
            raise ConfigError(f"{name}: {generation} names count {chip.cores_per_chip} cores per chip; "
                              f"use a multiple of {chip.cores_per_chip}")
        shape = _grid(cores // chip.cores_per_chip, chip.dims)
        if chip.dims == 3 and shape[0] == 1:
            shape = _grid(cores // chip.cores_per_chip, 2) + (1,)  # fewer than 8 chips: a 2-D slice
    else:
        shape = tuple(int(s) for s in m.group(3).split("x"))
    return Topology(chip, f"{generation}:{'x'.join(map(str, shape))}", math.prod(shape), num_slices)


def devices(topology: Topology):
    """The compile-only devices of `topology`: real TPU devices to the compiler, with no chip
    behind them, so jit(...).lower(...).compile() runs on a CPU host."""
    # libtpu reads the accelerator type at start-up and warns when it is unset.
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", topology.accelerator_type)
    try:
        # As a Cloud slice is built: v4/v5p chips run their two TensorCores as one device
        # ("megacore"), hosts hold up to 2x2 chips, and the torus's rings are described.
        hosts = tuple(min(2, side) for side in topology.shape[:2]) + (1,)
        desc = topologies.get_topology_desc(
            platform="tpu", topology_name=topology.name, num_slices=topology.num_slices,
            chip_config_name="megacore" if topology.chip.dims == 3 else "default",
            chips_per_host_bounds=hosts, wrap=topology.wraparound)
    except Exception as e:  # noqa: BLE001 - libtpu's errors name no type we could catch more narrowly
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"cannot describe TPU topology {topology.name} ({first}); install the TPU "
                          'extra with pip install -e ".[tpu]" (it brings libtpu)') from None
    return desc.devices
