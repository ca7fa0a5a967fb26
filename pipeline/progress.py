"""Progress for long work: a tqdm bar on a terminal, a log line every few seconds anywhere else."""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger(__name__)


class Progress:
    def __init__(self, total: int, what: str, unit: str = "img", every_s: float = 10.0):
        self.total, self.what, self.unit, self.every_s = total, what, unit, every_s
        self.done = 0
        self.start = self.last = time.monotonic()
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=what, unit=unit, unit_scale=True, dynamic_ncols=True)

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if now - self.last >= self.every_s or self.done >= self.total:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            log.info("%s: %d/%d %s (%.0f%%, %.0f %s/s)", self.what, self.done, self.total, self.unit,
                     100.0 * self.done / max(self.total, 1), rate, self.unit)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
