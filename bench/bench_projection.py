"""How projected gradient features approach the exact ones as the rank grows.

The paper's vanilla CNN is trained on 100 of scikit-learn's digits, as in the demo; for a pool of
300 other digits and each rank ``r`` over several seeds this measures:

* the relative error ``||K_r - K|| / ||K||`` of the Gram matrix of the projected blocks (the
  convolutions; the head is exact at every rank), median and range over seeds;
* the Spearman correlation of the projected dynamic-AL scores with the exact ``layers="all"`` ones;
* the features' size per sample against the model's parameter count.

Writes ``bench/results/projection-cpu.json`` and the table of ``docs/features.md``.

    python bench/bench_projection.py
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch
from machine import cpu_name
from torch.utils.data import DataLoader, TensorDataset

import fastdal
from fastdal.demo import load_digits, train
from fastdal.features import ProjectedBlock
from fastdal.models import VanillaCNN

ROOT = Path(__file__).parent.parent
RANKS = (2, 4, 8, 16, 24, 32)
SEEDS = range(5)


def projected_gram(features: fastdal.GradFeatures) -> torch.Tensor:
    return sum(b.inner(slice(None), slice(None)) for b in features.blocks if isinstance(b, ProjectedBlock))


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ranks = [torch.argsort(torch.argsort(t.double())).double() for t in (a, b)]
    return float(torch.corrcoef(torch.stack(ranks))[0, 1])


def main() -> None:
    x, y = load_digits()
    x = x.double()
    torch.manual_seed(0)
    model = VanillaCNN(in_channels=1, num_classes=10).double()
    train(model, x[:100], y[:100], steps=150, seed=0)
    pool = DataLoader(TensorDataset(x[100:400]), batch_size=100)
    G = fastdal.labeled_grad(model, DataLoader(TensorDataset(x[:100], y[:100]), batch_size=100), layers="all")
    exact_scores = fastdal.score(model, pool, G)
    exact_gram = projected_gram(fastdal.features(model, pool, layers="all", rank=4096))
    parameters = sum(p.numel() for p in model.parameters())
    rows = []
    for rank in RANKS:
        errors, correlations = [], []
        for seed in SEEDS:
            f = fastdal.features(model, pool, layers="all", rank=rank, seed=seed)
            errors.append(((projected_gram(f) - exact_gram).norm() / exact_gram.norm()).item())
            correlations.append(spearman(f.score(G), exact_scores))
        rows.append(
            {
                "rank": rank,
                "floats_per_sample": f.floats_per_sample,
                "fraction_of_parameters": f.floats_per_sample / parameters,
                "gram_error": errors,
                "spearman": correlations,
            }
        )
        print(rows[-1])
    report = {
        "device": cpu_name(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "fastdal": fastdal.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "parameters": parameters,
        "seeds": len(SEEDS),
        "rows": rows,
    }
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "projection-cpu.json").write_text(json.dumps(report, indent=2) + "\n")
    write_table(rows, parameters)


def write_table(rows: list[dict], parameters: int) -> None:
    lines = [
        "| rank | floats per sample | % of parameters | Gram error, median (min-max) "
        "| Spearman vs exact, median (min) |",
        "|---:|---:|---:|---|---|",
    ]
    for r in rows:
        err = torch.tensor(r["gram_error"])
        rho = torch.tensor(r["spearman"])
        lines.append(
            f"| {r['rank']} | {r['floats_per_sample']} | {100 * r['fraction_of_parameters']:.2f}% | "
            f"{err.median():.3f} ({err.min():.3f}-{err.max():.3f}) | {rho.median():.3f} ({rho.min():.3f}) |"
        )
    table = "\n".join(lines) + f"\n\n({len(SEEDS)} seeds per rank; the model has {parameters} parameters)"
    docs = ROOT / "docs" / "features.md"
    start, end = "<!-- bench_projection:start -->", "<!-- bench_projection:end -->"
    head, rest = docs.read_text().split(start, 1)
    _, tail = rest.split(end, 1)
    docs.write_text(f"{head}{start}\n{table}\n{end}{tail}")
    print(table)


if __name__ == "__main__":
    main()
