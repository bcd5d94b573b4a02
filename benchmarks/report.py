"""Targets, markdown table, JSON and PNG chart from one run's data."""

from __future__ import annotations

import json
import math
from pathlib import Path

OURS = ("core", "core+cache", "adapter", "compiled")
IMPL_ORDER = ("official", "adapter", "core", "core+cache", "compiled")
BASE_ORDER = ("fwd+bwd", "sgd", "adamw")

# (structure, T, reference, threshold, text) on the MLP; ratios of amortized medians
SPEED_TARGETS = [
    ("dense", 10, "official", 0.7, "dense <= 0.7x official (T=10)"),
    ("dense", 1, "official", 1.0, "dense <= 1.0x official (T=1)"),
    ("diagonal", 10, "adamw", 1.0, "diagonal <= 1.0x AdamW"),
    ("block30diagonal", 10, "sgd", 1.5, "block30diagonal <= 1.5x SGD"),
    ("hierarchical15_15", 10, "sgd", 1.5, "hierarchical15_15 <= 1.5x SGD"),
    ("triltoeplitz", 10, "sgd", 2.0, "triltoeplitz <= 2x SGD"),
    ("triutoeplitz", 10, "sgd", 2.0, "triutoeplitz <= 2x SGD"),
]
CONV_THRESHOLD = 0.5
COUNTER_BYTES = 8  # our int64 step counter  # "must not dominate": less than half of the update step


def _rows(data, model=None, T=None):
    for g in data["groups"]:
        if (model is None or g["model"] == model) and (T is None or g["T"] == T):
            for r in g["rows"]:
                yield g, r


def _find(data, model, T, label):
    for _, r in _rows(data, model, T):
        if r["label"] == label:
            return r
    return None


def targets(data) -> list[dict]:
    out = []
    for structure, T, ref, thr, text in SPEED_TARGETS:
        for method in ("singd", "ikfac"):
            for impl in OURS:
                r = _find(data, "mlp", T, f"{impl}:{method}:{structure}")
                if r is None:
                    continue
                ratio = r.get(f"x_{ref}")
                paired = r.get(f"paired_{ref}")
                cpu = r.get(f"x_{ref}_cpu")
                ok = ratio is not None and not math.isnan(ratio) and not r.get("failed")
                out.append({
                    "target": text, "impl": impl, "method": method, "measured": ratio,
                    "threshold": thr, "unit": f"x {ref}", "cpu_ratio": cpu,
                    "estimated": bool(r.get(f"x_{ref}_estimated")),
                    "spread": None if not paired else [paired["q25"], paired["q75"]],
                    "status": ("pass" if ratio <= thr else "MISS") if ok else "n/a",
                    "detail": f"{r['amortized_ms']:.2f} ms/step" if ok else (r.get("failed") or
                                                                          "no reference"),
                })
    # optimizer state never larger than the official package's, same structure
    for impl in ("core", "adapter", "compiled"):
        worst = None
        for g, r in _rows(data):
            if r["kind"] != impl or r.get("state_bytes") is None:
                continue
            off = _find(data, g["model"], g["T"], f"official:{r['method']}:{r['structure']}")
            if off is None or not off.get("state_bytes"):
                continue
            # the official package keeps its step counter as a Python int: allow ours
            ratio = (r["state_bytes"] - COUNTER_BYTES) / off["state_bytes"]
            if worst is None or ratio > worst[0]:
                worst = (ratio, f"{g['model']} T={g['T']} {r['method']} {r['structure']}: "
                                f"{r['state_bytes']} vs {off['state_bytes']} bytes")
        if worst is not None:
            out.append({"target": "optimizer state <= official (every structure)", "impl": impl,
                        "method": "both", "measured": worst[0], "threshold": 1.0,
                        "unit": "x official (worst)", "spread": None,
                        "status": "pass" if worst[0] <= 1.0 else "MISS",
                        "detail": "worst: " + worst[1] + " (ours less its 8-byte step counter)"})
    for structure, rows in _wide_pairs(data).items():
        worst = max(rows, key=lambda r: r["ratio"])
        out.append({"target": "peak memory of a step above the state <= official",
                    "impl": "adapter", "method": "singd", "measured": worst["ratio"],
                    "threshold": 1.0, "unit": f"x official ({structure}, worst)",
                    "spread": None, "status": "pass" if worst["ratio"] <= 1.0 else "MISS",
                    "detail": f"two Linear(2048, 2048), T={worst['T']} {worst['step']} step: "
                              f"{worst['ours'] / 2**20:.1f} vs {worst['official'] / 2**20:.1f} "
                              "MiB"})
    for c in data.get("conv_statistics", []):
        out.append({"target": "CNN conv statistics do not dominate the update step",
                    "impl": "core", "method": "singd", "measured": c["conv_stats_of_update"],
                    "threshold": CONV_THRESHOLD, "unit": f"of update step ({c['structure']})",
                    "spread": None,
                    "status": "pass" if c["conv_stats_of_update"] < CONV_THRESHOLD else "MISS",
                    "detail": f"{c['conv_stats_ms']:.2f} of {c['update_ms']:.2f} ms; "
                              f"{100 * c['conv_stats_of_amortized']:.1f}% of the amortized "
                              f"T=10 step"})
    return out


def _wide_pairs(data) -> dict[str, list[dict]]:
    """Per structure, ours vs official per (T, statistics | plain step) of ``memory_wide``."""
    by = {(r["kind"], r["structure"], r["T"]): r for r in data.get("memory_wide", [])
          if "error" not in r}
    out: dict[str, list[dict]] = {}
    for (kind, structure, T), r in by.items():
        off = by.get(("official", structure, T))
        if kind != "adapter" or off is None:
            continue
        for step in ("statistics", "plain"):
            ours, ref = r.get(f"{step}_peak_bytes"), off.get(f"{step}_peak_bytes")
            if ours is not None and ref:
                out.setdefault(structure, []).append(
                    {"T": T, "step": step, "ours": ours, "official": ref, "ratio": ours / ref})
    return out


# ---------------------------------------------------------------------------- markdown
def _f(x, fmt="{:.2f}", none="–"):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return none
    return fmt.format(x)


def _kib(b):
    return _f(None if b is None else b / 1024, "{:,.1f}")


def _sort_key(r):
    if r["structure"] is None:
        return (0, BASE_ORDER.index(r["kind"]), "", 0)
    return (1, r["method"], r["structure"], IMPL_ORDER.index(r["kind"]))


def _ratio_cell(r, ref):
    x = r.get(f"x_{ref}")
    p = r.get(f"paired_{ref}")
    cell = _f(x)
    if p and x is not None:
        cell += f" [{p['q25']:.2f}–{p['q75']:.2f}]"
    if r.get(f"x_{ref}_estimated") and x is not None:
        cell += " est."
    return cell


def markdown(data) -> str:
    m = data["meta"]
    L = [f"# singd_functional benchmark ({m['mode']})", ""]
    L.append(f"{m['date']}; torch {m['torch']}, official singd {m['singd_official']}, "
             f"Python {m['python']}; {m['platform']} ({m['processor']}, {m['cpu_count']} "
             f"CPUs); **{m['threads']} thread**, flush-denormal on; wall time "
             f"{m['wall_s']:.0f} s; load average {m['load_start']} at start, "
             f"{m['load_end']} at end. Adapter `sf.SINGD`: {m['adapter']}.")
    L.append("")
    L.append("Ratios are of medians within one interleaved run; `[a–b]` is the "
             "interquartile range of the per-round paired ratios (the spread). "
             "`est.` marks contenders too slow for whole cycles (timed over single "
             "steps; amortized = (update + (T-1) plain) / T). See benchmarks/README.md.")
    L += ["", "## Targets (MLP 784-512-512-10, batch 128, 1 thread, amortized per step)", "",
          "| target | ours | method | measured | threshold | spread | CPU-time ratio | result "
          "| detail |", "|---|---|---|---|---|---|---|---|---|"]
    for t in data["targets"]:
        spread = "–" if not t["spread"] else f"{t['spread'][0]:.2f}–{t['spread'][1]:.2f}"
        est = " (est.)" if t.get("estimated") else ""
        L.append(f"| {t['target']} | {t['impl']} | {t['method']} | {_f(t['measured'], '{:.3f}')} "
                 f"{t['unit']}{est} | {t['threshold']} | {spread} | "
                 f"{_f(t.get('cpu_ratio'), '{:.3f}')} | **{t['status']}** | {t['detail']} |")
    for g in data["groups"]:
        L += ["", f"## Step time: {g['description']}, T={g['T']}", "",
              f"{g['rounds']} rounds in {g['seconds']} s (budget {g['budget_s']:.0f} s); load "
              f"average {g['load_before']} -> {g['load_after']}.", "",
              "| contender | ms/step amortized [q25–q75] | update step ms | plain step ms | "
              "x fwd+bwd | x SGD [paired IQR] | x SGD (CPU time) | x AdamW | "
              "x official [paired IQR] | steps | state KiB | params vs core |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(g["rows"], key=_sort_key):
            if r["failed"] and r["steps"] == 0:
                L.append(f"| {r['label']} | failed: {r['failed']} |" + " |" * 10)
                continue
            amort = _f(r["amortized_ms"])
            if r.get("q25_ms") is not None:
                amort += f" [{r['q25_ms']:.2f}–{r['q75_ms']:.2f}]"
            elif r.get("estimated"):
                amort += " est."
            diff = r.get("param_rel_diff_vs_core")
            L.append(
                f"| {r['label']}{' (FAILED: ' + r['failed'] + ')' if r['failed'] else ''} | "
                f"{amort} | {_f(r['update_ms'])} | {_f(r['plain_ms'])} | "
                f"{_f(r.get('x_fwd+bwd'))} | {_ratio_cell(r, 'sgd')} | {_f(r.get('x_sgd_cpu'))} | "
                f"{_f(r.get('x_adamw'))} | "
                f"{_ratio_cell(r, 'official') if r['structure'] else '–'} | {r['steps']} | "
                f"{_kib(r.get('state_bytes'))} | {_f(diff, '{:.1e}')} |")
    L += ["", "## Optimizer state", "",
          "Bytes of the distinct tensor storages in each optimizer's state (ours: the pure "
          "core's state pytree, via optree leaves; the adapter: its `state_dict()`; the "
          "official package: K, C, m_K, m_C and its momentum buffers). Formula: per layer "
          "storage(d_K) + storage(d_C) (dense d^2, diagonal d, block floor(d/B) B^2 + "
          "(d mod B)^2, hierarchical k1^2 + k1(n+k2) + n + k2 n + k2^2, Toeplitz d, "
          "arrowheads 2d-1), x2 for SINGD's Riemannian momenta, plus one heavy-ball buffer "
          "per parameter and the 8-byte step counter; float32. Caches of K K^T and C C^T "
          "(`core+cache`; the adapter keeps one when T > 1, outside its state_dict) are "
          "listed in the last columns and not counted in the state.", "",
          "| model | T | method | structure | official KiB | adapter KiB | core KiB | formula KiB "
          "| core − formula (bytes) | core / official | core+cache: cache KiB | adapter: cache "
          "KiB |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for g in data["groups"]:
        base = {r["kind"]: r.get("state_bytes") for r in g["rows"] if r["structure"] is None}
        L.append(f"| {g['model']} | {g['T']} | – | SGD / AdamW | {_kib(base.get('sgd'))} / "
                 f"{_kib(base.get('adamw'))} | | | | | | | |")
        for r in sorted(g["rows"], key=_sort_key):
            if r["kind"] != "core":
                continue
            off = _find(data, g["model"], g["T"], f"official:{r['method']}:{r['structure']}")
            ad = _find(data, g["model"], g["T"], f"adapter:{r['method']}:{r['structure']}")
            cc = _find(data, g["model"], g["T"], f"core+cache:{r['method']}:{r['structure']}")
            cache = None
            if cc and cc.get("state_bytes") is not None:
                cache = cc["state_bytes"] - cc["formula_bytes"]
            ob = off.get("state_bytes") if off else None
            extra = None if r.get("state_bytes") is None else r["state_bytes"] - r["formula_bytes"]
            L.append(f"| {g['model']} | {g['T']} | {r['method']} | {r['structure']} | {_kib(ob)} | "
                     f"{_kib(ad.get('state_bytes') if ad else None)} | {_kib(r['state_bytes'])} | "
                     f"{_kib(r['formula_bytes'])} | {_f(extra, '{:+,d}')} | "
                     f"{_f(None if not ob else r['state_bytes'] / ob, '{:.3f}')} | "
                     f"{_kib(cache)} | {_kib(ad.get('cache_bytes') if ad else None)} |")
    L += ["", "## Peak resident memory growth per step (MLP, SINGD, T=2, child process)", ""]
    if data.get("memory_peak_error"):
        L.append(f"Not measured: {data['memory_peak_error']}")
    if data.get("memory_peak"):
        L += ["Peak RSS during the step minus RSS before it (gradients freed first), with "
              "glibc's mmap threshold at 64 KiB so freed tensors leave the RSS; sampled "
              "every ~0.2 ms, so short peaks can be missed.", "",
              "| contender | plain step MiB | update step MiB |", "|---|---|---|"]
        for r in data["memory_peak"]:
            label = r["kind"] if r["structure"] is None else f"{r['kind']}:{r['structure']}"
            if "error" in r:
                L.append(f"| {label} | error: {r['error']} | |")
            else:
                L.append(f"| {label} | {r['plain_peak_bytes'] / 2**20:.2f} | "
                         f"{r['update_peak_bytes'] / 2**20:.2f} |")
    L += ["", "## Peak resident memory of a step above the state: two Linear(2048, 2048), "
          "batch 128", ""]
    if data.get("memory_wide_error"):
        L.append(f"Not measured: {data['memory_wide_error']}")
    if data.get("memory_wide"):
        L += ["Issue 14's table: the largest peak RSS of a statistics step and of a plain step "
              "(steps 2..11 for T=10, 2..3 for T=1), minus the RSS before it (gradients "
              "freed first), measured as above (`benchmarks/memory.py`, one child process, "
              "`MALLOC_ARENA_MAX=1`).", "",
              "| structure | T | step | official MiB | ours (drop-in) MiB | ours / official |",
              "|---|---|---|---|---|---|"]
        for structure, rows in _wide_pairs(data).items():
            for r in sorted(rows, key=lambda r: (-r["T"], r["step"])):
                L.append(f"| {structure} | {r['T']} | {r['step']} | "
                         f"{r['official'] / 2**20:.1f} | {r['ours'] / 2**20:.1f} | "
                         f"{r['ratio']:.2f} |")
        for r in data["memory_wide"]:
            if "error" in r:
                L.append(f"\n{r['kind']}:{r['structure']} T={r['T']}: error: {r['error']}")
    if data.get("conv_statistics"):
        L += ["", "## CNN: convolution statistics (unfolded patches), core SINGD, T=10", "",
              "Medians over interleaved repetitions. *conv stats*: `layer_statistics` of both "
              "conv layers (unfold + H_K, H_C); *unfold rows*: `layer_rows` alone.", "",
              "| structure | update step ms | plain step ms | conv stats ms | unfold rows ms | "
              "all layers' stats ms | conv stats / update step | conv stats / amortized step |",
              "|---|---|---|---|---|---|---|---|"]
        for c in data["conv_statistics"]:
            L.append(f"| {c['structure']} | {c['update_ms']:.2f} | {c['plain_ms']:.2f} | "
                     f"{c['conv_stats_ms']:.2f} | {c['conv_rows_ms']:.2f} | "
                     f"{c['all_stats_ms']:.2f} | {100 * c['conv_stats_of_update']:.1f}% | "
                     f"{100 * c['conv_stats_of_amortized']:.1f}% |")
    if data.get("profiles"):
        L += ["", "## Profiles of our core (MLP, SINGD, one T=10 cycle, top operators by self CPU)",
              ""]
        for s, p in data["profiles"].items():
            L += [f"### {s} (`{Path(p['path']).name}`)", "", "```"]
            L += p["top_ops"][:12]
            L += ["```", ""]
    if data.get("skipped"):
        L += ["", "## Skipped or failed contenders", "", "| contender | model | T | reason |",
              "|---|---|---|---|"]
        seen = set()
        for s in data["skipped"]:
            key = (s["label"], s["model"], s["T"])
            if key not in seen:
                seen.add(key)
                L.append(f"| {s['label']} | {s['model']} | {s['T']} | {s['reason']} |")
    return "\n".join(L) + "\n"


# --------------------------------------------------------------------------------- chart
def chart(data, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter
    except Exception:
        return None
    groups = [g for g in data["groups"]
              if any(r["structure"] is not None and r.get("x_sgd") for r in g["rows"])]
    if not groups:
        return None
    fig, axes = plt.subplots(len(groups), 1, figsize=(11, 3.6 * len(groups)), squeeze=False)
    colors = {"official": "#999999", "adapter": "#4c72b0", "core": "#55a868",
              "core+cache": "#8fd19e", "compiled": "#c44e52"}
    for ax, g in zip(axes[:, 0], groups):
        rows = [r for r in g["rows"] if r["structure"] is not None and r["method"] == "singd"]
        structures = list(dict.fromkeys(r["structure"] for r in rows))
        impls = [i for i in IMPL_ORDER if any(r["kind"] == i for r in rows)]
        width = 0.8 / max(1, len(impls))
        for j, impl in enumerate(impls):
            xs, ys, errs, hatches = [], [], [[], []], []
            for k, s in enumerate(structures):
                r = next((r for r in rows if r["kind"] == impl and r["structure"] == s), None)
                if r is None or r.get("x_sgd") is None:
                    continue
                xs.append(k + (j - (len(impls) - 1) / 2) * width)
                ys.append(r["x_sgd"])
                p = r.get("paired_sgd")
                errs[0].append(max(0.0, r["x_sgd"] - p["q25"]) if p else 0.0)
                errs[1].append(max(0.0, p["q75"] - r["x_sgd"]) if p else 0.0)
                hatches.append("//" if r.get("estimated") else "")
            bars = ax.bar(xs, ys, width, yerr=errs, label=impl, color=colors.get(impl),
                          capsize=2)
            for b, h, y in zip(bars, hatches, ys):
                b.set_hatch(h)
                ax.annotate(f"{y:.2f}" if y < 10 else f"{y:.0f}", (b.get_x() + b.get_width() / 2,
                            y), ha="center", va="bottom", fontsize=7)
        for name, style in (("adamw", ":"), ("fwd+bwd", "--")):
            r = next((r for r in g["rows"] if r["label"] == name), None)
            if r and r.get("x_sgd"):
                ax.axhline(r["x_sgd"], color="k", linestyle=style, linewidth=0.8,
                           label=f"{name} ({r['x_sgd']:.2f})")
        ax.axhline(1.0, color="k", linewidth=0.8)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(
            lambda v, _: f"{v:g}" if str(f"{v:g}")[0] in "25" else ""))
        ax.set_ylim(top=ax.get_ylim()[1] * 1.6)
        ax.set_xticks(range(len(structures)), structures)
        ax.set_ylabel("step time / SGD step")
        ax.set_title(f"{g['description']}, T={g['T']}, SINGD (hatched: estimated from single "
                     f"steps)", fontsize=9)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(data, out_dir: Path, stem: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / f"{stem}.md"
    js = out_dir / f"{stem}.json"
    md.write_text(markdown(data))
    js.write_text(json.dumps(data, indent=1, default=str))
    paths = [md, js]
    png = chart(data, out_dir / f"{stem}.png")
    if png is not None:
        paths.append(png)
    return paths
