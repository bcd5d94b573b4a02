"""Targets, markdown table, JSON and PNG chart from one run's data."""

from __future__ import annotations

import json
import math
from pathlib import Path

OURS = ("core", "core+cache", "adapter", "adapter+compile", "compiled")
IMPL_ORDER = ("official", "adapter", "adapter+compile", "core", "core+cache", "compiled")
BASE_ORDER = ("fwd+bwd", "sgd", "adamw")

# Issue 14's targets table, one key per line of it; :func:`targets` gives every key at
# least one row (``n/a`` with the reason when this run did not measure it).
ISSUE_TARGETS = {
    "dense": "dense <= 0.6x official (MLP, T=10)",
    "diagonal": "diagonal <= 1.0x AdamW (MLP)",
    "block_hierarchical": "block30diagonal, hierarchical15_15 <= 1.5x SGD (MLP)",
    "toeplitz": "tril/triu Toeplitz <= 2.0x SGD (MLP)",
    "hand": "pure-core plain step <= 1.5x the hand-written arithmetic (HandBatched looped)",
    "sweep": "vmapped sweep N=8 >= 3x 8 sequential runs",
    "conv": "CNN conv statistics < 50% of the update step (every structure)",
    "guard": "skipping non-finite steps <= 3% of a plain step",
    "state": "optimizer state <= official (every structure)",
    "widths": "<= 1.0x official at every width 128..2048 (every structure)",
    "widths_dense": "dense <= 0.7x official from d = 512",
    "memory": "peak memory of a step above the state (statistics and plain steps) <= "
              "official (every structure)",
    "transformer": "transformer models: SINGD vs AdamW vs official (step time, state)",
    "compile": "SINGD(compile=True), drop-in (MLP, T=10)",
}

# (key, structure, T, reference, threshold, text) on the MLP; ratios of amortized medians
SPEED_TARGETS = [
    ("dense", "dense", 10, "official", 0.6, ISSUE_TARGETS["dense"]),
    ("dense_T1", "dense", 1, "official", 1.0, "dense <= 1.0x official (MLP, T=1)"),
    ("diagonal", "diagonal", 10, "adamw", 1.0, ISSUE_TARGETS["diagonal"]),
    ("block_hierarchical", "block30diagonal", 10, "sgd", 1.5, "block30diagonal <= 1.5x SGD (MLP)"),
    ("block_hierarchical", "hierarchical15_15", 10, "sgd", 1.5,
     "hierarchical15_15 <= 1.5x SGD (MLP)"),
    ("toeplitz", "triltoeplitz", 10, "sgd", 2.0, "triltoeplitz <= 2x SGD (MLP)"),
    ("toeplitz", "triutoeplitz", 10, "sgd", 2.0, "triutoeplitz <= 2x SGD (MLP)"),
]
STATE_ONLY_OURS = ("optimizer state of the parameters only ours trains (not in the state "
                   "target; largest structure per model)")
CONV_THRESHOLD = 0.5
HAND_THRESHOLD = 1.5
SWEEP_THRESHOLD = 3.0
GUARD_THRESHOLD = 0.03  # guarded / plain - 1
WIDTH_THRESHOLD, WIDTH_DENSE_THRESHOLD, WIDTH_DENSE_FROM = 1.0, 0.7, 512
COUNTER_BYTES = 8  # our int64 step counter
TRANSFORMER_MODELS = ("transformer", "chargpt")


def status(measured, threshold, rule: str = "<=") -> str:
    """``pass`` / ``MISS`` of ``measured`` against ``threshold`` under ``rule`` (``<=``,
    ``<`` or ``>=``); ``n/a`` when nothing was measured."""
    if measured is None or (isinstance(measured, float) and math.isnan(measured)):
        return "n/a"
    ok = {"<=": measured <= threshold, "<": measured < threshold,
          ">=": measured >= threshold}[rule]
    return "pass" if ok else "MISS"


def _row(key, target, impl, method, measured, threshold, unit, spread=None, detail="",
         rule="<=", **extra) -> dict:
    return {"key": key, "target": target, "impl": impl, "method": method,
            "measured": measured, "threshold": threshold, "rule": rule, "unit": unit,
            "spread": None if spread is None else [min(spread), max(spread)],
            "status": status(measured, threshold, rule) if threshold is not None else (
                "info" if measured is not None else "n/a"),
            "detail": detail, **extra}


def _q(p: dict | None) -> list | None:
    return None if not p else [p["q25"], p["q75"]]


def _rows(data, model=None, T=None):
    for g in data.get("groups", []):
        if (model is None or g["model"] == model) and (T is None or g["T"] == T):
            for r in g["rows"]:
                yield g, r


def _find(data, model, T, label):
    for _, r in _rows(data, model, T):
        if r["label"] == label:
            return r
    return None


def _speed_targets(data) -> list[dict]:
    out = []
    for key, structure, T, ref, thr, text in SPEED_TARGETS:
        for method in ("singd", "ikfac"):
            for impl in OURS:
                r = _find(data, "mlp", T, f"{impl}:{method}:{structure}")
                if r is None:
                    continue
                ratio = r.get(f"x_{ref}")
                ok = ratio is not None and not math.isnan(ratio) and not r.get("failed")
                out.append(_row(
                    key, text, impl, method, ratio if ok else None, thr, f"x {ref}",
                    _q(r.get(f"paired_{ref}")),
                    f"{r['amortized_ms']:.2f} ms/step" if ok else (r.get("failed") or
                                                                  "no reference"),
                    cpu_ratio=r.get(f"x_{ref}_cpu"),
                    estimated=bool(r.get(f"x_{ref}_estimated"))))
    return out


def _bytes_text(parts: dict) -> str:
    return ", ".join(f"{name} {b:,} B" for name, b in parts.items())


def _state_targets(data) -> list[dict]:
    """Optimizer state never larger than the official package's, same structure: over
    the parameters both train in the same role where the row has ``state_alike_bytes``
    (contenders.state_split), else the totals. What only ours trains gets a row of its
    own (no threshold): the largest per model."""
    out = []
    for impl in ("core", "adapter", "adapter+compile", "compiled"):
        worst = None
        extra: dict[str, tuple[int, str]] = {}
        for g, r in _rows(data):
            if r["kind"] != impl or r.get("state_bytes") is None:
                continue
            off = _find(data, g["model"], g["T"], f"official:{r['method']}:{r['structure']}")
            if off is None or not off.get("state_bytes"):
                continue
            where = f"{g['model']} T={g['T']} {r['method']} {r['structure']}"
            if r.get("official_alike_bytes"):
                mine, theirs = r["state_alike_bytes"], r["official_alike_bytes"]
                text = f"{where}: {mine} vs {theirs} bytes of the parameters both train alike"
                if r.get("state_only_official"):
                    text += f" (only the official trains {_bytes_text(r['state_only_official'])})"
                only = sum(r.get("state_only_ours", {}).values())
                if only > extra.get(g["model"], (0, ""))[0]:
                    extra[g["model"]] = (only, f"{where}: {_bytes_text(r['state_only_ours'])}")
            else:
                mine, theirs = r["state_bytes"], off["state_bytes"]
                text = f"{where}: {mine} vs {theirs} bytes"
            # the official package keeps its step counter as a Python int: allow ours
            ratio = (mine - COUNTER_BYTES) / theirs
            if worst is None or ratio > worst[0]:
                worst = (ratio, text)
        if worst is not None:
            out.append(_row("state", ISSUE_TARGETS["state"], impl, "both", worst[0], 1.0,
                            "x official (worst)", None,
                            "worst: " + worst[1] + " (ours less its 8-byte step counter)"))
        if extra:
            out.append(_row("state_only_ours", STATE_ONLY_OURS, impl, "both",
                            max(b for b, _ in extra.values()) / 1024, None,
                            "KiB (worst model)", None,
                            "; ".join(text for _, text in extra.values())))
    return out


def _hand_target(data) -> list[dict]:
    b = (data.get("sweep") or {}).get("bound")
    if not b:
        return []
    ratio = b["core_sequential"] / b["hand_sequential"]
    return [_row("hand", ISSUE_TARGETS["hand"], "core", "singd", ratio, HAND_THRESHOLD,
                 "x hand-written", _q(b.get("paired_core_over_hand")),
                 f"MLP 64-128-128-10, 8 members looped, dense, cache_preconditioner, plain "
                 f"step, CPU time: core {b['core_sequential']:.2f} ms, hand-written "
                 f"{b['hand_sequential']:.2f} ms (all members at once "
                 f"{b['hand_batched']:.2f} ms)")]


def _sweep_target(data) -> list[dict]:
    h = (data.get("sweep") or {}).get("headline")
    if not h:
        return []
    m = h["T10"]
    return [_row("sweep", ISSUE_TARGETS["sweep"], "sweep", "singd", m["speedup_cpu"],
                 SWEEP_THRESHOLD, "x faster (T=10 mix)", _q(m.get("paired_speedup_cpu")),
                 f"MLP 64-128-128-10, dense, CPU time: 8 sequential {m['seq_cpu_ms']:.1f} ms vs "
                 f"vmapped {m['vmap_cpu_ms']:.1f} ms per step of all members; statistics step "
                 f"{h['stats']['speedup_cpu']:.2f}x, plain {h['plain']['speedup_cpu']:.2f}x",
                 rule=">=")]


def _conv_targets(data) -> list[dict]:
    return [_row("conv", ISSUE_TARGETS["conv"], "core", "singd", c["conv_stats_of_update"],
                 CONV_THRESHOLD, f"of update step ({c['structure']})",
                 c.get("conv_stats_of_update_spread"),
                 f"{c['conv_stats_ms']:.2f} of {c['update_ms']:.2f} ms; "
                 f"{100 * c['conv_stats_of_amortized']:.1f}% of the amortized T=10 step",
                 rule="<")
            for c in data.get("conv_statistics", [])]


def _guard_targets(data) -> list[dict]:
    out = []
    for r in data.get("guard", []):
        if r["what"] not in ("drop-in step", "pure step"):
            continue
        impl = "adapter" if r["what"] == "drop-in step" else "core"
        out.append(_row("guard", ISSUE_TARGETS["guard"], impl, "singd",
                        r["paired_median"] - 1, GUARD_THRESHOLD,
                        f"extra of a step ({r['structure']})",
                        [r["paired_q25"] - 1, r["paired_q75"] - 1],
                        f"MLP, T=10, CPU time: guarded {r['guarded_cpu_ms']:.2f} vs plain "
                        f"{r['plain_cpu_ms']:.2f} ms (medians of steps); wall ratio "
                        f"{r['ratio']:.3f}"))
    return out


def _width_targets(data) -> list[dict]:
    w = data.get("widths")
    if not w:
        return []
    out = []
    for s in w["structures"]:
        cells = [r for r in w["rows"] if r["structure"] == s]
        timed = [r for r in cells if r["x_official"] is not None]
        missing = [str(d) for d in w["widths"] if d not in {r["d"] for r in timed}]
        checks = [("widths", ISSUE_TARGETS["widths"], WIDTH_THRESHOLD, timed)]
        if s == "dense":
            checks.append(("widths_dense", ISSUE_TARGETS["widths_dense"], WIDTH_DENSE_THRESHOLD,
                           [r for r in timed if r["d"] >= WIDTH_DENSE_FROM]))
        for key, text, thr, rows in checks:
            worst = max(rows, key=lambda r: r["x_official"], default=None)
            detail = ", ".join(f"d={r['d']}: {r['x_official']:.2f}"
                               + (" est." if r["official_estimated"] else "") for r in rows)
            if missing:
                detail += f"; not timed at d = {', '.join(missing)}"
            out.append(_row(key, text, "adapter", "singd",
                            None if worst is None else worst["x_official"], thr,
                            f"x official ({s}, worst width)",
                            None if worst is None else _q(worst["paired_official"]),
                            detail or "not timed",
                            estimated=bool(worst and worst["official_estimated"])))
    return out


def _model_text(model: str) -> str:
    """``wide<d>`` (models.Wide) in words, other model names as they are."""
    d = model[4:] if model.startswith("wide") else ""
    return f"two Linear({d}, {d})" if d.isdigit() else model


STEP_KINDS = ("statistics", "plain")  # memory.STEP_KINDS (not imported: no torch here)


def _peaks(r: dict, kind: str) -> list[int]:
    """Every sampled peak of one kind of step of a ``memory_peak`` row (bytes)."""
    return r.get(f"{kind}_peak_samples") or (
        [r[f"{kind}_peak_bytes"]] if f"{kind}_peak_bytes" in r else [])


def _memory_targets(data) -> list[dict]:
    """Per structure and T: ours / official of the largest peak, for the kind of step
    (statistics, plain) where that ratio is worst; the spread over the samples."""
    out = []
    rows = [r for r in data.get("memory_peak", []) if "error" not in r]
    for r in rows:
        if r["kind"] not in OURS or r["structure"] is None:
            continue
        off = next((o for o in rows if o["kind"] == "official" and o["structure"] ==
                    r["structure"] and o["model"] == r["model"] and o.get("T") == r.get("T")),
                   None)
        label = f"{r['structure']}, T={r['T']}, {_model_text(r['model'])}"
        if off is None:
            out.append(_row("memory", ISSUE_TARGETS["memory"], r["kind"], r["method"], None,
                            1.0, f"x official ({label})", None,
                            next((o["error"] for o in data.get("memory_peak", [])
                                  if o["kind"] == "official" and o["structure"] ==
                                  r["structure"] and "error" in o),
                                 "official not measured")))
            continue
        # per kind of step: ratio of the largest peaks, and the range over the samples
        kinds, parts = [], []
        for kind in STEP_KINDS:
            ours, theirs = _peaks(r, kind), _peaks(off, kind)
            if not ours or not theirs or min(theirs) <= 0:
                continue
            kinds.append((max(ours) / max(theirs),
                          [min(ours) / max(theirs), max(ours) / min(theirs)]))
            parts.append(f"{kind} {max(ours) / 2**20:.1f} vs {max(theirs) / 2**20:.1f} MiB")
        worst = max(kinds, default=(None, None))
        out.append(_row("memory", ISSUE_TARGETS["memory"], r["kind"], r["method"], worst[0],
                        1.0, f"x official ({label}, worse kind of step)", worst[1],
                        "; ".join(parts) or "no peaks"))
    return out


def _transformer_rows(data) -> list[dict]:
    """Issue 14 item 6 (no threshold): the drop-in per structure vs AdamW and official."""
    out = []
    for g in data.get("groups", []):
        if g["model"] not in TRANSFORMER_MODELS or g["T"] != 10:
            continue
        adamw = _find(data, g["model"], 10, "adamw")
        for r in g["rows"]:
            if r["kind"] != "adapter" or r["method"] != "singd":
                continue
            off = _find(data, g["model"], 10, f"official:singd:{r['structure']}")
            state = r.get("state_bytes")
            parts = [f"x official {_f(r.get('x_official'))}"]
            if state is not None:
                parts.append(f"state {state / 1024:,.1f} KiB (AdamW "
                             f"{_kib(adamw and adamw.get('state_bytes'))}, official "
                             f"{_kib(off and off.get('state_bytes'))} KiB)")
                if r.get("state_only_ours"):
                    parts.append(f"{_kib(sum(r['state_only_ours'].values()))} KiB of ours "
                                 f"for parameters the official does not train "
                                 f"({', '.join(r['state_only_ours'])})")
            out.append(_row("transformer", ISSUE_TARGETS["transformer"], "adapter", "singd",
                            r.get("x_adamw"), None, f"x AdamW ({g['model']}, {r['structure']})",
                            _q(r.get("paired_adamw")), "; ".join(parts), model=g["model"],
                            structure=r["structure"]))
    return out


def _compile_rows(data) -> list[dict]:
    """SINGD(compile=True) against the eager drop-in, per structure (no threshold)."""
    out = []
    for _, r in _rows(data, "mlp", 10):
        if r["kind"] != "adapter+compile":
            continue
        eager = _find(data, "mlp", 10, f"adapter:{r['method']}:{r['structure']}")
        ratio = None if not eager or r.get("failed") or not r.get("amortized_ms") else (
            r["amortized_ms"] / eager["amortized_ms"])
        out.append(_row("compile", ISSUE_TARGETS["compile"], "adapter+compile", r["method"],
                        ratio, None, f"x eager drop-in ({r['structure']})", None,
                        r.get("failed") or f"compile {_f(r.get('compile_s'), '{:.0f}')} s"))
    if not out:
        reason = next((s["reason"] for s in data.get("skipped", [])
                       if s["label"].startswith("adapter+compile")), None)
        out.append(_row("compile", ISSUE_TARGETS["compile"], "adapter+compile", "singd", None,
                        None, "x eager drop-in", None,
                        reason or data.get("not_measured", {}).get("compile", "not in this run")))
    return out


def targets(data) -> list[dict]:
    """Every target row of one run (issue 14's table in its order, then what has no
    threshold); a target this run did not measure gets one ``n/a`` row saying why."""
    out = (_speed_targets(data) + _hand_target(data) + _sweep_target(data)
           + _conv_targets(data) + _guard_targets(data) + _state_targets(data)
           + _width_targets(data) + _memory_targets(data) + _transformer_rows(data)
           + _compile_rows(data))
    why = data.get("not_measured", {})
    have = {t["key"] for t in out}
    for key, text in ISSUE_TARGETS.items():
        if key not in have:
            out.append(_row(key, text, "–", "–", None, None, "", None,
                            why.get(key, "not measured in this run")))
    order = list(ISSUE_TARGETS)
    order.insert(1, "dense_T1")  # not in the issue's table: kept beside its T=10 line
    order.insert(order.index("state") + 1, "state_only_ours")  # and this beside "state"
    return sorted(out, key=lambda t: order.index(t["key"]))


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


def measured_cell(t: dict) -> str:
    """A target's measured value with its unit (percent for the guard's extra)."""
    if t["measured"] is None:
        return "–"
    est = " (est.)" if t.get("estimated") else ""
    return f"{t['measured']:.3f} {t['unit']}{est}".rstrip()


def threshold_cell(t: dict) -> str:
    return "–" if t["threshold"] is None else f"{t.get('rule', '<=')} {t['threshold']}"


def spread_cell(t: dict) -> str:
    return "–" if not t["spread"] else f"{t['spread'][0]:.3f}–{t['spread'][1]:.3f}"


def _extras_markdown(data) -> list[str]:
    """The sections of the measurements outside the step-time groups."""
    from . import widths

    L: list[str] = []
    w = data.get("widths")
    if w:
        L += ["", f"## Width sweep: two Linear(d, d), batch 128, T={w['T']}, drop-in vs "
              "official", "",
              "Step time as a multiple of SGD's, ours / official; in parentheses ours / "
              "official with the paired per-round IQR (`est.`: the official step timed over "
              "single steps). Rounds per width: "
              + ", ".join(f"d={g['d']}: {g['rounds']} ({g['wall_s']:.0f} s)"
                          for g in w["groups"]) + ".", ""]
        L += widths.table(w)
    sw = data.get("sweep")
    if sw:
        h, b = sw["headline"], sw["bound"]
        L += ["", "## Sweep and the hand-written arithmetic (benchmarks/sweep_bench.py)", "",
              f"MLP 64-128-128-10, batch 64, dense, N = 8, thread CPU time, {h['rounds']} "
              f"interleaved rounds; bound: {b.get('paired_core_over_hand', {}).get('rounds', '?')}"
              " rounds.", "",
              "| step | 8 sequential ms | vmapped ms | speed-up |", "|---|---|---|---|"]
        for k, label in (("stats", "with statistics"), ("plain", "plain"), ("T10", "T = 10 mix")):
            L.append(f"| {label} | {h[k]['seq_cpu_ms']:.2f} | {h[k]['vmap_cpu_ms']:.2f} | "
                     f"{h[k]['speedup_cpu']:.2f}x |")
        L += ["", "| plain step, cached K K^T and C C^T | ms (8 members) |", "|---|---|"]
        for k in ("core_sequential", "sweep", "hand_batched", "hand_sequential",
                  "core_gradients", "sweep_gradients"):
            if k in b:
                L.append(f"| {k} | {b[k]:.2f} |")
    if data.get("guard"):
        L += ["", "## Skipping non-finite steps (benchmarks/guard_bench.py, MLP, T=10)", "",
              "| structure | what | plain CPU ms | guarded CPU ms | paired ratio [IQR] | "
              "wall ratio |", "|---|---|---|---|---|---|"]
        for r in data["guard"]:
            L.append(f"| {r['structure']} | {r['what']} | {r['plain_cpu_ms']:.2f} | "
                     f"{r['guarded_cpu_ms']:.2f} | {r['paired_median']:.3f} "
                     f"[{r['paired_q25']:.3f}–{r['paired_q75']:.3f}] | {r['ratio']:.3f} |")
    tr = [t for t in data.get("targets", []) if t["key"] == "transformer" and t["impl"] != "–"]
    if tr:
        L += ["", "## Transformer models (issue 14 item 6): drop-in SINGD, T=10", "",
              "| model, structure | x AdamW [paired IQR] | detail |", "|---|---|---|"]
        for t in tr:
            L.append(f"| {t['model']}, {t['structure']} | {_f(t['measured'], '{:.3f}')} "
                     f"[{spread_cell(t)}] | {t['detail']} |")
    if data.get("not_measured"):
        L += ["", "Not measured in this run: " + "; ".join(
            f"{k}: {v}" for k, v in data["not_measured"].items()) + "."]
    return L


def _mib(v: list[int]) -> str:
    """Largest of the sampled peaks in MiB, with the range of the samples when they differ."""
    if not v:
        return "–"
    lo, hi = min(v) / 2**20, max(v) / 2**20
    return f"{hi:.1f}" + (f" ({lo:.1f}–{hi:.1f}, {len(v)} steps)" if hi - lo >= 0.05 else "")


def _memory_markdown(data) -> list[str]:
    """Issue 14's memory table: per structure, T and kind of step, official vs ours."""
    L = ["", "## Peak resident memory of a step above the state (child process)", ""]
    if data.get("memory_peak_error"):
        L.append(f"Not measured: {data['memory_peak_error']}")
    rows = data.get("memory_peak") or []
    if not rows:
        return L
    L += ["Peak RSS during the step minus RSS before it (gradients freed first; the "
          "optimizer state is resident before), with glibc's mmap threshold at 64 KiB and "
          "one malloc arena so freed tensors leave the RSS; sampled every ~0.2 ms "
          "(`benchmarks/memory.py`). Two warm-up steps, then one T-cycle (at least two "
          "steps); the largest peak of each kind of step, the range over its steps in "
          "parentheses.", "",
          "| structure | model | T | step | official MiB | ours (drop-in) MiB | ours / official |",
          "|---|---|---|---|---|---|---|"]
    ok = [r for r in rows if "error" not in r]
    for r in ok:
        if r["kind"] not in OURS or r["structure"] is None:
            continue
        off = next((o for o in ok if o["kind"] == "official" and o["structure"] == r["structure"]
                    and o["model"] == r["model"] and o["T"] == r["T"]), {})
        for kind in STEP_KINDS:
            ours, theirs = _peaks(r, kind), _peaks(off, kind)
            if not ours and not theirs:
                continue
            ratio = "–" if not ours or not theirs or max(theirs) <= 0 else (
                f"{max(ours) / max(theirs):.2f}")
            L.append(f"| {r['structure']} | {_model_text(r['model'])} | {r['T']} | {kind} | "
                     f"{_mib(theirs)} | {_mib(ours)} | {ratio} |")
    base = [r for r in ok if r["structure"] is None]
    if base:
        L += ["", "Baselines (plain steps): " + "; ".join(
            f"{r['kind']} {_mib(_peaks(r, 'plain'))} MiB ({_model_text(r['model'])})"
            for r in base) + "."]
    for r in rows:
        if "error" in r:
            label = r["kind"] if r["structure"] is None else f"{r['kind']}:{r['structure']}"
            L.append(f"\n{label} ({r['model']}, T={r.get('T', '–')}): error: {r['error']}")
    return L


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
    L += ["", "## Targets (issue 14; 1 thread; the model and setting are in each row)", "",
          "| target | ours | method | measured | threshold | spread | CPU-time ratio | result "
          "| detail |", "|---|---|---|---|---|---|---|---|---|"]
    for t in data["targets"]:
        L.append(f"| {t['target']} | {t['impl']} | {t['method']} | {measured_cell(t)} | "
                 f"{threshold_cell(t)} | {spread_cell(t)} | {_f(t.get('cpu_ratio'), '{:.3f}')} | "
                 f"**{t['status']}** | {t['detail']} |")
    L += _extras_markdown(data)
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
    L += _memory_markdown(data)
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
    colors = {"official": "#999999", "adapter": "#4c72b0", "adapter+compile": "#8172b2",
              "core": "#55a868", "core+cache": "#8fd19e", "compiled": "#c44e52"}
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
    fig.savefig(path, dpi=80)  # (110 dpi: 424 KB for the full run's 7 panels)
    plt.close(fig)
    return path


def _rounded(tree, digits: int = 4):
    """Floats to ``digits`` significant digits (the timings' spread is in the second
    digit; the full repr made bench.json 370 KB); the rest as it is."""
    if isinstance(tree, float):
        return float(f"{tree:.{digits}g}")
    if isinstance(tree, dict):
        return {k: _rounded(v, digits) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_rounded(v, digits) for v in tree]
    return tree


def write(data, out_dir: Path, stem: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / f"{stem}.md"
    js = out_dir / f"{stem}.json"
    md.write_text(markdown(data))
    # compact: the full run's JSON is ~220 KB so (indented, over 300 KB)
    js.write_text(json.dumps(_rounded(data), separators=(",", ":"), default=str))
    paths = [md, js]
    png = chart(data, out_dir / f"{stem}.png")
    if png is not None:
        paths.append(png)
    return paths
