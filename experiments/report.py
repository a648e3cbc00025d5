r"""Plots and a markdown report from a results file of ``python -m experiments.run``.

    python -m experiments.report RESULTS [--out DIR] [--timing FILE] [--quick_timing]

Writes into DIR (default: the results file's directory), with the Agg backend:

* ``accuracy.png``: test accuracy vs iterations, one panel per (attack, S), the adversary-free
  reference dashed; ``accuracy_projected.png`` and ``accuracy_wall.png``: the same vs projected
  cluster time and vs measured wall time (``experiments/run.py`` defines both).
* ``combine_timing.png``: combiner time vs P and vs D on log axes, with the plain-sum floor,
  from ``--timing`` (default ``DIR/combine_timing.jsonl``; when missing, the sweep of
  ``experiments.combine_timing`` runs first and writes it, ``--quick_timing`` for a tiny one).
* ``report.md``: time to the target accuracy (wall and projected) and the speedup over the
  geometric median per method, the per-step combine time, how far DRACO's accuracy curve is
  from the adversary-free one, the figures above embedded and the combine-timing table.

Every method has one colour in every figure.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from experiments import combine_timing, grid  # noqa: E402

__all__ = [
  "load_rows",
  "curves",
  "panels",
  "time_to_target",
  "summarize",
  "plot_accuracy",
  "plot_combine_timing",
  "write_markdown",
  "make_report",
  "main",
]

_X_AXES = {
  "accuracy.png": ("step", "iterations", "linear"),
  "accuracy_projected.png": ("projected_time", "projected cluster time (s), a projection", "log"),
  "accuracy_wall.png": ("wall_time", "measured wall time on this host (s)", "log"),
}
_STYLE = {"linewidth": 1.2, "alpha": 0.9}
_DRACO_STYLE = {"linewidth": 2.4, "alpha": 0.8}
_REFERENCE_STYLE = {"color": "black", "linestyle": "--", "linewidth": 1.2}


def load_rows(path: str) -> list[dict]:
  """The rows of a results file."""
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _run_key(row: dict) -> tuple[str, str, int]:
  return row["method"], row["attack"], row["S"]


def curves(rows: Sequence[dict]) -> dict[tuple[str, str, int], list[dict]]:
  """Rows grouped by run (method, attack, S), each sorted by step."""
  out = defaultdict(list)
  for row in rows:
    out[_run_key(row)].append(row)
  return {key: sorted(run, key=lambda r: r["step"]) for key, run in out.items()}


def panels(rows: Sequence[dict]) -> list[tuple[str, int]]:
  """The (attack, S) panels, the adversary-free reference excluded."""
  return sorted({(r["attack"], r["S"]) for r in rows if r["method"] != grid.REFERENCE})


def _methods(rows: Sequence[dict]) -> list[str]:
  present = {r["method"] for r in rows}
  known = [m for m in (grid.REFERENCE, *grid.METHODS) if m in present]
  return known + sorted(present - set(known))


def _reference(by_run: dict) -> list[dict] | None:
  return next((run for (m, _, _), run in by_run.items() if m == grid.REFERENCE), None)


def time_to_target(run: Sequence[dict], target: float, column: str) -> float | None:
  """``column`` at the first evaluation whose test accuracy reaches ``target`` (None: never)."""
  hit = next((row for row in run if row["accuracy"] >= target), None)
  return None if hit is None or hit[column] is None else float(hit[column])


def _max_gap(run: Sequence[dict], reference: Sequence[dict] | None) -> float | None:
  """max |test accuracy - the reference's| over the evaluations both made."""
  if not reference:
    return None
  ref = {row["step"]: row["accuracy"] for row in reference}
  gaps = [abs(row["accuracy"] - ref[row["step"]]) for row in run if row["step"] in ref]
  return max(gaps) if gaps else None


def _median(run: Sequence[dict], column: str) -> float | None:
  values = [row[column] for row in run if row.get(column) is not None]
  return float(np.median(values)) if values else None


def _speedup_over(baseline: float | None, mine: float | None) -> float | None:
  """baseline / mine; inf when only the method reaches the target, None when it does not."""
  if mine is None:
    return None
  return float("inf") if baseline is None else baseline / mine


def summarize(rows: Sequence[dict], target: float) -> list[dict]:
  """One summary per run: final accuracy, time to ``target``, speedups vs the baseline."""
  by_run = curves(rows)
  reference = _reference(by_run)
  out = []
  order = lambda item: (item[0][0] != grid.REFERENCE, *item[0][1:])  # reference first
  for (method, attack, s), run in sorted(by_run.items(), key=order):
    baseline = by_run.get((grid.BASELINE, attack, s))
    entry = {
      "method": method,
      "attack": attack,
      "S": s,
      "final_accuracy": run[-1]["accuracy"],
      "combine_ms": _median(run, "combine_ms"),
      "projected_ms_per_step": run[-1]["projected_ms_per_step"],
      "steps_to_target": time_to_target(run, target, "step"),
      "wall_to_target": time_to_target(run, target, "wall_time"),
      "projected_to_target": time_to_target(run, target, "projected_time"),
      "max_gap_to_reference": _max_gap(run, reference),
      "deviation_max": max(
        (r["deviation"] for r in run if r["deviation"] is not None), default=None
      ),
    }
    for kind in ("wall", "projected"):
      base = time_to_target(baseline, target, f"{kind}_time") if baseline else None
      mine = entry[f"{kind}_to_target"]
      entry[f"speedup_{kind}"] = _speedup_over(base, mine) if baseline else None
    out.append(entry)
  return out


def _color(method: str) -> tuple:
  """One colour per method in every figure (accuracy panels and combine timing alike)."""
  if method not in grid.METHODS:
    return (0.5, 0.5, 0.5, 1.0)
  return plt.get_cmap("tab10")(list(grid.METHODS).index(method))


def _label(method: str) -> str:
  return method.replace("draco_", "DRACO ").replace("_", " ")


def _draw_panel(ax, by_run, attack, s, column, colors, reference):
  for (method, run_attack, run_s), run in by_run.items():
    if (run_attack, run_s) != (attack, s) or method == grid.REFERENCE:
      continue
    style = _DRACO_STYLE if method in grid.DRACO_METHODS else _STYLE
    x = [row[column] for row in run]
    if None not in x:
      ax.plot(
        x, [row["accuracy"] for row in run], color=colors[method], label=_label(method), **style
      )
  if reference and None not in [row[column] for row in reference]:
    x = [row[column] for row in reference]
    ax.plot(x, [row["accuracy"] for row in reference], label="adversary-free", **_REFERENCE_STYLE)
  ax.set_title(f"{attack}, S = {s}")
  ax.grid(alpha=0.3)


def plot_accuracy(rows: Sequence[dict], path: str, column: str, xlabel: str, xscale: str) -> None:
  """Test accuracy vs ``column``, one panel per (attack, S)."""
  by_run, grid_panels = curves(rows), panels(rows)
  attacks = sorted({a for a, _ in grid_panels})
  adversaries = sorted({s for _, s in grid_panels})
  colors = {m: _color(m) for m in _methods(rows)}
  fig, axes = plt.subplots(
    len(adversaries),
    len(attacks),
    squeeze=False,
    sharey=True,
    figsize=(4.5 * len(attacks), 3.4 * len(adversaries)),
  )
  for attack, s in grid_panels:
    ax = axes[adversaries.index(s)][attacks.index(attack)]
    _draw_panel(ax, by_run, attack, s, column, colors, _reference(by_run))
    ax.set_xscale(xscale)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy")
  handles, labels = axes[0][0].get_legend_handles_labels()
  fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
  fig.tight_layout()
  fig.savefig(path, dpi=110, bbox_inches="tight")
  plt.close(fig)


def _timing_series(rows, vary: str, fixed: str):
  """{combiner: (x, ms)} and the floor, along ``vary`` at the most common value of ``fixed``."""
  if not rows:
    return {}, ([], []), None
  value = max({r[fixed] for r in rows}, key=lambda v: sum(r[fixed] == v for r in rows))
  sel = sorted((r for r in rows if r[fixed] == value), key=lambda r: r[vary])
  series = defaultdict(lambda: ([], []))
  floor = {}
  for r in sel:
    series[r["combiner"]][0].append(r[vary])
    series[r["combiner"]][1].append(r["ms"])
    floor.setdefault(r[vary], []).append(r["floor_ms"])
  floor_x = sorted(floor)
  return dict(series), (floor_x, [float(np.median(floor[x])) for x in floor_x]), value


def plot_combine_timing(rows: Sequence[dict], path: str) -> None:
  """Combiner time vs P (fixed D) and vs D (fixed P), log axes, with the plain-sum floor."""
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  for ax, (vary, fixed) in zip(axes, (("P", "D"), ("D", "P"))):
    series, (fx, fy), value = _timing_series(rows, vary, fixed)
    for name, (x, ms) in series.items():
      style = _DRACO_STYLE if name.startswith("draco_") else _STYLE
      ax.plot(x, ms, marker="o", markersize=3, color=_color(name), label=_label(name), **style)
    ax.plot(fx, fy, label="plain-sum floor", **_REFERENCE_STYLE)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(fx, [f"2^{int(np.log2(x))}" if vary == "D" else str(x) for x in fx])
    ax.minorticks_off()
    ax.set_xlabel(f"{vary} ({fixed} = {value})")
    ax.set_ylabel("ms per call (median)")
    ax.grid(alpha=0.3, which="both")
  axes[1].legend(fontsize=8, loc="upper left")
  fig.suptitle("combine time: DRACO decoders vs aggregators (S = 1, float32, one host)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _fmt(value: float | None, spec: str = ".2f", missing: str = "n/r") -> str:
  return missing if value is None else format(value, spec)


def _speedup(value: float | None) -> str:
  if value is None:
    return "n/r"
  return "GM n/r" if value == float("inf") else f"{value:.2f}x"


def _panel_name(attack: str, s: int) -> str:
  return f"{attack} S={s}"


def _headline(summary: Sequence[dict], grid_panels, methods) -> list[str]:
  """One row per method; per-panel values joined by ' / ' in the header's panel order."""
  cells = {(e["method"], e["attack"], e["S"]): e for e in summary}
  order = " / ".join(_panel_name(a, s) for a, s in grid_panels)
  lines = [
    f"Per-panel values in the order {order}.",
    "",
    "| method | final test accuracy | combine ms/step (median) | speedup vs geometric median "
    "to target, projected | speedup vs geometric median to target, wall |",
    "|---|---|---|---|---|",
  ]
  for method in methods:
    if method == grid.REFERENCE:
      continue
    entries = [cells.get((method, a, s)) for a, s in grid_panels]

    def join(key, fmt, entries=entries):
      return " / ".join("-" if e is None else fmt(e[key]) for e in entries)

    lines.append(
      f"| {_label(method)} | {join('final_accuracy', lambda v: _fmt(v, '.3f'))} "
      f"| {join('combine_ms', _fmt)} | {join('speedup_projected', _speedup)} "
      f"| {join('speedup_wall', _speedup)} |"
    )
  return lines


def _details(summary: Sequence[dict], target: float) -> list[str]:
  lines = [
    f"| attack | S | method | final acc | combine ms/step | projected ms/step | steps to "
    f"{target:.0%} | wall s | projected s | speedup vs GM, wall | speedup vs GM, projected |",
    "|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for e in summary:
    speedups = f"{_speedup(e['speedup_wall'])} | {_speedup(e['speedup_projected'])}"
    if e["method"] == grid.REFERENCE:
      speedups = "- | -"
    lines.append(
      f"| {e['attack']} | {e['S']} | {_label(e['method'])} | {e['final_accuracy']:.3f} "
      f"| {_fmt(e['combine_ms'])} | {_fmt(e['projected_ms_per_step'])} "
      f"| {_fmt(e['steps_to_target'], '.0f')} | {_fmt(e['wall_to_target'])} "
      f"| {_fmt(e['projected_to_target'], '.3f')} | {speedups} |"
    )
  return lines


def _equality(summary: Sequence[dict]) -> list[str]:
  lines = [
    "| attack | S | method | max abs(accuracy - adversary-free) | final acc | max relative "
    "deviation from the clean mean |",
    "|---|---|---|---|---|---|",
  ]
  for e in summary:
    if e["method"] in grid.DRACO_METHODS or e["method"] == "mean":
      lines.append(
        f"| {e['attack']} | {e['S']} | {_label(e['method'])} "
        f"| {_fmt(e['max_gap_to_reference'], '.4f', 'n/a')} | {e['final_accuracy']:.3f} "
        f"| {_fmt(e['deviation_max'], '.1e', 'n/a')} |"
      )
  return lines


def _timing_table(timing_rows: Sequence[dict]) -> list[str]:
  """Combine time per call and its ratio to the plain-sum floor, one row per (combiner, P, D)."""
  lines = [
    "| combiner | P | S | D | ms per call | plain-sum floor ms | ratio to floor |",
    "|---|---|---|---|---|---|---|",
  ]
  for r in sorted(timing_rows, key=lambda r: (r["combiner"], r["P"], r["D"])):
    lines.append(
      f"| {_label(r['combiner'])} | {r['P']} | {r['S']} | {r['D']:,} | {r['ms']:.3f} "
      f"| {r['floor_ms']:.3f} | {r['ratio']:.1f}x |"
    )
  return lines


def _figures() -> list[str]:
  """The accuracy figures, embedded (report.md sits beside them)."""
  return [f"![test accuracy vs {xlabel}]({name})" for name, (_, xlabel, _) in _X_AXES.items()]


def write_markdown(
  rows: Sequence[dict], path: str, *, timing_rows: Sequence[dict] = (), command: str = ""
) -> list[dict]:
  """Writes ``report.md`` (figures embedded, combine timing as a table when ``timing_rows``
  are given); returns the per-run summaries."""
  target = rows[0]["target_accuracy"]
  summary = summarize(rows, target)
  reference = next((e for e in summary if e["method"] == grid.REFERENCE), None)
  ref_acc = "" if reference is None else f" (adversary-free: {reference['final_accuracy']:.3f})"
  first = rows[0]
  text = [
    f"# {first['preset']}: DRACO vs robust aggregation",
    "",
    f"P = {first['P']} workers, D = {first['D']:,} parameters, "
    f"{max(r['step'] for r in rows)} steps{ref_acc}. Target: {target:.0%} test accuracy; time to "
    "target = time at the first evaluation at or above it (n/r: not reached). Speedup = the "
    "geometric median's time to target / the method's (GM n/r: only the method reaches it).",
    "",
    "*Wall* = measured training-step time on this one host, where all simulated workers share "
    "the processors (worker_compute=shared, the default: the K partition gradients once per "
    "step for every method; per_worker: R = 2S+1 per DRACO worker). *Projected* = a "
    "cluster projection per step: the slowest worker's measured compute (R x one partition's "
    "gradient time) + encode share + measured combine (decode/aggregate of the received "
    "messages; the attack is not counted) + update; no communication. It is a projection, "
    "not a measurement.",
    "",
    f"## Headline: time to {target:.0%} test accuracy",
    "",
    *_headline(summary, panels(rows), _methods(rows)),
    "",
    "## Test accuracy",
    "",
    *_figures(),
    "",
    "## Every run",
    "",
    *_details(summary, target),
    "",
    "## DRACO trains the adversary-free model",
    "",
    *_equality(summary),
    "",
  ]
  if timing_rows:
    text += [
      "## Combine cost",
      "",
      "![combine time vs P and D](combine_timing.png)",
      "",
      *_timing_table(timing_rows),
      "",
    ]
  if command:
    text += ["Generated by:", "", "```bash", command, "```", ""]
  with open(path, "w") as f:
    f.write("\n".join(text))
  return summary


def _timing_rows(path: str, quick: bool) -> list[dict]:
  """The combine-timing rows at ``path``, running the sweep first when it is missing."""
  if not os.path.exists(path):
    argv = ["--out", path] + (["--quick"] if quick else [])
    combine_timing.main(argv)
  return load_rows(path)


def make_report(
  results: str, out: str | None = None, *, timing: str | None = None, quick_timing: bool = False
) -> list[str]:
  """Writes every plot and ``report.md`` into ``out``; returns the written paths."""
  out = out or os.path.dirname(results) or "."
  os.makedirs(out, exist_ok=True)
  rows = load_rows(results)
  if not rows:
    raise ValueError(f"{results} holds no rows")
  written = []
  for name, (column, xlabel, xscale) in _X_AXES.items():
    written.append(os.path.join(out, name))
    plot_accuracy(rows, written[-1], column, xlabel, xscale)
  timing_rows = _timing_rows(timing or os.path.join(out, "combine_timing.jsonl"), quick_timing)
  written.append(os.path.join(out, "combine_timing.png"))
  plot_combine_timing(timing_rows, written[-1])
  written.append(os.path.join(out, "report.md"))
  command = f"python -m experiments.report {results} --out {out}"
  write_markdown(rows, written[-1], timing_rows=timing_rows, command=command)
  return written


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("results", help="results.jsonl written by experiments.run")
  parser.add_argument("--out", default=None, help="output directory (default: beside RESULTS)")
  parser.add_argument("--timing", default=None, help="combine_timing JSON lines (default: OUT/)")
  parser.add_argument("--quick_timing", action="store_true", help="tiny timing sweep (tests)")
  args = parser.parse_args(argv)
  for path in make_report(
    args.results, args.out, timing=args.timing, quick_timing=args.quick_timing
  ):
    print(f"wrote {path}")


if __name__ == "__main__":
  main()
