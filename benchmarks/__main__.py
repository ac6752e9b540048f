"""Runs the benchmarks: `python -m benchmarks [--tiny] [--out DIR] [NAME ...]`.

Writes DIR/<name>.json for each benchmark run and DIR/README.md, a table of
every result in DIR (default: benchmarks/results). `make bench` runs them all.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Sequence

from benchmarks import ALL
from benchmarks import run_benchmark
from benchmarks import common


def main(argv: Sequence[str]) -> int:
  parser = argparse.ArgumentParser(prog='python -m benchmarks',
                                   description=__doc__)
  parser.add_argument('names', nargs='*', metavar='NAME',
                      help=f'benchmarks to run, of {list(ALL)} (default: all)')
  parser.add_argument('--tiny', action='store_true',
                      help='smoke-test sizes (what tests/benchmarks runs)')
  parser.add_argument('--out', default=common.RESULTS,
                      help='where the JSON files and README.md go')
  args = parser.parse_args(argv)
  unknown = [n for n in args.names if n not in ALL]
  if unknown:
    parser.error(f'unknown benchmark(s) {unknown}; choose from {list(ALL)}')
  names = args.names or list(ALL)
  start = time.perf_counter()
  for name in names:
    t = time.perf_counter()
    result = run_benchmark(name, tiny=args.tiny, out_dir=args.out)
    for fig in result['figures']:
      met = {True: 'met', False: 'MISSED', None: ''}[fig['met']]
      value = fig['value']
      value = f'{value:.4g}' if isinstance(value, float) else value
      print(f"{name:10s} {fig['figure']}: {value} {fig['unit']} "
            f"(goal {fig['goal']}) {met}", flush=True)
    print(f'{name:10s} done in {time.perf_counter() - t:.0f} s', flush=True)
  common.write_table(args.out, ALL)
  print(f'all done in {time.perf_counter() - start:.0f} s; table in '
        f'{args.out}/README.md')
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
