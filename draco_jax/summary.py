"""What a run reports: its results (results.json and ``train_and_evaluate``'s dict), the verdict
on refused steps, and the summary the command line prints.

A step is *refused* when the combiner's ``report.ok`` is False: its update is skipped.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from draco_jax import aggregators, metrics
from draco_jax.config import TrainConfig

__all__ = ["Totals", "make_results", "refusals", "header", "summary_lines", "summary_text"]


class Totals:
  """Running totals over the steps of one invocation (one dict of float metrics a step)."""

  def __init__(self):
    self.steps = self.skipped = 0
    self.adversaries = self.flagged_adversaries = self.honest = self.flagged_honest = 0
    self.deviations: list[float] = []

  def add(self, m: dict[str, float]) -> None:
    self.steps += 1
    self.skipped += int(not m[metrics.OK])
    self.adversaries += int(m[metrics.ADVERSARIES])
    self.flagged_adversaries += int(m[metrics.FLAGGED_ADVERSARIES])
    self.honest += int(m[metrics.HONEST])
    self.flagged_honest += int(m[metrics.FLAGGED_HONEST])
    if m[metrics.OK]:
      self.deviations.append(m[metrics.DEVIATION])

  def results(self) -> dict[str, float]:
    dev = np.asarray(self.deviations or [np.nan])
    return {
      "steps_run": self.steps,
      "skipped_steps": self.skipped,
      "flagged_fraction": self.flagged_adversaries / max(self.adversaries, 1),
      "honest_flagged_fraction": self.flagged_honest / max(self.honest, 1),
      "deviation_mean": float(np.mean(dev)),
      "deviation_max": float(np.max(dev)),
    }


def refusals(results: dict[str, Any], max_fraction: float) -> tuple[bool, list[str]]:
  """(no step applied, warnings) over this invocation's steps (the whole run's if none ran)."""
  run, refused, scope = results["steps_run"], results["skipped_steps"], "run now"
  if run == 0:
    run, refused, scope = results["final_step"], results["total_skipped_steps"], "in all"
  why = "the combiner's report.ok was False, so the update was skipped"
  if refused == run:
    return True, [
      f"no step was applied: all {run} steps {scope} were refused ({why}); the parameters did "
      "not move"
    ]
  if refused > max_fraction * run:
    return False, [
      f"{refused} of {run} steps {scope} ({refused / run:.0%}) were refused ({why}), more than "
      f"max_refused_fraction = {max_fraction}"
    ]
  return False, []


def make_results(
  config: TrainConfig, totals: Totals, *, accuracy: float, state, wall: float, **run
) -> dict[str, Any]:
  """The results of one invocation (see ``draco_jax.loop.train_and_evaluate``).

  ``run`` holds ``timing_ms``, ``devices``, ``processes`` and ``workdir``.
  """
  results = {
    "test_accuracy": accuracy,
    "final_step": int(state.step),
    "total_skipped_steps": int(state.skipped),
    **totals.results(),
    "wall_time_s": wall,
    "steps_per_second": totals.steps / max(wall, 1e-9),
    **run,
  }
  results["no_step_applied"], results["warnings"] = refusals(results, config.max_refused_fraction)
  return results


def header(config: TrainConfig) -> str:
  """One line: what was run (the scheme, P, S, t, e, the attack, the model and the data)."""
  if config.is_coded:
    title, scheme = "DRACO", f"{config.code} code, DRACO decoder"
  else:
    title, scheme = "Baseline", f"{config.aggregator} aggregator, uncoded"
  counts = f"P={config.num_workers}, S={config.tolerance}, t={config.active_adversaries}"
  if config.num_stragglers:
    counts += f", e={config.num_stragglers}"
  attack = f"attack {config.attack}, {config.placement} placement"
  return (
    f"== {title} run summary: {scheme}; {counts}; {attack}; {config.model} on {config.dataset} =="
  )


def _can_flag(config: TrainConfig) -> bool:
  """Whether the combiner may flag a finite row (see ``aggregators.FLAGS_ONLY_NON_FINITE``)."""
  return config.is_coded or config.aggregator not in aggregators.FLAGS_ONLY_NON_FINITE


def _flagged(config: TrainConfig, fraction: float, rows: str) -> str:
  if rows == "adversarial" and config.active_adversaries == 0:
    return "n/a: no adversary attacks"
  if _can_flag(config):
    return f"{fraction:.4f}"
  if fraction == 0:
    return f"n/a: {config.aggregator} flags only non-finite rows"
  return f"{fraction:.4f} (non-finite rows: {config.aggregator} flags no others)"


def summary_lines(config: TrainConfig, results: dict[str, Any]) -> list[str]:
  """The summary's lines after the header and the warnings."""
  applied = results["steps_run"] - results["skipped_steps"]
  deviation = (
    f"mean {results['deviation_mean']:.2e}, max {results['deviation_max']:.2e} "
    f"over the {applied} applied steps"
    if applied
    else "none: no step applied"
  )
  lines = [
    f"test accuracy            {results['test_accuracy']:.4f}",
    f"refused steps            {results['skipped_steps']} of {results['steps_run']} run "
    f"({results['total_skipped_steps']} of {results['final_step']} in all; refused = "
    "report.ok False, update skipped)",
    f"deviation from clean     {deviation}",
    f"adversarial rows flagged {_flagged(config, results['flagged_fraction'], 'adversarial')}",
    f"honest rows flagged      {_flagged(config, results['honest_flagged_fraction'], 'honest')}",
  ]
  if config.beyond_capacity:
    t, e, s = config.active_adversaries, config.num_stragglers, config.tolerance
    lines.append(
      f"over capacity            2t + e = {2 * t + e} > 2S = {2 * s} (t={t}, e={e}, S={s}): "
      "steps are refused, or applied with the deviation above"
    )
  lines.append(
    f"wall time                {results['wall_time_s']:.1f} s "
    f"({results['steps_per_second']:.1f} steps/s)"
  )
  if results["timing_ms"]:
    timing = ", ".join(f"{k} {v:.2f}" for k, v in results["timing_ms"].items())
    lines.append(f"phase timing (ms)        {timing}")
  return lines + [
    f"devices                  {results['devices']} in {results['processes']} process(es)",
    f"workdir                  {results['workdir']}",
  ]


def summary_text(config: TrainConfig, results: dict[str, Any]) -> str:
  """The printed summary: the header, any warning, then :func:`summary_lines`."""
  warnings = [f"WARNING: {w}" for w in results["warnings"]]
  return "\n".join([header(config), *warnings, *summary_lines(config, results)])
