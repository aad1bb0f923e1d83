"""Progress reporting: tqdm when installed and writing to a terminal, plain log lines otherwise."""
from __future__ import annotations

import sys
import time
from collections import defaultdict, deque
from typing import Optional


class RunningMeans:
    """Window averages of named scalars (the loss terms)."""

    def __init__(self, window: int = 20) -> None:
        self.values: dict[str, deque] = defaultdict(lambda: deque(maxlen=window))

    def update(self, **scalars: float) -> None:
        for k, v in scalars.items():
            self.values[k].append(float(v))

    def means(self) -> dict[str, float]:
        return {k: sum(v) / len(v) for k, v in self.values.items() if v}

    def format(self) -> str:
        return " ".join(f"{k} {v:.4f}" for k, v in self.means().items())


class Progress:
    def __init__(self, total: int, desc: str, enabled: bool = True, log_every: int = 10, initial: int = 0) -> None:
        self.total, self.desc, self.enabled, self.log_every = total, desc, enabled, log_every
        self.n, self.start, self.t0 = initial, initial, time.time()
        self.bar: Optional[object] = None
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, text: str) -> None:
        self.n += 1
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(text, refresh=False)
        elif self.n % self.log_every == 0 or self.n == self.total:
            rate = (time.time() - self.t0) / max(1, self.n - self.start)   # this run's steps only
            eta = int(rate * max(0, self.total - self.n))
            print(f"{self.desc} [{self.n}/{self.total}] {rate:.2f}s/it eta {eta // 60}:{eta % 60:02d} {text}",
                  flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
