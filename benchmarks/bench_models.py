"""Cost of every registered method: parameters, MACs, inference and training speed, peak memory.

    python benchmarks/bench_models.py                      # every method, paper settings, CPU
    python benchmarks/bench_models.py --methods wdualmine --train-steps 5
    python benchmarks/bench_models.py --overlay workflow/profiles/quick/params.yaml

Each method runs in its own subprocess so its peak memory is its own. Figures are printed with
the machine's load average (`os.getloadavg`) taken around each measurement: on a shared machine
a timing means little without it. The CT-MRI epoch estimate multiplies the measured seconds per
training step by the steps of one paper-profile epoch (160 train pairs / batch size).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CT_MRI_TRAIN_PAIRS = 160  # the dataset's CT-MRI train folder


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.2f}/{five:.2f}"


def timed(fn: Any, repeats: int, warmup: int, sync: Any) -> list[float]:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


def count_macs(model: Any, a: Any, b: Any) -> dict[str, float]:
    """MACs of one forward pass: torch's FLOP counter (every conv and matmul, functional ones
    included) halved; and thop's count (module layers only) as a cross-check when installed."""
    import copy

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    out: dict[str, float] = {}
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(a, b)
    out["gmacs"] = counter.get_total_flops() / 2e9
    try:
        import thop

        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            macs, _ = thop.profile(copy.deepcopy(model), inputs=(a, b), verbose=False)
        out["gmacs_thop"] = float(macs) / 1e9
    except ImportError:
        pass
    return out


def bench_learned(name: str, config: dict, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from medfuse.train import build_learned

    device = args.device
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    torch.manual_seed(0)
    model = build_learned(name, config, "CT-MRI").to(device)
    result: dict[str, Any] = {"parameters": sum(p.numel() for p in model.parameters())}
    size = args.size
    a1, b1 = (
        torch.rand(1, 1, size, size, device=device),
        torch.rand(1, 1, size, size, device=device),
    )
    model.eval()
    result.update(count_macs(model, a1, b1))
    result["load_before_infer"] = load()
    with torch.no_grad():
        times = timed(lambda: model(a1, b1), args.repeats, 3, sync)
    result.update(infer_ms_median=1e3 * statistics.median(times), infer_ms_min=1e3 * min(times))
    result["load_after_infer"] = load()
    if args.train_steps > 0:
        batch = args.batch or int(config.get("optim", {}).get("batch_size", 8))
        a = torch.rand(batch, 1, size, size, device=device)
        b = torch.rand(batch, 1, size, size, device=device)
        model.train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-5)

        def step() -> None:
            loss, _ = model.training_loss(a, b)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        result["load_before_train"] = load()
        times = timed(step, args.train_steps, 1, sync)
        s_step = statistics.median(times)
        result.update(
            batch=batch,
            train_s_per_step=s_step,
            train_s_per_step_min=min(times),
            train_images_per_s=batch / s_step,
            ct_mri_epoch_s=s_step * math.ceil(CT_MRI_TRAIN_PAIRS / batch),
            train_steps_timed=len(times),
        )
        result["load_after_train"] = load()
    if device == "cuda":
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def bench_classical(name: str, config: dict, args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np

    from medfuse.methods.registry import build_method

    fuser = build_method(name, config)
    rng = np.random.default_rng(0)
    a, b = rng.random((args.size, args.size)), rng.random((args.size, args.size))
    result: dict[str, Any] = {"parameters": 0, "load_before_infer": load()}
    times = timed(lambda: fuser.fuse(a, b), args.repeats, 2, lambda: None)
    result.update(
        infer_ms_median=1e3 * statistics.median(times),
        infer_ms_min=1e3 * min(times),
        load_after_infer=load(),
    )
    return result


def run_one(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from medfuse.config import load_params, method_config

    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.no_keep_memory:
        from medfuse.train import keep_freed_memory

        keep_freed_memory()  # as `medfuse train` and `medfuse fuse` do
    params = load_params(args.params, args.overlay)
    config = method_config(params, args.one)
    rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kind = config["kind"]
    if kind == "learned":
        result = bench_learned(args.one, config, args)
    elif kind == "classical":
        result = bench_classical(args.one, config, args)
    else:
        return {"method": args.one, "skipped": f"kind {kind}"}
    result.update(
        method=args.one,
        kind=kind,
        device=args.device,
        threads=torch.get_num_threads(),
        size=args.size,
        rss_start_mb=rss_start,
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    )
    return result


def format_row(r: dict[str, Any]) -> str:
    if "skipped" in r or "error" in r:
        return f"{r['method']:<12} {r.get('skipped') or r.get('error')}"
    text = (
        f"{r['method']:<12} params {r['parameters']:>10,}  "
        f"infer {r['infer_ms_median']:8.1f} ms (min {r['infer_ms_min']:.1f})"
        f"  [load {r['load_before_infer']} -> {r['load_after_infer']}]"
    )
    if "gmacs" in r:
        text += f"\n{'':<12} MACs {r['gmacs']:.3f} G/pair"
        if "gmacs_thop" in r:
            text += f" (thop, layers only: {r['gmacs_thop']:.3f} G)"
    if "train_s_per_step" in r:
        text += (
            f"\n{'':<12} train batch {r['batch']}: {r['train_s_per_step']:.2f} s/step "
            f"(min {r['train_s_per_step_min']:.2f}, {r['train_steps_timed']} steps), "
            f"{r['train_images_per_s']:.2f} images/s  [load {r['load_before_train']} -> "
            f"{r['load_after_train']}]"
            f"\n{'':<12} CT-MRI paper epoch (160 pairs): ~{r['ct_mri_epoch_s']:.0f} s "
            "(extrapolated from the timed steps)"
        )
    text += f"\n{'':<12} peak RSS {r['peak_rss_mb']:.0f} MB (start {r['rss_start_mb']:.0f} MB)"
    if "peak_gpu_mb" in r:
        text += f", peak GPU {r['peak_gpu_mb']:.0f} MB"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=str(REPO / "params.yaml"))
    parser.add_argument("--overlay", action="append", default=[])
    parser.add_argument("--methods", nargs="*", default=None, help="default: every registered")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=None, help="default: the method's batch")
    parser.add_argument("--repeats", type=int, default=10, help="timed inference passes")
    parser.add_argument("--train-steps", type=int, default=3, help="timed steps (0: skip)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--device", default=None, help="cpu | cuda (default: cuda if present)")
    parser.add_argument(
        "--no-keep-memory",
        action="store_true",
        help="leave glibc's default (unmap large freed blocks) for comparison",
    )
    parser.add_argument(
        "--omp-wait",
        default="PASSIVE",
        help="OMP_WAIT_POLICY of the runs: PASSIVE (as the medfuse CLI sets), ACTIVE, or ''",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.one:
        print(json.dumps(run_one(args)))
        return

    from medfuse.methods.registry import method_names

    methods = args.methods or method_names()
    print(
        f"# {args.size}x{args.size}, device {args.device}, load (1/5 min) {load()}, "
        f"{os.cpu_count()} CPUs, OMP_WAIT_POLICY={args.omp_wait or 'from the environment'}"
    )
    rows = []
    for name in methods:
        cmd = [sys.executable, __file__, "--one", name, *sys.argv[1:]]
        env = dict(os.environ)
        if args.omp_wait:  # read by OpenMP at start-up, hence a fresh process per method
            env["OMP_WAIT_POLICY"] = args.omp_wait
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        try:
            row = json.loads(done.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            row = {"method": name, "error": done.stderr.strip().splitlines()[-1:] or "failed"}
        rows.append(row)
        print(format_row(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
