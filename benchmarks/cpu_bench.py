"""Pieces shared by the benchmark scripts: the machine, the one interleaved timing loop, a
throughput meter, quiet logs, the static binarized-MNIST files, a fixed test subset and the
timed train-then-test run."""

import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Subset

from datamodules.base import EVAL_ORDER_SEED, eval_order
from datamodules.binarized_mnist import STATIC_NPZ

SUBSET_SEED = EVAL_ORDER_SEED  # the test subset does not change with --seed


def cpu_flags() -> tuple[str, set[str]]:
    """CPU model name and flags from /proc/cpuinfo (empty where it does not exist)."""
    name, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    return name, flags


def sync(device: str) -> None:
    """Wait for the work queued on ``device`` (nothing to wait for on a CPU)."""
    if device == "cuda":
        torch.cuda.synchronize()


def interleaved(
    steps: dict[str, Callable[[], None]],
    seconds: float,
    rounds: int,
    warmup: int,
    device: str = "cpu",
) -> dict[str, dict]:
    """Steps/s of each implementation (the median round; ``rates``: every round's): ``warmup``
    untimed steps each, then ``rounds`` rounds of seconds/rounds each (at least one step),
    the implementations taking turns (order reversed every round)."""
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    sync(device)
    rates: dict[str, list[float]] = {name: [] for name in steps}
    counts = dict.fromkeys(steps, 0)
    for r in range(rounds):
        for name in list(steps) if r % 2 == 0 else list(reversed(steps)):
            done, start = 0, time.perf_counter()
            while True:
                steps[name]()
                done += 1
                sync(device)
                elapsed = time.perf_counter() - start
                if elapsed >= seconds / rounds:
                    break
            rates[name].append(done / elapsed)
            counts[name] += done
    return {
        n: {"steps_per_s": statistics.median(v), "steps": counts[n], "rates": v}
        for n, v in rates.items()
    }


def environment() -> dict:
    name, flags = cpu_flags()
    try:
        onednn_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        onednn_bf16 = None
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "lightning": L.__version__,
        "cpu": name,
        "cores_available": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "avx512f": "avx512f" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
        "onednn_bf16_supported": onednn_bf16,
        "load_average_at_start": os.getloadavg(),
    }


def print_environment(env: dict) -> None:
    native = env["avx512_bf16"] or env["amx_bf16"]
    print(f"python {env['python']}  torch {env['torch']}  lightning {env['lightning']}")
    print(f"CPU: {env['cpu']}, {env['cores_available']} cores available")
    print(f"torch threads: {env['torch_threads']}, flush denormals: {env['flush_denormal']}")
    print(
        f"bf16 on this CPU: avx512_bf16={env['avx512_bf16']} amx_bf16={env['amx_bf16']} "
        f"avx512f={env['avx512f']} oneDNN-bf16={env['onednn_bf16_supported']} -> "
        + ("native bf16 instructions" if native else "no native bf16: bf16 math is emulated")
    )
    load = ", ".join(f"{x:.2f}" for x in env["load_average_at_start"])
    print(f"load average at start (1/5/15 min): {load}  (other processes skew timings)")


class Throughput(L.Callback):
    """Training images/s from wall time between batch ends, after `warmup` steps (so data
    loading, logging, epoch turnovers count; one-off start-up costs do not), plus a
    progress line every `every` seconds with the interval means of the logged train terms."""

    def __init__(
        self,
        batch_size: int,
        warmup: int,
        every: float,
        keys: tuple[str, ...] = ("train/nelbo", "train/recon", "train/kl/z", "train/kl_weight"),
    ) -> None:
        self.batch_size, self.warmup, self.every, self.keys = batch_size, warmup, every, keys
        self.batches = 0
        self.t_start = self.t_warm = self.t_last = self.t_print = None
        self.sums: dict[str, float] = {}
        self.count = 0
        self.history: list[dict] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self.t_start = self.t_print = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        self.batches += 1
        if self.batches == self.warmup:
            self.t_warm = now
        self.t_last = now
        metrics = trainer.callback_metrics
        for key in self.keys:
            if key in metrics:
                self.sums[key] = self.sums.get(key, 0.0) + float(metrics[key])
        self.count += 1
        if now - self.t_print >= self.every:
            self.t_print = now
            row = {"s": round(now - self.t_start), "step": trainer.global_step}
            row |= {k.removeprefix("train/"): v / self.count for k, v in self.sums.items()}
            row["img/s"] = self.images_per_s
            self.history.append(row)
            print(
                "  "
                + "  ".join(
                    f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
                ),
                flush=True,
            )
            self.sums, self.count = {}, 0

    @property
    def images_per_s(self) -> float:
        if self.t_warm is None or self.t_last <= self.t_warm:
            return float("nan")
        return (self.batches - self.warmup) * self.batch_size / (self.t_last - self.t_warm)

    @property
    def train_seconds(self) -> float:
        return (self.t_last or 0.0) - (self.t_start or 0.0)


def start(threads: int = 0, flush_denormal: bool = True) -> dict:
    """Set up the process for timing and print the machine: torch threads (0 = torch's
    default), denormal flushing (with vanishing gradients denormal floats made fp32 steps
    several times slower on x86; flushing them changes nothing measurable in the losses),
    quiet Lightning logs. Returns the environment record."""
    if threads:
        torch.set_num_threads(threads)
    if flush_denormal:
        torch.set_flush_denormal(True)
    quiet_lightning()
    env = environment()
    env["flush_denormal"] = flush_denormal
    print_environment(env)
    return env


def quiet_lightning() -> None:
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")


# ---------------------------------------------------------------------------------- data
def data_root(path: str) -> tuple[str, tempfile.TemporaryDirectory | None]:
    """The directory BinarizedMNIST reads: the given one, the file's parent, or a temporary
    directory with a link named binarized_mnist.npz when the file has another name."""
    p = Path(path).expanduser().resolve()
    if p.is_dir():
        if not (p / STATIC_NPZ).is_file():
            sys.exit(f"error: no {STATIC_NPZ} in {p}")
        return str(p), None
    if not p.is_file():
        sys.exit(f"error: {p} does not exist")
    if p.name == STATIC_NPZ:
        return str(p.parent), None
    tmp = tempfile.TemporaryDirectory(prefix="pixelvae_bench_")
    (Path(tmp.name) / STATIC_NPZ).symlink_to(p)
    return tmp.name, tmp


def test_subset(dataset, n: int) -> Subset:
    """The first n test images in the CLI's evaluation order (:func:`eval_order`): a random
    subset (the file is sorted by class), nested across n, identical across runs and equal
    to what ``arvae test --trainer.limit_test_batches`` evaluates."""
    return Subset(dataset, eval_order(dataset).indices[:n])


def timed_trainer(minutes: float, precision: str, callbacks: list[L.Callback]) -> L.Trainer:
    """A CPU Trainer that trains for a wall-clock budget: no validation, logger, checkpoints
    or progress bar (they would cost time that the throughput should not include)."""
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        precision=precision,
        max_time=timedelta(minutes=minutes),
        max_epochs=-1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )


def eval_trainer(precision: str = "32-true") -> L.Trainer:
    """A quiet CPU Trainer for the test pass of a benchmark."""
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def train_then_test(
    model: L.LightningModule,
    dm: L.LightningDataModule,
    meter: Throughput,
    minutes: float,
    precision: str,
    test_loader: DataLoader,
    test_note: str,
    eval_precision: str = "32-true",
    callbacks: Sequence[L.Callback] = (),
) -> tuple[int, float, dict[str, float], float]:
    """Train for `minutes` of wall time (`meter` first among the callbacks), print the steps and
    images/s, print `test_note`, then time the test pass on `test_loader`: the one run every
    benchmark makes, measured the same way in each. Returns steps, epochs, the test metrics
    as floats and the test seconds."""
    trainer = timed_trainer(minutes, precision, [meter, *callbacks])
    trainer.fit(model, datamodule=dm)
    steps = trainer.global_step
    epochs = steps * meter.batch_size / len(dm.train_set)
    print(
        f"  trained {steps} steps ({epochs:.2f} epochs) in {meter.train_seconds:.0f} s: "
        f"{meter.images_per_s:.1f} images/s",
        flush=True,
    )
    print(test_note, flush=True)
    tester = eval_trainer(eval_precision)
    t_eval = time.perf_counter()
    metrics = {k: float(v) for k, v in tester.test(model, test_loader, verbose=False)[0].items()}
    return steps, epochs, metrics, time.perf_counter() - t_eval
