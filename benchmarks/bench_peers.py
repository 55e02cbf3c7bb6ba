"""Figures of the comparison methods: parameter count and milliseconds per fused pair.

    python benchmarks/bench_peers.py [--methods average dwt asfe-fusion ...] [--size 256]
                                     [--reps 3] [--device cpu] [--json out.json]

Methods are built from params.yaml through the registry, at the papers' sizes. A learned
method is timed in eval mode without gradients on a (1, 1, size, size) pair after one warm-up
run; a classical one on float64 arrays. The median of `--reps` runs is reported, with the
machine's load average, since the machine may be shared.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medfuse.config import load_params, method_config
from medfuse.io import write_text_atomic
from medfuse.methods import build_method

DEFAULT_METHODS = ["average", "max", "dwt", "laplacian", "asfe-fusion", "adafuse"]
# AdaFuse's encoder sharing depends on the pair: time the CT-MRI model, count both.
PAIR_FOR = {"adafuse": "CT-MRI"}


def synthetic_pair(size: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    a = np.exp(-((xx - 0.5) ** 2 + (yy - 0.5) ** 2) / 0.05) + 0.1 * rng.random((size, size))
    b = ((xx - 0.3) ** 2 + (yy - 0.6) ** 2 < 0.08) * 0.6 + yy * 0.3
    return np.clip(a, 0, 1), np.clip(b, 0, 1)


def median_ms(run: Callable[[], Any], reps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def build(params: dict[str, Any], name: str, pair: str | None = None) -> Any:
    config = method_config(params, name)
    if pair is not None:
        config["pair"] = pair
    return build_method(name, config)


def bench_method(
    params: dict[str, Any], name: str, size: int, reps: int, device: str
) -> dict[str, Any]:
    a, b = synthetic_pair(size)
    method = build(params, name, PAIR_FOR.get(name))
    if isinstance(method, torch.nn.Module):
        net = method.to(device).eval()
        ta = torch.tensor(a, dtype=torch.float32, device=device)[None, None]
        tb = torch.tensor(b, dtype=torch.float32, device=device)[None, None]

        def run() -> None:
            with torch.no_grad():
                net(ta, tb)
            if device.startswith("cuda"):
                torch.cuda.synchronize()

        params_count = sum(p.numel() for p in net.parameters())
        ms = median_ms(run, reps)
        del net, method
    else:
        params_count = 0
        ms = median_ms(lambda: method.fuse(a, b), max(reps, 5))
    return {"method": name, "params": params_count, "ms_per_pair": round(ms, 2)}


def adafuse_separate_params(params: dict[str, Any]) -> int:
    """Parameter count of AdaFuse with one encoder per source (the PET/SPECT-MRI models)."""
    net = build(params, "adafuse", "PET-MRI")
    return sum(p.numel() for p in net.parameters())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    args = parser.parse_args(argv)

    params = load_params(args.params)
    header = (
        f"# {platform.node()} torch {torch.__version__} threads {torch.get_num_threads()} "
        f"device {args.device} size {args.size}x{args.size}"
    )
    print(header)
    print(f"{'method':<14}{'params':>14}{'ms/pair':>12}   load (1/5/15 min)")
    rows = []
    for name in args.methods:
        row = bench_method(params, name, args.size, args.reps, args.device)
        row["load"] = [round(x, 2) for x in os.getloadavg()]
        rows.append(row)
        load = " ".join(f"{x:.2f}" for x in row["load"])
        print(f"{name:<14}{row['params']:>14,}{row['ms_per_pair']:>12.1f}   {load}", flush=True)
    if "adafuse" in args.methods:
        separate = adafuse_separate_params(params)
        print(f"adafuse with separate encoders (PET/SPECT-MRI): {separate:,} parameters")
    if args.json is not None:
        write_text_atomic(args.json, json.dumps({"header": header, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
