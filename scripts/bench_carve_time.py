"""Per-layer time breakdown of `carve-50` at 64 × 512 calibration tokens (first 4 layers of demo).

    python scripts/bench_carve_time.py
"""

from __future__ import annotations

import time
from pathlib import Path

from moefy.arch import adapter_for
from moefy.calib import load_calibration
from moefy.io.checkpoint import open_source
from moefy.recipe import load_recipe
from moefy.transforms import carve as carve_module
from moefy.plan import SourceInfo
from moefy.transforms.base import LayerData, read_mlp

CALIB = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "wikitext-2" / "valid.txt"
LAYERS = 4


def main() -> None:
    ckpt = open_source("demo")
    adapter = adapter_for(ckpt.config)
    info = SourceInfo(adapter, ckpt.config)
    runner = load_calibration(ckpt, str(CALIB), 64, 512).runner(ckpt, adapter)
    carve = load_recipe("carve-50").build_transforms(0)[0]
    carve.check(info)
    carve.setup(info, carve.plan(None, info))
    clustering = carve_module.balanced_clusters
    seconds = {"attention pass": 0.0, "carve": 0.0, "of which clustering": 0.0, "carved block forward": 0.0}

    def timed_clusters(*args, **kwargs):
        t0 = time.perf_counter()
        result = clustering(*args, **kwargs)
        seconds["of which clustering"] += time.perf_counter() - t0
        return result

    carve_module.balanced_clusters = timed_clusters
    for layer in range(LAYERS):
        t0 = time.perf_counter()
        x = runner.mlp_inputs(layer)
        t1 = time.perf_counter()
        mlp = read_mlp(ckpt, info, layer)
        block = carve.apply(layer, mlp, LayerData(x, mlp))
        t2 = time.perf_counter()
        runner.advance(block.forward)
        t3 = time.perf_counter()
        seconds["attention pass"] += t1 - t0
        seconds["carve"] += t2 - t1
        seconds["carved block forward"] += t3 - t2
    for name, total in seconds.items():
        print(f"{name:22s} {total / LAYERS:6.2f} s/layer")


if __name__ == "__main__":
    main()
