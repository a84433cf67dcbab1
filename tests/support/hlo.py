"""Counting collectives in a compiled XLA module's text (where a step gathers or reduces)."""
import re
from typing import Tuple


def collectives_outside_and_inside_loops(hlo_text: str, op: str = "all-gather",
                                         arrays: bool = False) -> Tuple[int, int]:
  """`(ops outside every while loop, inside one)` of a compiled module's text (`op`: "all-gather",
  "all-reduce", ...); inside means in a loop body or any computation it calls (fusions,
  conditionals' branches, ...). With `arrays`, counts the arrays the ops produce instead: XLA
  combines small collectives into one op over a tuple of arrays (on CPU, all of a step's gradient
  all-reduces become one)."""
  gathers, calls = {}, {}
  for block in hlo_text.split('\n\n'):
    name = re.match(r'\s*(?:ENTRY\s+)?%?([\w.\-]+)', block)
    if name:
      results = [m.group(1) for m in (
          re.match(r'\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s' + re.escape(op) + r'(?:-start)?\(',
                   line) for line in block.split('\n')) if m]
      gathers[name.group(1)] = (sum(len(re.findall(r'\w+\[[\d,]*\]', r)) for r in results)
                                if arrays else len(results))
      callees = re.findall(r'(?:calls|to_apply|body|condition|branch_computations|'
                           r'true_computation|false_computation)=(\{[^}]*\}|%?[\w.\-]+)', block)
      calls[name.group(1)] = {c for group in callees for c in re.findall(r'[\w.\-]+', group)}
  inside = set(re.findall(r'while\(.*?body=%?([\w.\-]+)', hlo_text))
  frontier = list(inside)
  while frontier:
    for callee in calls.get(frontier.pop(), ()):
      if callee not in inside:
        inside.add(callee)
        frontier.append(callee)
  return (sum(n for c, n in gathers.items() if c not in inside),
          sum(n for c, n in gathers.items() if c in inside))
