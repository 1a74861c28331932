"""Ratios, the issue's targets, and the three outputs: the results file, the README table and the chart.

Every ratio is of two medians measured in the same process (the training step's and fastdal's rounds
interleave with the peers'), so the machine's drift mostly cancels; absolute seconds are kept in the
results file for reference only.
"""

from __future__ import annotations

import math
from pathlib import Path

# A method computes the same quantity as fastdal when its squared norms and its scores are within this of
# fastdal's (max |x - fastdal| / max |fastdal|). The dot alone is not held to it: where |<g, G>| is tiny next to
# ||g|| ||G|| (the K=10000 head), a float32 sum over millions of products loses most of its relative digits,
# while the score, which the query ranks by, keeps them (fastdal's dot is checked against float64 separately).
AGREE_TOL = 1e-3
PEERS = ["naive loop", "torch.func", "BackPACK", "Opacus", "Opacus ghost (norm only)"]
SHOWN = ["fastdal", *PEERS]  # methods in the chart

# The targets: (key, description, bound, whether the measured ratio must be >= or <= the bound)
TARGETS = {
    "faster_than_peers": ("fastdal >= 1.5x faster than the fastest agreeing peer computing the score", 1.5, ">="),
    "score_over_train_step": ("whole-model score <= 1.3x a training step", 1.3, "<="),
    "memory_over_train_step": ("peak extra memory <= 1.2x a training step's", 1.2, "<="),
    "last_over_forward": ("last-layer score <= 1.05x a no-grad forward", 1.05, "<="),
    "load_slowdown_over_train_step": ("under load, fastdal's slowdown <= 1.2x the training step's", 1.2, "<="),
}


def agrees(entry: dict) -> bool:
    errors = [entry.get("sq_norm_max_rel_err"), entry.get("score_max_rel_err")]
    known = [e for e in errors if e is not None]
    return bool(known) and all(e <= AGREE_TOL for e in known)


def add_ratios(record: dict) -> None:
    """Each method's time over the training step's and fastdal's, its memory over the training step's."""
    methods = record["methods"]
    train, fast = methods.get("train step", {}), methods.get("fastdal", {})
    for entry in methods.values():
        t, m = entry.get("seconds_median"), entry.get("peak_extra_bytes")
        entry["ratio_to_train_step"] = _ratio(t, train.get("seconds_median"))
        entry["ratio_to_fastdal"] = _ratio(t, fast.get("seconds_median"))
        entry["memory_ratio_to_train_step"] = _ratio(m, train.get("peak_extra_bytes"))
        if entry["kind"] in ("score", "norm") and entry.get("error") is None:
            entry["agrees_with_fastdal"] = agrees(entry)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def targets(record: dict) -> dict:
    """The targets that apply to this workload: {key: {"ratio", "bound", "holds", "what", ...}}."""
    methods = record["methods"]
    fast = methods.get("fastdal", {})
    out: dict = {}

    def put(key: str, ratio: float | None, **extra: object) -> None:
        what, bound, sense = TARGETS[key]
        holds = None if ratio is None else (ratio >= bound if sense == ">=" else ratio <= bound)
        out[key] = {"what": what, "bound": bound, "ratio": ratio, "holds": holds, **extra}

    peers = [
        (name, e["seconds_median"])
        for name, e in methods.items()
        if e["kind"] == "score" and e.get("seconds_median") is not None and e.get("agrees_with_fastdal")
    ]
    if peers and fast.get("seconds_median"):
        name, seconds = min(peers, key=lambda p: p[1])
        put("faster_than_peers", seconds / fast["seconds_median"], fastest_peer=name)
    else:
        put("faster_than_peers", None, fastest_peer=None)
    if record["layers"] == "all":
        put("score_over_train_step", fast.get("ratio_to_train_step"))
    else:
        put("last_over_forward", _ratio(fast.get("seconds_median"), methods["no-grad forward"].get("seconds_median")))
    put("memory_over_train_step", fast.get("memory_ratio_to_train_step"))
    if "contention" in record:
        put("load_slowdown_over_train_step", record["contention"]["fastdal_slowdown_over_train_step"])
    return out


def print_summary(record: dict) -> None:
    print(f"\n== {record['label']} (batch {record['batch']}, pool {record['pool']}, layers={record['layers']})")
    for name, e in record["methods"].items():
        if e.get("error"):
            print(f"  {name:26s} could not run: {e['error']}")
            continue
        err = _agreement(name, e, record)
        mem = e.get("peak_extra_bytes")
        peak = (
            "" if mem is None else f"peak +{mem / 2**20:7.1f} MiB ({_x(e['memory_ratio_to_train_step'])} train step's)"
        )
        print(
            f"  {name:26s} {e['seconds_median']:8.3f} s  {_x(e['ratio_to_train_step'])} train step  "
            f"{_x(e['ratio_to_fastdal'])} fastdal  {peak}  {err}"
        )
    if "contention" in record:
        c = record["contention"]
        train, fast = c["train step"]["slowdown"], c["fastdal"]["slowdown"]
        print(f"  under load: train step slowed {train:.2f}x, fastdal {fast:.2f}x")
    for t in record["targets"].values():
        verdict = "n/a (nothing to compare)" if t["holds"] is None else ("holds" if t["holds"] else "MISSES")
        ratio = "" if t["ratio"] is None else f" measured {t['ratio']:.2f}x"
        peer = f" (fastest agreeing peer: {t['fastest_peer']})" if t.get("fastest_peer") else ""
        print(f"  target: {t['what']}: {verdict}{ratio}{peer}")


def _x(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}x"


def _e(value: float | None) -> str:
    return "—" if value is None else f"{value:.0e}".replace("e-0", "e-")


def fastdal_is_wrong(record: dict) -> bool:
    """Whether fastdal's own scores missed the float64 per-sample reference (then no ratio of it means anything)."""
    ref = record.get("fastdal_vs_float64_reference")
    errors = [] if not ref else [ref["sq_norm_max_rel_err"], ref["dot_max_rel_err"]]
    return any(e is None or not e <= AGREE_TOL for e in errors)


def _agreement(name: str, e: dict, record: dict) -> str:
    if name == "fastdal":
        ref = record.get("fastdal_vs_float64_reference")
        if not ref:
            return ""
        text = f"float64 ref: sq {_e(ref['sq_norm_max_rel_err'])}, dot {_e(ref['dot_max_rel_err'])}"
        return f"**WRONG**: {text}" if fastdal_is_wrong(record) else text
    if e["kind"] == "baseline":
        return ""
    if e["kind"] == "norm":
        text = f"norms {_e(e.get('sq_norm_max_rel_err'))}"
    else:
        text = (
            f"sq {_e(e.get('sq_norm_max_rel_err'))}, dot {_e(e.get('dot_max_rel_err'))}, "
            f"score {_e(e.get('score_max_rel_err'))}"
        )
    return text if e.get("agrees_with_fastdal") else f"**disagrees**: {text}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def readme_table(report: dict) -> str:
    lines = [
        "| workload | method | time / train step | time / fastdal | peak memory / train step's | agreement |",
        "|---|---|---|---|---|---|",
    ]
    for record in report["workloads"]:
        label = f"{record['label']}, batch {record['batch']}"
        label += f", pool {record['pool']}" if record["pool"] != record["batch"] else ""
        for name, e in record["methods"].items():
            if name == "no-grad forward" and record["layers"] == "all":
                continue  # the baseline of the last-layer target only; in the results file for every workload
            if e.get("error"):
                reason = e["error"] if len(e["error"]) <= 140 else e["error"][:140] + "…"
                lines.append(f"| {label} | {name} | could not run | | | {_cell(reason)} |")
                continue
            once = " (one call)" if e.get("timed_by") == "first call" else ""
            lines.append(
                f"| {label} | {name} | {_x(e['ratio_to_train_step'])}{once} | {_x(e['ratio_to_fastdal'])} | "
                f"{_x(e['memory_ratio_to_train_step'])} | {_cell(_agreement(name, e, record))} |"
            )
    lines += ["", targets_table(report)]
    return "\n".join(lines)


def targets_table(report: dict) -> str:
    keys = list(TARGETS)
    heads = {
        "faster_than_peers": "fastest agreeing peer / fastdal (>= 1.5x)",
        "score_over_train_step": "score / train step (<= 1.3x)",
        "memory_over_train_step": "memory / train step's (<= 1.2x)",
        "last_over_forward": "last-layer score / no-grad forward (<= 1.05x)",
        "load_slowdown_over_train_step": "slowdown under load / train step's (<= 1.2x)",
    }
    lines = ["| workload | " + " | ".join(heads[k] for k in keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for record in report["workloads"]:
        cells = []
        for k in keys:
            t = record["targets"].get(k)
            if t is None:
                cells.append("")
            elif t["holds"] is None:
                cells.append("no agreeing peer ran" if k == "faster_than_peers" else "—")
            else:
                peer = f" ({t['fastest_peer']})" if t.get("fastest_peer") else ""
                cells.append(f"{t['ratio']:.2f}x{peer}, {'holds' if t['holds'] else '**misses**'}")
        lines.append(f"| {record['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def update_readme(readme: Path, text: str) -> bool:
    """Replace what is between the README's peers markers; False when the markers are missing."""
    start, end = "<!-- peers:start -->", "<!-- peers:end -->"
    content = readme.read_text()
    if start not in content or end not in content:
        return False
    head, rest = content.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{start}\n{text}\n{end}{tail}")
    return True


def chart(report: dict, path: Path) -> None:
    """Time and peak memory of fastdal and each peer over the training step's, per workload (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    records = report["workloads"]
    fig, axes = plt.subplots(2, 1, figsize=(12, 8), sharex=True)
    width = 0.8 / len(SHOWN)
    colors = plt.get_cmap("tab10")
    for row, (key, title) in enumerate(
        [
            ("ratio_to_train_step", "time / training step"),
            ("memory_ratio_to_train_step", "peak extra memory / training step's"),
        ]
    ):
        ax = axes[row]
        for j, name in enumerate(SHOWN):
            for i, record in enumerate(records):
                e = record["methods"].get(name, {})
                x = i + (j - (len(SHOWN) - 1) / 2) * width
                value = e.get(key)
                if value is None or not math.isfinite(value):
                    ax.text(x, 1.0, "x", ha="center", va="center", color=colors(j), fontsize=9)
                    continue
                hatch = "//" if e.get("agrees_with_fastdal") is False else None
                ax.bar(x, value, width, color=colors(j), hatch=hatch, edgecolor="white" if hatch else None)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_ylabel(title)
        ax.grid(axis="y", which="both", alpha=0.3)
    for i, record in enumerate(records):  # the no-grad forward, the floor of any score, as a dashed mark
        forward = record["methods"].get("no-grad forward", {}).get("ratio_to_train_step")
        if forward:
            axes[0].hlines(forward, i - 0.45, i + 0.45, colors="black", linestyles="dashed", linewidth=0.8)
    handles = [Patch(color=colors(j), label=name) for j, name in enumerate(SHOWN)]
    handles.append(plt.Line2D([], [], color="black", linestyle="dashed", linewidth=0.8, label="no-grad forward"))
    axes[0].legend(handles=handles, ncol=4, fontsize=8, loc="upper left")
    axes[1].set_xticks(range(len(records)), [f"{r['label']}\nbatch {r['batch']}" for r in records], fontsize=8)
    fig.suptitle(
        f"fastdal and per-sample-gradient libraries, {report['machine']}, {report['threads']} threads "
        "(x = could not run; hatched = disagrees with fastdal)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
