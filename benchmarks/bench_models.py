"""Cost of every registered method: parameters, MACs, inference and training speed, peak memory,
for the learned methods in float32 and in bfloat16 (autocast) side by side.

    python benchmarks/bench_models.py                      # every method, paper settings, CPU
    python benchmarks/bench_models.py --methods wdualmine --train-steps 5
    python benchmarks/bench_models.py --methods wdualmine --precisions float32
    python benchmarks/bench_models.py --train-methods wdualmine asfe-fusion   # peers: slow
    python benchmarks/bench_models.py --overlay workflow/profiles/quick/params.yaml
    python benchmarks/bench_models.py --methods mmif-amin dm-fnet dm-fnet:stage1 \
        --train-methods mmif-amin dm-fnet dm-fnet:stage1 --precisions float32 --threads 1

Each (method, precision) runs in its own subprocess so its peak memory is its own; a learned
method's float32 and bfloat16 runs follow each other, and a line gives the float32/bfloat16
ratios and how far the two fused images of the same pair (same seed, untrained weights) are
apart. Figures are printed with the machine's load average (`os.getloadavg`) taken around each
measurement: on a shared machine a timing means little without it. The CT-MRI epoch estimate
multiplies the measured seconds per training step by the steps of one paper-profile epoch (160
train pairs / batch size). Only W-DUALMINE's training is timed by default: one step of a peer
takes 20-35 s on 2 CPU cores. A training step uses the method's own crop size
(`methods.<m>.train.image_size`, else `train.image_size`; whole `--size` images when null).
A separately trained stage is named `<method>:stage1` (DM-FNet's diffusion U-Net): it is
benchmarked for training only, since it does not fuse.
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
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CT_MRI_TRAIN_PAIRS = 160  # the dataset's CT-MRI train folder
PRECISIONS = ("float32", "bfloat16")


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.2f}/{five:.2f}"


def timed(
    fn: Any, repeats: int, warmup: int, sync: Any, cpu: list[float] | None = None
) -> list[float]:
    """Wall seconds of each timed call; `cpu` (if given) receives the process's CPU seconds,
    all threads together, which a shared machine's load distorts less than wall time."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        sync()
        times.append(time.perf_counter() - start)
        if cpu is not None:
            cpu.append(time.process_time() - start_cpu)
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


def smooth_pair(size: int) -> tuple[Any, Any]:
    """An image-like (1, 1, size, size) pair: a bright blob, a disc and a ramp (noise-free)."""
    import torch

    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    a = torch.exp(-((xx - 0.5) ** 2 + (yy - 0.5) ** 2) / 0.05) * 0.8
    b = (((xx - 0.3) ** 2 + (yy - 0.6) ** 2) < 0.08).float() * 0.6 + yy * 0.3
    return a[None, None].contiguous(), b[None, None].contiguous()


def bench_inference(model: Any, args: argparse.Namespace, ctx: Any, sync: Any) -> dict[str, Any]:
    import numpy as np
    import torch

    a1, b1 = (t.to(args.device) for t in smooth_pair(args.size))
    model.eval()
    result: dict[str, Any] = {"load_before_infer": load()}
    with torch.no_grad(), ctx():
        fused = model(a1, b1)
        times = timed(lambda: model(a1, b1), args.repeats, 3, sync)
    result.update(infer_ms_median=1e3 * statistics.median(times), infer_ms_min=1e3 * min(times))
    result["load_after_infer"] = load()
    if args.fused_out:
        np.save(args.fused_out, fused[0, 0].double().cpu().numpy())
    result["fused_dtype"] = str(fused.dtype).removeprefix("torch.")
    return result


def bench_training(
    model: Any, config: dict, args: argparse.Namespace, ctx: Any, sync: Any
) -> dict[str, Any]:
    import torch

    batch = args.batch or int(config.get("optim", {}).get("batch_size", 8))
    size = args.train_size
    g = torch.Generator().manual_seed(1)
    a = torch.rand(batch, 1, size, size, generator=g).to(args.device)
    b = torch.rand(batch, 1, size, size, generator=g).to(args.device)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-5)
    losses: list[float] = []

    def step() -> None:
        with ctx():
            loss, _ = model.training_loss(a, b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))

    result: dict[str, Any] = {"load_before_train": load()}
    cpu: list[float] = []
    times = timed(step, args.train_steps, 1, sync, cpu)
    s_step = statistics.median(times)
    result.update(
        batch=batch,
        train_size=size,
        train_s_per_step=s_step,
        train_s_per_step_min=min(times),
        train_cpu_s_per_step=statistics.median(cpu),
        train_images_per_s=batch / s_step,
        ct_mri_epoch_s=s_step * math.ceil(CT_MRI_TRAIN_PAIRS / batch),
        train_steps_timed=len(times),
        train_losses=losses,
        weights_dtypes=sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()}),
        load_after_train=load(),
    )
    return result


def bench_learned(name: str, config: dict, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from medfuse.models import build_learned
    from medfuse.precision import autocast

    device = args.device
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    torch.manual_seed(0)
    model = build_learned(name, config, "CT-MRI").to(device)
    result: dict[str, Any] = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }

    def ctx() -> Any:
        return autocast(args.precision, device)

    if ":" not in name:  # a separately trained stage does not fuse
        a1, b1 = (t.to(device) for t in smooth_pair(args.size))
        model.eval()
        result.update(count_macs(model, a1, b1))
        result.update(bench_inference(model, args, ctx, sync))
    if args.train_steps > 0 and name in args.train_methods:
        result.update(bench_training(model, config, args, ctx, sync))
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


def bench_config(params: dict, name: str) -> dict[str, Any]:
    """A method's settings; `<method>:stage1` is that method's `stage1` section (learned)."""
    from medfuse.config import method_config

    method, _, stage = name.partition(":")
    config = method_config(params, method)
    return {"kind": "learned", **config[stage]} if stage else config


def train_size(params: dict, config: dict, size: int) -> int:
    """The side of a training crop: the method's train.image_size, else the global one."""
    train = {**params.get("train", {}), **config.get("train", {})}
    return int(train.get("image_size") or size)


def run_one(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from medfuse.config import load_params

    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.no_keep_memory:
        from medfuse.memory import keep_freed_memory

        keep_freed_memory()  # as `medfuse train` and `medfuse fuse` do
    params = load_params(args.params, args.overlay)
    config = bench_config(params, args.one)
    args.train_size = train_size(params, config, args.size)
    rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kind = config["kind"]
    if kind == "learned":
        result = bench_learned(args.one, config, args)
        result["precision"] = args.precision
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
    label = f"{r['method']} {r['precision']}" if "precision" in r else r["method"]
    text = f"{label:<21} params {r['parameters']:>10,}"
    if r.get("trainable", r["parameters"]) != r["parameters"]:
        text += f" ({r['trainable']:,} trainable)"
    if "infer_ms_median" in r:
        text += (
            f"  infer {r['infer_ms_median']:8.1f} ms (min {r['infer_ms_min']:.1f})"
            f"  [load {r['load_before_infer']} -> {r['load_after_infer']}]"
        )
    if "gmacs" in r:
        text += f"\n{'':<21} MACs {r['gmacs']:.3f} G/pair ({2 * r['gmacs']:.2f} GFLOP)"
        if "gmacs_thop" in r:
            text += f" (thop, layers only: {r['gmacs_thop']:.3f} G)"
    if "train_s_per_step" in r:
        text += (
            f"\n{'':<21} train batch {r['batch']} x {r['train_size']}²: "
            f"{r['train_s_per_step']:.2f} s/step "
            f"(min {r['train_s_per_step_min']:.2f}, {r['train_steps_timed']} steps; "
            f"CPU {r['train_cpu_s_per_step']:.2f} s/step, all threads), "
            f"{r['train_images_per_s']:.2f} images/s  [load {r['load_before_train']} -> "
            f"{r['load_after_train']}]"
            f"\n{'':<21} CT-MRI paper epoch (160 pairs): ~{r['ct_mri_epoch_s']:.0f} s "
            "(extrapolated from the timed steps)"
        )
    text += f"\n{'':<21} peak RSS {r['peak_rss_mb']:.0f} MB (start {r['rss_start_mb']:.0f} MB)"
    if "peak_gpu_mb" in r:
        text += f", peak GPU {r['peak_gpu_mb']:.0f} MB"
    return text


def compare_precisions(rows: dict[str, dict[str, Any]], fused: dict[str, Path]) -> str | None:
    """float32 / bfloat16 ratios of time and memory, and the fused images' difference."""
    import numpy as np

    f32, bf16 = rows.get("float32"), rows.get("bfloat16")
    if not f32 or not bf16 or "error" in f32 or "error" in bf16:
        return None
    parts = []
    if "infer_ms_median" in f32 and "infer_ms_median" in bf16:
        parts.append(f"infer x{f32['infer_ms_median'] / bf16['infer_ms_median']:.2f}")
    if "train_s_per_step" in f32 and "train_s_per_step" in bf16:
        parts.append(f"train step x{f32['train_s_per_step'] / bf16['train_s_per_step']:.2f}")
        parts.append(
            f"(CPU time x{f32['train_cpu_s_per_step'] / bf16['train_cpu_s_per_step']:.2f})"
        )
        gap = abs(f32["train_losses"][-1] - bf16["train_losses"][-1])
        parts.append(f"loss after {len(f32['train_losses'])} steps {gap:.2e} apart")
    parts.append(f"peak RSS x{f32['peak_rss_mb'] / bf16['peak_rss_mb']:.2f}")
    if all(p.is_file() for p in fused.values()):
        diff = np.abs(np.load(fused["float32"]) - np.load(fused["bfloat16"]))
        parts.append(f"fused |f32 - bf16| max {diff.max():.2e} (mean {diff.mean():.1e})")
    return f"{rows['float32']['method']:<21} float32/bfloat16: " + ", ".join(parts)


def cpu_line() -> str:
    import torch

    from medfuse.precision import resolve_precision

    caps = getattr(torch.cpu, "get_capabilities", dict)()
    flags = [k for k in ("amx_bf16", "avx512_bf16", "avx512_f") if caps.get(k)]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return (
        f"# CPU bf16 features: {', '.join(flags) or 'none'}; "
        f"train.precision auto -> {resolve_precision('auto', device)} on {device}"
    )


def run_subprocess(name: str, precision: str | None, fused_out: Path | None) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--one", name, *sys.argv[1:]]
    if precision is not None:
        cmd += ["--precision", precision]
    if fused_out is not None:
        cmd += ["--fused-out", str(fused_out)]
    env = dict(os.environ)
    omp_wait = _arg_value("--omp-wait", "PASSIVE")
    if omp_wait:  # read by OpenMP at start-up, hence a fresh process per run
        env["OMP_WAIT_POLICY"] = omp_wait
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    try:
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"method": name, "error": done.stderr.strip().splitlines()[-1:] or "failed"}


def _arg_value(flag: str, default: str) -> str:
    argv = sys.argv[1:]
    return argv[argv.index(flag) + 1] if flag in argv[:-1] else default


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=str(REPO / "params.yaml"))
    parser.add_argument("--overlay", action="append", default=[])
    parser.add_argument("--methods", nargs="*", default=None, help="default: every registered")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=None, help="default: the method's batch")
    parser.add_argument("--repeats", type=int, default=10, help="timed inference passes")
    parser.add_argument("--train-steps", type=int, default=3, help="timed steps (0: skip)")
    parser.add_argument(
        "--train-methods",
        nargs="*",
        default=["wdualmine"],
        help="learned methods whose training step is timed (default: wdualmine; peers are slow)",
    )
    parser.add_argument(
        "--precisions",
        default="float32,bfloat16",
        help="comma-separated precisions of the learned methods (default: both)",
    )
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
    parser.add_argument("--precision", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--fused-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    precisions = [p for p in args.precisions.split(",") if p]
    unknown = sorted(set(precisions) - set(PRECISIONS))
    if unknown:
        parser.error(f"--precisions: unknown {unknown}; use {', '.join(PRECISIONS)}")
    args.precision_list = precisions
    return args


def main() -> None:
    args = parse_args()
    if args.one:
        print(json.dumps(run_one(args)))
        return

    from medfuse.config import load_params
    from medfuse.methods.registry import method_names

    params = load_params(args.params, args.overlay)
    methods = args.methods or method_names()
    print(
        f"# {args.size}x{args.size}, device {args.device}, load (1/5 min) {load()}, "
        f"{os.cpu_count()} CPUs, OMP_WAIT_POLICY={args.omp_wait or 'from the environment'}"
    )
    print(cpu_line())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in methods:
            learned = bench_config(params, name).get("kind") == "learned"
            by_precision: dict[str, dict[str, Any]] = {}
            fused: dict[str, Path] = {}
            for precision in args.precision_list if learned else [None]:
                out = Path(tmp) / f"{name}-{precision}.npy" if learned else None
                row = run_subprocess(name, precision, out)
                rows.append(row)
                print(format_row(row), flush=True)
                if precision is not None and out is not None:
                    by_precision[precision], fused[precision] = row, out
            line = compare_precisions(by_precision, fused)
            if line:
                print(line, flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
