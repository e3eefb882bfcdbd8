"""The bookkeeping of the stability guard: how many training steps were skipped (their
gradient was not finite), how many bad ones in a row, and the loss terms of the last one.

The counters stay on the model's device and the host reads them one step late: each step
copies them to the host without waiting (on a GPU, with an event marking when the copy is
done), and the next step reads that copy after its own forward and backward are queued. A
GPU step then needs no host sync for the guard, and the check still sees every step.
"""

import torch


class StepGuard:
    """Counters of skipped and bad training steps, updated on the device by :meth:`record`;
    the run of bad steps that :meth:`previous_run` reports is the one recorded a step before."""

    def __init__(self) -> None:
        self._run: torch.Tensor | None = None  # consecutive bad steps, on the device
        self._skipped: torch.Tensor | None = None  # skipped steps since the run started
        self._terms: torch.Tensor | None = None  # the last bad step's loss terms
        self._names: list[str] = []
        self._pending: tuple[torch.Tensor, torch.cuda.Event | None, int] | None = None
        self.last_bad_step = -1  # the global step of the last bad step the host has read

    def __getstate__(self) -> dict:  # a copied model drops the in-flight copy (and its event)
        return {**self.__dict__, "_pending": None}

    def record(
        self, skipped: torch.Tensor, bad: torch.Tensor, terms: dict[str, torch.Tensor], step: int
    ) -> None:
        """Count step ``step``: ``skipped`` (a boolean tensor) says it made no update, ``bad``
        that it counts towards the run of bad steps (a skip that is not the model's fault,
        fp16 AMP finding its scale, does not; it ends the run); ``terms`` are the means of
        its loss terms, kept if it was bad."""
        if self._run is None:
            self._run = torch.zeros((), dtype=torch.int64, device=bad.device)
            self._skipped = torch.zeros_like(self._run)
        self._run = torch.where(bad, self._run + 1, 0)
        self._skipped = self._skipped + skipped
        values = [v.detach().float().reshape(()) for v in terms.values()]
        values = torch.stack(values) if values else torch.zeros(0, device=bad.device)
        if self._terms is None or list(terms) != self._names:
            self._names, self._terms = list(terms), torch.full_like(values, torch.nan)
        self._terms = torch.where(bad, values, self._terms)
        cuda = self._run.is_cuda
        copy = self._run.to("cpu", non_blocking=cuda)  # into pinned memory on a GPU
        event = None
        if cuda:
            event = torch.cuda.Event()
            event.record()
        self._pending = (copy, event, step)

    def previous_run(self) -> int:
        """The number of bad steps in a row up to the last recorded step (0 before any),
        waiting only for that step's copy."""
        if self._pending is None:
            return 0
        copy, event, step = self._pending
        if event is not None:
            event.synchronize()
        run = int(copy)
        if run:
            self.last_bad_step = step
        return run

    @property
    def skipped(self) -> torch.Tensor:
        """The number of skipped steps so far, a tensor on the device (to log)."""
        return self._skipped if self._skipped is not None else torch.zeros((), dtype=torch.int64)

    @property
    def skipped_steps(self) -> int:
        return int(self.skipped)

    @property
    def bad_steps(self) -> int:
        """The current run of bad steps (reading it waits for the device)."""
        return int(self._run) if self._run is not None else 0

    def last_bad_terms(self) -> dict[str, float]:
        """The loss terms of the last bad step (reading them waits for the device)."""
        if self._terms is None:
            return {}
        return dict(zip(self._names, self._terms.tolist(), strict=True))
