"""What a pass over a large pool keeps: resident memory against the pool size, for three batch layouts.

The pool is generated lazily (a ``__getitems__`` dataset that makes each batch from its indices), so the
data never sits in memory and whatever the process keeps is the scoring's. Each measurement runs in a fresh
process: ``fastdal.score`` with a ``layers="last"`` gradient on ``Linear(64, 512)-ReLU-Linear(512, 100)``
over N samples in batches of 4096, then the resident set (VmRSS) after the call with the results alive,
minus before, against the bytes of the results themselves (score, sq_norm, dot: 4 bytes each; pseudo label:
8 bytes; 20 bytes a sample). A no-grad forward over the same pool is the baseline of the peak.

    python bench/bench_pool_memory.py                  # 1e5 and 1e6 samples; bench/results/pool-memory-cpu.json
    python bench/bench_pool_memory.py --sizes 20000 200000 --out -   # smaller, printed only
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = ("tensor", "tuple", "dict")
RESULT_BYTES_PER_SAMPLE = 4 + 4 + 4 + 8


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure_here(n: int, layout: str, what: str, batch: int = 4096) -> dict:
    """One measurement in this process (call it in a fresh one)."""
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, Dataset

    import fastdal

    torch.manual_seed(0)

    class LazyPool(Dataset):
        """Samples made from their indices on demand, a batch at a time."""

        def __len__(self) -> int:
            return n

        def __getitems__(self, indices: list[int]):
            g = torch.Generator().manual_seed(indices[0])
            x = torch.randn(len(indices), 64, generator=g)
            y = torch.zeros(len(indices), dtype=torch.long)
            return x if layout == "tensor" else (x, y) if layout == "tuple" else {"x": x, "label": y}

    def collate(b):
        return b  # __getitems__ already returns the batch

    model = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 100)).eval()
    loader = DataLoader(LazyPool(), batch_size=batch, collate_fn=collate)
    inputs = (lambda b: b["x"]) if layout == "dict" else (lambda b: b[0]) if layout == "tuple" else None
    labeled = [(torch.randn(256, 64), torch.randint(0, 100, (256,)))]
    grad = fastdal.labeled_grad(model, labeled, layers="last")
    first = next(iter(loader))  # warm up allocator, threads and lazy imports before the baseline
    with torch.no_grad():
        model(first if layout == "tensor" else inputs(first))
    del first
    before = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current resident set
    if what == "forward":
        with torch.no_grad():
            for b in loader:
                model(b if layout == "tensor" else inputs(b))
        result = None
    else:
        result = fastdal.score(model, loader, grad, return_components=True, inputs=inputs)
    retained, peak = _status("VmRSS") - before, _status("VmHWM") - before
    kept = 0 if result is None else sum(t.numel() * t.element_size() for t in result)
    return {"n": n, "layout": layout, "what": what, "retained": retained, "peak": peak, "result_bytes": kept}


def measure(n: int, layout: str, what: str) -> dict:
    """:func:`measure_here` in a fresh process."""
    out = subprocess.run(
        [sys.executable, __file__, "--one", json.dumps([n, layout, what])], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "pool-memory-cpu.json"))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_here(*json.loads(args.one))))
        return
    rows = [measure(n, layout, what) for layout in LAYOUTS for n in args.sizes for what in ("score", "forward")]
    mib = 2**20
    print("layout  samples    what     retained MiB  peak MiB  results MiB")
    for r in rows:
        print(
            f"{r['layout']:7} {r['n']:>9} {r['what']:8} {r['retained'] / mib:12.1f} {r['peak'] / mib:9.1f} "
            f"{r['result_bytes'] / mib:11.1f}"
        )
    small, large = min(args.sizes), max(args.sizes)
    growth = {}
    for layout in LAYOUTS:
        by = {r["n"]: r for r in rows if r["layout"] == layout and r["what"] == "score"}
        kept = by[large]["retained"] - by[small]["retained"]
        growth[layout] = (kept - (by[large]["result_bytes"] - by[small]["result_bytes"])) / (large - small)
        print(f"{layout}: retained growth beyond the results: {growth[layout]:.1f} bytes per sample")
    if args.out != "-":
        from machine import cpu_name

        Path(args.out).write_text(
            json.dumps({"machine": cpu_name(), "rows": rows, "growth_beyond_results_per_sample": growth}, indent=1)
            + "\n"
        )
        print(f"written: {args.out}")


if __name__ == "__main__":
    main()
