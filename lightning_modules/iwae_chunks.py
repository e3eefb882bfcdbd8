"""How many importance samples one decoder pass of the IWAE bound takes.

The k samples of a test batch go through the decoder in passes of ``batch x n``
evaluations. Too few per pass wastes the machine on per-call overhead; too many overflow
the caches (on a CPU, passes of 1000 MNIST images ran 2.6x slower per image than passes of
100) or the memory. :class:`ChunkTuner` finds the size on the first batch of each batch size:
it doubles ``n`` from a small pass while the time per evaluation keeps falling, and stays
within the memory it is given (on a GPU, measured per evaluation on the first pass; an
out-of-memory pass is retried at half the size). The passes it times are the bound's own
passes, so no work is spent on tuning, and each sample's noise is drawn on its own
(``ImageModel.importance_noise``): the bound does not depend on the sizes chosen.
"""

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

MIN_GAIN = 0.95  # a doubling is kept when it cuts the time per evaluation by >= 5%


@dataclass
class _Search:
    """The tuning state of one batch size."""

    n: int  # samples per pass now
    cap: int  # most samples per pass (memory)
    best_rate: float = float("inf")  # seconds per evaluation at the best n so far
    settled: bool = False


class ChunkTuner:
    """Samples per pass for each batch size, tuned while the bound runs.

    Args:
        max_evaluations: the largest pass tried when tuning (a bound on its memory).
        memory_fraction: on a GPU, the share of the free memory (at the first pass) that
            one pass may use.
    """

    def __init__(self, max_evaluations: int = 4096, memory_fraction: float = 0.5) -> None:
        self.max_evaluations = max_evaluations
        self.memory_fraction = memory_fraction
        self.searches: dict[int, _Search] = {}

    def size(self, batch: int, device: torch.device) -> int:
        """Samples per pass for a batch of ``batch`` examples."""
        if batch not in self.searches:
            start = 256 if device.type == "cuda" else 64
            self.searches[batch] = _Search(
                n=max(1, start // batch), cap=max(1, self.max_evaluations // batch)
            )
        return self.searches[batch].n

    @contextmanager
    def timing(self, batch: int, n: int, device: torch.device) -> Iterator[None]:
        """Run one pass of ``n`` samples; learn from it when it is the planned size. Out of
        GPU memory, the size is halved for good and the pass retried (:class:`RetryPass`);
        a pass of one sample that does not fit raises the error itself."""
        search = self.searches.get(batch)
        learning = search is not None and not search.settled and n == search.n
        cuda = device.type == "cuda"
        if learning and cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            free = torch.cuda.mem_get_info(device)[0]
        start = time.perf_counter()
        try:
            yield
        except torch.cuda.OutOfMemoryError:
            if search is None or n == 1:
                raise
            search.cap = search.n = n // 2
            search.settled = True
            raise RetryPass from None
        if not learning:
            return
        if cuda:
            torch.cuda.synchronize(device)
            per_sample = max(1, torch.cuda.max_memory_allocated(device) - before) / n
            search.cap = min(search.cap, max(1, int(self.memory_fraction * free / per_sample)))
        self.learn(search, n, (time.perf_counter() - start) / (batch * n))

    @staticmethod
    def learn(search: _Search, n: int, rate: float) -> None:
        """Keep doubling while the time per evaluation falls enough; else settle on the best."""
        if rate < MIN_GAIN * search.best_rate:
            search.best_rate = rate
            if 2 * n <= search.cap:
                search.n = 2 * n
                return
            search.n = min(n, search.cap)
        else:
            search.n = max(1, n // 2)  # the size before this doubling was faster
        search.settled = True


class RetryPass(Exception):
    """The pass ran out of memory and should run again at the tuner's new size."""
