"""Streamed image domains: memory and speed bars (a script, not a timed test).

    python benchmarks/streamed_images.py [--work DIR] [--sizes 2000 16000] [--steps 200]

1. **Peak memory does not grow with the number of images.**  Two generated
   image-folder pairs, 2,000 and 16,000 small JPEGs per domain (same image
   size, same batch size), each run as a 200-step ``source-only`` run of an
   ``imagefolder`` suite (``dabench.runner.Runner.run_one``: split, training
   and the whole evaluation with every validator) in a fresh process.  The
   peak RSS of the run's process (``VmHWM``) and of its loader workers
   (``RUSAGE_CHILDREN``) are reported; the bar is ``peak(16k) / peak(2k) <= 1.2``.
2. **Streamed steps/s >= 0.8x in-memory steps/s** with a small CNN (the
   default backbone, DANN's MNIST extractor) on the same images: the
   in-memory path trains on the images decoded once into float arrays
   (``TensorBatches`` on tensors), the streamed path decodes every batch in
   loader workers (``TensorBatches`` on an ``ImageStream``), same seed, same
   batches, no augmentation; and the streamed path with ``crop-flip``
   augmentation.  Decode cost is shown apart: decoding the whole domain once
   in one process (what the in-memory path pays before training), and per
   batch.

Everything runs with one torch thread (``--threads``), and the script prints
the load average before and after: on a shared machine the timings depend
on the load.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CLASSES = tuple(f"c{k}" for k in range(10))


def make_folder(root: Path, n: int, size: int, seed: int, shift: float) -> Path:
    """``n`` JPEGs of ``size``x``size`` under ``root/<class>/`` (10 classes)."""
    import numpy as np
    from PIL import Image

    done = root / ".complete"
    if done.exists() and done.read_text() == f"{n} {size} {seed} {shift}":
        return root
    rng = np.random.default_rng(seed)
    for k, c in enumerate(CLASSES):
        (root / c).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        k = i % len(CLASSES)
        img = np.zeros((size, size, 3))
        img[:, :, k % 3] = 150.0
        img[(3 * k) % size: (3 * k) % size + 4] += 80.0
        img += 40.0 * shift + rng.normal(0.0, 30.0, size=img.shape)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / CLASSES[k] / f"{i:06d}.jpg", quality=90)
    done.write_text(f"{n} {size} {seed} {shift}")
    return root


def write_suite(work: Path, n: int, size: int, steps: int, batch: int, augment: str = "none") -> Path:
    src = make_folder(work / f"src{n}", n, size, 0, 0.0)
    tgt = make_folder(work / f"tgt{n}", n, size, 1, 1.0)
    path = work / f"suite{n}-{augment}.toml"
    path.write_text(f"""
name = "bench{n}"
seeds = 1
pairs = ["src:tgt"]
[protocol]
augment = "{augment}"
[budget]
steps = {steps}
batch_size = {batch}
[domains.src]
path = "{src}"
format = "imagefolder"
label_space = "bench10"
size = [{size}, {size}]
resize = [{size}, {size}]
[domains.tgt]
path = "{tgt}"
format = "imagefolder"
label_space = "bench10"
size = [{size}, {size}]
resize = [{size}, {size}]
[methods.source-only]
""")
    return path


def _vmhwm_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def child_rss(suite: str, threads: int) -> dict:
    """One run of ``suite`` in this (fresh) process: peak RSS of the process and its workers."""
    import torch

    torch.set_num_threads(threads)
    from dabench.plugins import get_registry
    from dabench.runner import Runner
    from dabench.suite import parse_suite

    registry = get_registry()
    (spec,) = parse_suite(suite, registry).expand(registry)
    t0 = time.perf_counter()
    r = Runner(registry, None).run_one(spec)
    return {"status": r.status, "reason": r.reason, "target_acc": r.target_acc, "wall_s": time.perf_counter() - t0,
            "fit_s": r.wall_time_s, "peak_rss_mb": _vmhwm_mb(),
            "workers_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0}


def child_speed(suite: str, threads: int, steps: int, batch: int) -> dict:
    """Steps/s of the training loop on the streamed domain and on its decoded arrays."""
    import numpy as np
    import torch
    from torch import nn

    torch.set_num_threads(threads)
    from dabench.data.core import make_split
    from dabench.data.stream import sequential_specs, stream_batches
    from dabench.plugins import get_registry
    from dabench.suite import parse_suite
    from dabench.training import TensorBatches, make_sgd, seed_everything

    registry = get_registry()
    (pair,) = parse_suite(suite, registry).pairs
    s, t = pair.domain("src", registry), pair.domain("tgt", registry)
    split = make_split(pair.name, s, t, s.load(None), t.load(None), 0, pair.protocol)
    X, y = split.source_train.X, split.source_train.y
    out: dict = {"n_train": len(X), "image": list(X.item_shape), "batch": batch, "steps": steps,
                 "augment": X.augment}

    t0, c0 = time.perf_counter(), time.process_time()
    arrays = X.materialize()
    out["decode_all_once_s"] = time.perf_counter() - t0
    out["decode_ms_per_image_one_process"] = 1000 * out["decode_all_once_s"] / len(X)
    out["decode_cpu_ms_per_image"] = 1000 * (time.process_time() - c0) / len(X)
    t0, c0 = time.perf_counter(), time.process_time()
    nb = 0
    for _ in stream_batches(X, sequential_specs(len(X), batch), workers=0):
        nb += 1
    out["decode_ms_per_batch_in_process"] = 1000 * (time.perf_counter() - t0) / nb
    out["decode_cpu_ms_per_batch"] = 1000 * (time.process_time() - c0) / nb

    def train(data) -> float:
        seed_everything(0)
        enc, dim = registry.backbones["default"](X.item_shape)
        head = nn.Linear(dim, pair.domain("src", registry).n_classes)
        opt = make_sgd(list(enc.parameters()) + list(head.parameters()), lr=0.01)
        tb = TensorBatches(data, y, batch_size=batch, seed=1)
        for _ in range(5):  # warm-up: loader workers start, first allocations
            b = tb.next()
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(steps):
            b = tb.next()
            loss = nn.functional.cross_entropy(head(enc(b.x)), b.y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        w0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        tb.close()  # stops (and reaps) the loader workers: their CPU time lands in RUSAGE_CHILDREN
        w1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        worker = (w1.ru_utime + w1.ru_stime) - (w0.ru_utime + w0.ru_stime)
        return steps / dt, 1000 * cpu / steps, 1000 * worker / (steps + 5)

    # alternate the two paths to spread the machine's load evenly
    mem, stream = [], []
    for _ in range(2):
        mem.append(train(arrays))
        stream.append(train(X))
    out["in_memory_steps_per_s"] = float(np.median([m[0] for m in mem]))
    out["streamed_steps_per_s"] = float(np.median([m[0] for m in stream]))
    out["streamed_over_in_memory"] = out["streamed_steps_per_s"] / out["in_memory_steps_per_s"]
    out["in_memory_cpu_ms_per_step"] = float(np.median([m[1] for m in mem]))
    out["streamed_cpu_ms_per_step_main"] = float(np.median([m[1] for m in stream]))
    out["streamed_cpu_ms_per_step_workers"] = float(np.median([m[2] for m in stream]))
    out["rounds"] = {"in_memory": mem, "streamed": stream}
    return out




def _child(args: list[str]) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    res = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise SystemExit(f"child {args} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/dabench-streamed-bench", help="where the image folders are generated")
    ap.add_argument("--sizes", type=int, nargs=2, default=[2000, 16000], help="images per domain, small and large")
    ap.add_argument("--image", type=int, default=32, help="image side in pixels (JPEG, decoded at this size)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--speed-steps", type=int, default=150)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", choices=["rss", "speed"], help="run one of the two measurements")
    ap.add_argument("--child", choices=["rss", "speed"], help=argparse.SUPPRESS)
    ap.add_argument("--suite", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child == "rss":
        print(json.dumps(child_rss(a.suite, a.threads)))
        return
    if a.child == "speed":
        print(json.dumps(child_speed(a.suite, a.threads, a.speed_steps, a.batch)))
        return

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    report: dict = {"load_average_before": os.getloadavg(), "cpus": os.cpu_count(), "threads": a.threads,
                    "loader_workers": os.environ.get("DABENCH_LOADER_WORKERS", "default")}
    rss = {}
    for n in (a.sizes if a.only != "speed" else []):
        suite = write_suite(work, n, a.image, a.steps, a.batch)
        rss[n] = _child(["--child", "rss", "--suite", str(suite), "--threads", str(a.threads)])
        print(f"{n:>6} images/domain: {json.dumps(rss[n])}", flush=True)
    small, large = a.sizes
    if rss:
        report["rss"] = rss
        report["rss_ratio_process"] = rss[large]["peak_rss_mb"] / rss[small]["peak_rss_mb"]
        report["rss_ratio_process_plus_worker"] = (
            (rss[large]["peak_rss_mb"] + rss[large]["workers_peak_rss_mb"])
            / (rss[small]["peak_rss_mb"] + rss[small]["workers_peak_rss_mb"]))
    speed = {}
    for augment in (("none", "crop-flip") if a.only != "rss" else ()):
        suite = write_suite(work, small, a.image, a.steps, a.batch, augment)
        speed[augment] = _child(["--child", "speed", "--suite", str(suite), "--threads", str(a.threads),
                                 "--batch", str(a.batch), "--speed-steps", str(a.speed_steps)])
        print(f"speed ({augment}): {json.dumps(speed[augment])}", flush=True)
    report["speed"] = speed
    report["load_average_after"] = os.getloadavg()
    print(json.dumps(report, indent=1))
    if rss:
        print(f"\npeak RSS {large} / {small} images per domain: process {report['rss_ratio_process']:.3f}, "
              f"process + loader worker {report['rss_ratio_process_plus_worker']:.3f} (bar <= 1.2; a forked "
              f"worker's RSS counts the pages it shares with the process)")
    for augment, sp in speed.items():
        print(f"steps/s, augment={augment}: streamed {sp['streamed_steps_per_s']:.1f} / in-memory "
              f"{sp['in_memory_steps_per_s']:.1f} = {sp['streamed_over_in_memory']:.2f} (bar >= 0.8); decode (one process, "
              f"wall / CPU) {sp['decode_ms_per_image_one_process']:.2f} / {sp['decode_cpu_ms_per_image']:.2f} ms "
              f"per image, {sp['decode_ms_per_batch_in_process']:.1f} / {sp['decode_cpu_ms_per_batch']:.1f} ms per "
              f"batch of {a.batch}; CPU ms/step: in-memory "
              f"{sp['in_memory_cpu_ms_per_step']:.1f}, streamed main process {sp['streamed_cpu_ms_per_step_main']:.1f} "
              f"+ loader worker {sp['streamed_cpu_ms_per_step_workers']:.1f}")


if __name__ == "__main__":
    main()
