"""One workload in one process: agreement of every method with fastdal, interleaved timing, contention.

1. Each method is prepared and run once. That run is the warm-up and gives the scores checked against
   fastdal's: the error of a component is ``max_u |x_u - fastdal_u| / max_u |fastdal_u|`` over the pool (a
   dot product near zero for some sample would make a per-sample relative error meaningless), for
   ``||g_u||^2``, ``<g_u, G>`` and the score ``||g_u||^2 + 2 <g_u, G>``. fastdal itself is
   checked against the float64 per-sample reference (``fastdal.reference``) on the first few pool samples,
   so that a disagreement can be told apart from fastdal's own error. A method that raises is recorded with
   the reason and left out from then on.
2. Rounds: every method once per round, the order rotated from round to round so that none always runs
   right after the same neighbour; the median over rounds is the method's time. A peer whose first call took
   more than SLOW_FACTOR training steps is timed by that call alone: its one-off costs (wrapping, tracing)
   are well under a second, a few percent of its time at most, its ratios are far from any target, and more
   calls would take most of the benchmark's time. Every other timing repeats the call until MIN_SECONDS have
   passed and takes the mean per call.
3. With ``--background-load``: alternating rounds of the training step and fastdal with the background load
   paused and running (contention.py); each one's slowdown is its median loaded time over its median quiet one.

    python bench/peers/worker.py WORKLOAD OUT.json [--rounds 3] [--background-load] [--load-rounds 5] [--batches N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import traceback
import warnings
from collections.abc import Callable

import torch
from contention import BackgroundLoad
from methods import METHODS, Scores, Setup, build_setup, workload
from torch import Tensor

import fastdal

REFERENCE_SAMPLES = 8  # pool samples checked against the float64 reference
SLOW_FACTOR = 10.0  # peers slower than this many training steps are timed by their first call
MIN_SECONDS = 0.5  # one timing repeats a method's call until this much time has passed


def _reason(err: BaseException) -> str:
    """The exception as one line: type and the first line of its message (Opacus packs a list of errors)."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {text}"[:400]


def _error(x: Tensor | None, ref: Tensor) -> float | None:
    if x is None:
        return None
    return ((x.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def _timed(fn: Callable[[], Scores]) -> float:
    """Seconds per call: calls repeated until MIN_SECONDS have passed, so that a pass of a few milliseconds
    (the MLP, the head) is not one sample of the scheduler's noise, least of all under load."""
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= MIN_SECONDS:
            return elapsed / calls


def _reference_check(setup: Setup, fastdal_scores: Scores) -> dict:
    """fastdal (float32) against the float64 per-sample loop on the first pool samples."""
    n = min(REFERENCE_SAMPLES, setup.pool[0].shape[0])
    ref = fastdal.reference.score(
        setup.model, [(setup.pool[0][:n],)], setup.labeled_grad, dtype=torch.float64, return_components=True
    )
    assert fastdal_scores.sq_norm is not None and fastdal_scores.dot is not None
    return {
        "samples": n,
        "sq_norm_max_rel_err": _error(fastdal_scores.sq_norm[:n], ref.sq_norm),
        "dot_max_rel_err": _error(fastdal_scores.dot[:n], ref.dot),
    }


def run(name: str, rounds: int, background_load: bool, load_rounds: int, quick: bool, batches: int | None) -> dict:
    w = workload(name, quick, batches)
    setup = build_setup(name, quick, batches)
    record: dict = {
        "workload": name,
        "load_average_at_start": os.getloadavg(),
        "label": w.label,
        "batch": w.batch,
        "pool": w.pool_size,
        "layers": w.layers,
        "parameters": sum(p.numel() for p in setup.model.parameters()),
        "scored_parameters": sum(g.numel() for g in setup.G.values()),
        "notes": list(w.notes),
        "threads": torch.get_num_threads(),
        "methods": {},
    }
    runs: dict[str, Callable[[], Scores]] = {}
    outputs: dict[str, Scores] = {}
    for method in METHODS.values():
        entry: dict = {"kind": method.kind, "error": None, "warnings": []}
        record["methods"][method.name] = entry
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                fn = method.prepare(setup)
                start = time.perf_counter()
                outputs[method.name] = fn()
                entry["first_call_seconds"] = time.perf_counter() - start
                runs[method.name] = fn
            except Exception as err:
                entry["error"] = _reason(err)
                entry["traceback"] = traceback.format_exc(limit=-3)
        entry["warnings"] = sorted({str(c.message).splitlines()[0][:300] for c in caught})
        print(f"  {name}: {method.name}: {'ok' if entry['error'] is None else entry['error']}", flush=True)

    reference = outputs.get("fastdal")
    if reference is not None:
        record["fastdal_vs_float64_reference"] = _reference_check(setup, reference)
        for method_name, scores in outputs.items():
            if scores.sq_norm is None or method_name == "fastdal":
                continue
            assert reference.sq_norm is not None and reference.dot is not None
            entry = record["methods"][method_name]
            entry["sq_norm_max_rel_err"] = _error(scores.sq_norm, reference.sq_norm)
            entry["dot_max_rel_err"] = _error(scores.dot, reference.dot)
            if scores.dot is not None:  # the score the query ranks by (gamma = 2)
                entry["score_max_rel_err"] = _error(
                    scores.sq_norm + 2 * scores.dot, reference.sq_norm + 2 * reference.dot
                )

    warnings.simplefilter("ignore")  # each method's warnings are recorded above, once
    train_first = record["methods"]["train step"].get("first_call_seconds")
    timed: dict[str, list[float]] = {}
    for k in runs:
        entry = record["methods"][k]
        slow = (
            entry["kind"] in ("score", "norm")
            and train_first
            and entry["first_call_seconds"] > SLOW_FACTOR * train_first
        )
        entry["timed_by"] = "first call" if slow else f"{rounds} rounds after the first call"
        timed[k] = [entry["first_call_seconds"]] if slow else []
    order = [k for k in runs if not timed[k]]
    for r in range(rounds):
        for k in order[r % len(order) :] + order[: r % len(order)]:
            timed[k].append(_timed(runs[k]))
        print(f"  {name}: round {r + 1}/{rounds} done", flush=True)
    for k, values in timed.items():
        record["methods"][k]["seconds_all"] = values
        record["methods"][k]["seconds_median"] = statistics.median(values)

    if background_load and "fastdal" in runs:
        record["contention"] = _contention(runs, load_rounds)
    record["load_average_at_end"] = os.getloadavg()  # 1, 5, 15 min: other jobs on the machine show here
    return record


def _contention(runs: dict[str, Callable[[], Scores]], load_rounds: int) -> dict:
    pair = ["train step", "fastdal"]
    quiet: dict[str, list[float]] = {k: [] for k in pair}
    loaded: dict[str, list[float]] = {k: [] for k in pair}
    with BackgroundLoad() as load:
        for r in range(load_rounds):
            # alternate which state and which method go first, so neither is favoured by drift
            for state in ("quiet", "loaded") if r % 2 == 0 else ("loaded", "quiet"):
                (load.pause if state == "quiet" else load.resume)()
                for k in pair if r % 2 == 0 else pair[::-1]:
                    (quiet if state == "quiet" else loaded)[k].append(_timed(runs[k]))
    out: dict = {}
    for k in pair:
        q, lo = statistics.median(quiet[k]), statistics.median(loaded[k])
        out[k] = {"quiet_seconds": quiet[k], "loaded_seconds": loaded[k], "slowdown": lo / q}
    out["fastdal_slowdown_over_train_step"] = out["fastdal"]["slowdown"] / out["train step"]["slowdown"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workload")
    parser.add_argument("out")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--background-load", action="store_true")
    parser.add_argument("--load-rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batches", type=int, default=None, help="pool batches (default: the workload's)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, all cores)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    record = run(args.workload, args.rounds, args.background_load, args.load_rounds, args.quick, args.batches)
    with open(args.out, "w") as f:
        json.dump(record, f, indent=2)


if __name__ == "__main__":
    main()
