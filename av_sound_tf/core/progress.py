"""Progress lines for every long stage: "i of N", rate, ETA (and failures, when any).

One implementation for preparation (data_prep), prediction, evaluation, int8 calibration
and tagging:

  [predict] 640 of 2000 clips (32.0%), 85.3 clips/s, ETA 00:00:15
  [prepare] 12 of 40 clips (30.0%), 2.0 clips/s, ETA 00:00:14, 1 failed

A line is logged at most every `every` seconds, and always for the last item (when `done`
reaches `total`, or at `finish()` when the total was wrong or unknown).
"""

import time
from typing import Callable, Optional

from absl import logging


def format_eta(seconds: float) -> str:
  """HH:MM:SS, with hours past 24 kept (100:00:00), '?' when unknown."""
  if seconds != seconds or seconds in (float("inf"), float("-inf")) or seconds < 0:
    return "?"
  s = int(round(seconds))
  return f"{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Progress:
  """Counts items done and logs "[stage] i of N unit (p%), r unit/s, ETA ..." lines.

  Args:
    total: items expected (None or 0: unknown, the line has no N, percentage or ETA).
    stage: the tag in brackets.
    unit: what is counted ("clips", "files", "windows").
    already_done: items finished by an earlier run (counted in i, not in the rate).
    every: seconds between lines (0: a line per update).
    log: called with each line (one string).
    clock: seconds, monotonic (tests pass a fake).
  """

  def __init__(self, total: Optional[int], stage: str = "prepare", unit: str = "clips",
               already_done: int = 0, every: float = 5.0,
               log: Callable[[str], None] = logging.info,
               clock: Callable[[], float] = time.monotonic):
    self.total = int(total) if total else None
    self.stage, self.unit = stage, unit
    self.done = self.start_done = int(already_done)
    self.failed = 0
    self.every, self.log, self.clock = every, log, clock
    self.t0 = self.last = clock()
    self._logged = False  # whether the current count has been logged

  def update(self, n: int = 1, failed=0):
    """Adds `n` items done (`failed` of them failed: a bool counts as 0 or 1)."""
    self.done += int(n)
    self.failed += int(failed)
    self._logged = False
    now = self.clock()
    if now - self.last >= self.every or (self.total and self.done == self.total):
      self._emit(now)

  def finish(self):
    """Logs the last line unless the last update already did."""
    if not self._logged:
      self._emit(self.clock())

  def _emit(self, now):
    self.last = now
    self._logged = True
    self.log(self.line(now))

  def rate(self, now: Optional[float] = None) -> float:
    """Items per second since the start (items of an earlier run excluded)."""
    elapsed = (self.clock() if now is None else now) - self.t0
    return (self.done - self.start_done) / elapsed if elapsed > 0 else 0.0

  def line(self, now: Optional[float] = None) -> str:
    rate = self.rate(now)
    failed = f", {self.failed} failed" if self.failed else ""
    if not self.total:
      return f"[{self.stage}] {self.done} {self.unit}, {rate:.1f} {self.unit}/s{failed}"
    left = max(self.total - self.done, 0)
    eta = format_eta(left / rate) if rate > 0 else ("00:00:00" if not left else "?")
    pct = 100.0 * self.done / self.total
    return (f"[{self.stage}] {self.done} of {self.total} {self.unit} ({pct:.1f}%), "
            f"{rate:.1f} {self.unit}/s, ETA {eta}{failed}")
