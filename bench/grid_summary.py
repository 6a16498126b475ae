"""Summary of a benchmark grid report, as the README shows it: reads, measures nothing.

Recomputes the per-(model, method) summary from the report's rows of *complete* cells (every
method finished: a partly finished grid is summarised on equal terms) and prints, as markdown:
the cells done, the summary table with 95% confidence intervals, the runs that missed the
measured latency band, and how reproducible the latency measurements were; ``--plot`` also draws accuracy vs prune + fine-tune time (the grid
plot ``--mode=benchmark`` draws when the grid finishes).

    python bench/grid_summary.py --report bench/results/benchmark_grid_report.json \
        --plot bench/results/benchmark_grid.png
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ttmpd_jax import evidence  # pylint: disable=wrong-import-position


def complete_cells(runs: list) -> set:
  """Cells (model, dataset, seed, kd) in which every method of the grid finished."""
  methods = {r['method'] for r in runs}
  cells = {evidence.cell_of(r) for r in runs}
  return {c for c in cells if {r['method'] for r in runs if evidence.cell_of(r) == c} == methods}


def complete_runs(runs: list) -> list:
  done = complete_cells(runs)
  return [r for r in runs if evidence.cell_of(r) in done]


def measuring_table(runs: list) -> tuple[list[str], list[list[str]]]:
  """Per method: the share of prune + fine-tune time spent measuring latency (summed over the
  cells), and measurements per run."""
  header = ['method', 'runs', 'measuring s (sum)', 'prune+FT s (sum)', 'measuring share',
            'measurements per run', 'mean s per measurement']
  rows = []
  for method in dict.fromkeys(r['method'] for r in runs):
    mine = [r for r in runs if r['method'] == method and r.get('prune_finetune_s')]
    if not mine:
      continue
    measure = sum((r.get('time_s') or {}).get('measure', 0.0) for r in mine)
    total = sum(r['prune_finetune_s'] for r in mine)
    count = sum(len(r.get('measurements') or []) for r in mine)
    rows.append([method, str(len(mine)), f'{measure:.0f}', f'{total:.0f}',
                 f'{100 * measure / total:.0f}%', f'{count / len(mine):.1f}',
                 f'{measure / count:.1f}' if count else '-'])
  return header, rows


def summary_markdown(report: dict) -> str:
  cells = {evidence.cell_of(r) for r in report['runs']}
  methods = {r['method'] for r in report['runs']}
  done = complete_cells(report['runs'])
  runs = [r for r in report['runs'] if evidence.cell_of(r) in done]   # Compared on equal cells.
  summary = evidence.summarize(runs)
  header, rows = evidence.summary_table(summary)
  lines = [f'{len(done)} complete cells of {len(cells)} begun ({len({c[0] for c in cells})} '
           f'models, {len({c[1] for c in cells})} shifts, {len({c[2] for c in cells})} seeds, '
           f'{len(methods)} methods), {len(runs)} method runs', '',
           evidence.markdown(header, rows), '',
           'Paired accuracy differences (pp; bootstrap: 10,000 resamples of cells; a tie is within '
           f'±{evidence.TIE_PP:g} pp):', '',
           evidence.markdown(*evidence.paired_table(summary)), '',
           evidence.markdown(*measuring_table(runs)), '']
  missed = [f'{r["method"]} on {r.get("model")} {r["dataset"]} seed {r.get("seed")} '
            f'({r["latency_ratio"]:.3f})' for r in runs if not r.get('met_target', True)]
  lines.append('Missed the measured latency band: ' + ('; '.join(missed) if missed else 'none'))
  rep = evidence.reproducibility(runs)
  if rep['n']:
    lines.append(f'Final vs search measurement of the same network: median '
                 f'{100 * rep["median"]:.1f}%, max {100 * rep["max"]:.1f}% of the target '
                 f'(n = {rep["n"]})')
  return '\n'.join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--report', default=os.path.join(ROOT, 'bench', 'results',
                                                       'benchmark_grid_report.json'))
  parser.add_argument('--plot', default='', help='also write the grid plot (PNG) here')
  args = parser.parse_args(argv)
  try:
    with open(args.report) as f:
      report = json.load(f)
  except (OSError, ValueError) as e:
    print(f'error: --report={args.report} cannot be read as a benchmark report ({e}); pass the '
          'report.json a --mode=benchmark run wrote', file=sys.stderr)
    return 2
  if not report.get('runs'):
    print(f'error: --report={args.report} holds no runs; pass the report.json of a '
          '--mode=benchmark run', file=sys.stderr)
    return 2
  print(summary_markdown(report))
  if args.plot:
    target = (report.get('flags') or {}).get('latency_target')
    title = 'accuracy vs prune + fine-tune time' + (f' (target {target:g}' if target else ' (')
    print(evidence.plot_grid(evidence.summarize(complete_runs(report['runs'])), args.plot,
                             title=title + ', 95% CIs)'))
  return 0


if __name__ == '__main__':
  sys.exit(main())
