"""Runs of the loop over a grid of datasets x strategies x seeds, and their CSV, markdown and PNG reports.

Runs are independent, so they go to worker processes (one torch thread each: on a small machine
several small models train faster side by side than one model on all cores).
"""

from __future__ import annotations

import csv
import functools
import multiprocessing
import os
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from .. import models
from . import data
from .loop import LoopConfig, run
from .pools import PoolSpec
from .strategies import make_strategy

MODELS = ("mlp", "cnn", "resnet", "vgg")
COLUMNS = (
    "setting",
    "dataset",
    "model",
    "strategy",
    "seed",
    "rounds",
    "round",
    "labeled",
    "accuracy",
    "best_accuracy",
    "train_loss",
    "train_accuracy",
    "epochs",
    "query_seconds",
    "class_recall",  # each class's test recall, ";"-separated in class order
)


def make_model(name: str, image_shape: tuple[int, int, int], num_classes: int) -> torch.nn.Module:
    c, h, w = image_shape
    if name == "mlp":
        return models.MLP(c * h * w, num_classes)
    if name == "cnn":
        return models.VanillaCNN(c, num_classes)
    if name == "resnet":
        return models.small_resnet(c, num_classes)
    if name == "vgg":
        return models.SmallVGG(c, num_classes)
    raise ValueError(f"model must be one of {MODELS}, got {name!r}")


@dataclass(frozen=True)
class Task:
    dataset: str
    model: str
    strategy: str
    config: LoopConfig
    setting: str = ""  # the name reports group runs by (default: dataset-model)
    data_dir: str | None = None  # where an IDX dataset's files are (default: where its package installs them)
    pool: PoolSpec | None = None  # train on a pool drawn from the training set (default: the whole set)

    @property
    def label(self) -> str:
        return self.setting or f"{self.dataset}-{self.model}"


def run_task(task: Task) -> list[dict]:
    """One run of the loop; rows of the CSV."""
    torch.set_num_threads(1)
    splits = _splits(task.dataset, task.data_dir, task.pool)

    def factory() -> torch.nn.Module:
        return make_model(task.model, splits.image_shape, splits.num_classes)

    records = run(splits.train, splits.test, factory, make_strategy(task.strategy), task.config)
    return [
        {
            "setting": task.label,
            "dataset": task.dataset,
            "model": task.model,
            "strategy": task.strategy,
            "seed": task.config.seed,
            "rounds": task.config.rounds,
            "round": r.round,
            "labeled": r.labeled,
            "accuracy": round(r.accuracy, 5),
            "best_accuracy": round(r.best_accuracy, 5),
            "train_loss": float(f"{r.train_loss:.4g}"),
            "train_accuracy": round(r.train_accuracy, 5),
            "epochs": r.epochs,
            "query_seconds": round(r.seconds, 4),
            "class_recall": ";".join(f"{v:.4f}" for v in r.class_recall),
        }
        for r in records
    ]


@functools.cache
def _splits(dataset: str, data_dir: str | None = None, pool: PoolSpec | None = None) -> data.Splits:
    """One split per dataset and pool (seeds vary the runs, not the pool or the test set), loaded once per worker
    process; with a pool only the pool is kept (the full training set is let go)."""
    splits = data.load(dataset, seed=0, data_dir=data_dir)
    return pool.apply(splits) if pool is not None else splits


def tasks(
    datasets: Iterable[str],
    model: str,
    strategies: Iterable[str],
    seeds: Iterable[int],
    config: LoopConfig,
    setting: str = "",
    data_dir: str | None = None,
    pool: PoolSpec | None = None,
) -> list[Task]:
    return [
        Task(d, model, s, replace(config, seed=seed), setting, data_dir, pool)
        for d in datasets
        for s in strategies
        for seed in seeds
    ]


def run_grid(all_tasks: list[Task], jobs: int | None = None, progress: bool | None = None) -> list[dict]:
    """Every task, on ``jobs`` processes (default: the CPU count); rows in task order."""
    jobs = jobs or os.cpu_count() or 1
    hide = progress is False
    if jobs == 1:
        results = [run_task(t) for t in tqdm(all_tasks, disable=hide, desc="fastdal.al")]
    else:
        with multiprocessing.get_context("spawn").Pool(jobs) as pool:
            results = list(tqdm(pool.imap(run_task, all_tasks), total=len(all_tasks), disable=hide, desc="fastdal.al"))
    return [row for rows in results for row in rows]


def write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def read_csv(path: Path) -> list[dict]:
    with path.open() as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for key in ("seed", "rounds", "round", "labeled", "epochs"):
            row[key] = int(row[key])
        for key in ("accuracy", "best_accuracy", "train_loss", "train_accuracy", "query_seconds"):
            row[key] = float(row[key])
        recall = row.get("class_recall") or ""  # absent from CSVs written before it was recorded
        row["class_recall"] = [float(v) for v in recall.split(";")] if recall else []
    return rows


def curves(rows: list[dict], metric: str = "accuracy") -> dict[str, dict[str, dict[int, list[float]]]]:
    """setting -> strategy -> labeled-set size -> ``metric`` (in %) over seeds."""
    table: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for row in rows:
        table[row["setting"]][row["strategy"]][row["labeled"]].append(100 * row[metric])
    return table


METRICS = {"accuracy": "final test accuracy", "best_accuracy": "best test accuracy within the round"}


def markdown(rows: list[dict], metric: str = "accuracy") -> str:
    """Per setting: ``metric`` (%) mean +- std over seeds, a column per labeled-set size."""
    parts = []
    for setting, by_strategy in curves(rows, metric).items():
        sizes = sorted({size for acc in by_strategy.values() for size in acc})
        seeds = max(len(v) for acc in by_strategy.values() for v in acc.values())
        parts.append(f"**{setting}** ({METRICS[metric]} %, mean +- std over {seeds} seeds; columns: labeled)\n")
        parts.append("| strategy | " + " | ".join(str(s) for s in sizes) + " | mean |")
        parts.append("|---|" + "---:|" * (len(sizes) + 1))
        for strategy, acc in by_strategy.items():
            cells = []
            for size in sizes:
                values = torch.tensor(acc.get(size, [float("nan")]))
                std = values.std().item() if len(values) > 1 else 0.0
                cells.append(f"{values.mean().item():.1f} +- {std:.1f}")
            overall = torch.tensor([sum(acc[s]) / len(acc[s]) for s in sizes if s in acc]).mean().item()
            parts.append(f"| {strategy} | " + " | ".join(cells) + f" | {overall:.1f} |")
        parts.append("")
    return "\n".join(parts)


def plot(rows: list[dict], directory: Path, prefix: str = "curves") -> list[Path]:
    """One PNG of learning curves (mean, shaded +- std) per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for setting, by_strategy in curves(rows).items():
        fig, ax = plt.subplots(figsize=(7, 4.5))
        colors = plt.get_cmap("tab20").colors  # up to fourteen strategies: tab10 would repeat colors
        for i, (strategy, acc) in enumerate(by_strategy.items()):
            sizes = sorted(acc)
            mean = torch.tensor([sum(acc[s]) / len(acc[s]) for s in sizes])
            std = torch.tensor([torch.tensor(acc[s]).std().item() if len(acc[s]) > 1 else 0.0 for s in sizes])
            style = "-" if strategy.startswith("dynamic") else "--"
            color = colors[(2 * i) % 20 + (2 * i) // 20]  # dark shades first, then the light ones
            ax.plot(sizes, mean, style, marker=".", label=strategy, color=color)
            ax.fill_between(sizes, mean - std, mean + std, alpha=0.1, color=color)
        ax.set_xlabel("labeled samples")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(setting)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        path = directory / f"{prefix}-{setting}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def config_dict(config: LoopConfig) -> dict:
    return asdict(config)
