"""Times two or more sides of a benchmark in turn, in one process.

A benchmark that runs one side to the end and then the other is at the mercy of the machine's speed
drifting between the two phases (up to 40 % within minutes on the development VM). Alternating
sides spreads the drift over both. But the first run after the other side has run is slower than a
run that follows one of its own: measured here with the t5-small training step, 15.2 s right after
a transformers step vs 12.8 s after one of ours (the cause is not pinned down). So each
turn runs a side twice and times only the second run, as a user's back-to-back steps would be.
"""
import time
from typing import Callable, Dict, List, Mapping


def time_in_turns(sides: Mapping[str, Callable[[], object]], turns: int,
                  pause_s: float = 0.2) -> Dict[str, List[float]]:
  """`{side: [seconds of its timed run in each turn]}`; each turn runs every side twice in order."""
  times = {name: [] for name in sides}
  for _ in range(turns):
    for name, run in sides.items():
      run()  # settles the side after the other one ran
      time.sleep(pause_s)
      start = time.perf_counter()
      run()
      times[name].append(time.perf_counter() - start)
  return times
