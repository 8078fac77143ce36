"""Progress of a training epoch on stderr: a live bar on a terminal; where stderr is not a terminal (a log
file, ``climber train ... > log 2>&1``) a plain line every ``PLAIN_EVERY_S`` seconds instead of ``\\r``
redraws: batches done of the epoch's, loss, samples/s and ETA."""

from __future__ import annotations

import os
import sys
import time

from tqdm import tqdm

PLAIN_EVERY_S = 30.0  # seconds between plain progress lines (stderr not a terminal)
BAR_EVERY_S = 0.5  # seconds between redraws of the bar (a terminal)
FALLBACK_SHAPE = (80, 24)  # columns, rows of a terminal that reports none


def terminal_shape(stream) -> dict:
    """tqdm's size arguments for ``stream``: follow the terminal's size, or a fixed 80 x 24 where it
    reports 0 columns or rows (tqdm would hide the bar: it takes the terminal to have no room for it)."""
    try:
        columns, rows = os.get_terminal_size(stream.fileno())
    except (AttributeError, OSError, ValueError):  # no file descriptor, or not a terminal
        columns = rows = 0
    if columns > 0 and rows > 0:
        return {"dynamic_ncols": True}
    return {"ncols": FALLBACK_SHAPE[0], "nrows": FALLBACK_SHAPE[1]}


class Progress:
    """One epoch's progress: ``step`` after every batch with the mean loss so far and the samples trained
    on so far (all processes), ``close`` at the end. Nothing is shown when ``enabled`` is False."""

    def __init__(self, desc: str, total: int, enabled: bool = True):
        self.desc, self.total, self.done = desc, total, 0
        self.t0 = self.last_line = time.monotonic()
        stream = sys.stderr
        self.bar = self.stream = None
        if enabled and stream.isatty():
            self.bar = tqdm(total=total, desc=desc, unit="batch", leave=False, file=stream, mininterval=BAR_EVERY_S,
                            **terminal_shape(stream))
        elif enabled:
            self.stream = stream

    def step(self, loss: float, samples: int) -> None:
        self.done += 1
        now = time.monotonic()
        rate = samples / max(now - self.t0, 1e-9)
        if self.bar is not None:  # the count moves with every batch; the postfix is drawn with it
            self.bar.set_postfix(loss=f"{loss:.4f}", samples_s=f"{rate:.0f}", refresh=False)
            self.bar.update()
        elif self.stream is not None and now - self.last_line >= PLAIN_EVERY_S:
            self.last_line = now
            eta = (self.total - self.done) * (now - self.t0) / self.done
            print(f"{self.desc}: {self.done}/{self.total} batches ({self.done / self.total:.0%}), loss {loss:.4f}, "
                  f"{rate:.0f} samples/s, ETA {tqdm.format_interval(eta)}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
