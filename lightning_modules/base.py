"""The common LightningModule: the model contract, the loss, logging and evaluation.

Every paper's model subclasses :class:`ImageModel` and implements the contract
(``elbo_terms``, ``log_likelihood_bound``, ``sample`` and, with latents, ``reconstruct``);
callbacks, the CLI and the tests use only that contract.

Units: every term is in nats per example (per image). Metrics (DESIGN.md "Evaluation
protocol"): ``{stage}/nelbo`` (the negative ELBO), ``{stage}/recon`` (-log p(x|z)),
``{stage}/kl/<level>`` and, at test time, ``test/kl_bits/<level>`` (the same KL in bits per
image: the code length of z) and ``test/nll_iwae`` (the importance-weighted bound
with ``iwae_k`` samples; the exact NLL for models without latents). On 8-bit data the same
bounds are also reported in bits per dimension: ``{stage}/bpd`` and ``test/bpd_iwae``. Each
test bound ``test/<b>`` comes with ``test/<b>_se``, the standard error of its mean over the
test examples.
"""

import functools
import math
import os
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import torch
from torch import nn
from torchmetrics import MeanMetric

from .backbone import sample_autoregressive
from .likelihoods import LIKELIHOODS, bits_per_dim
from .metrics import StandardError

BOUNDS = ("nelbo", "nll_iwae", "bpd", "bpd_iwae")  # the headline test numbers


class ImageModel(L.LightningModule):
    """Base of every model: shared options for training, evaluation and latents.

    Args:
        image_shape: (C, H, W) of the data; linked from the datamodule by the CLI.
        data_kind: "binary" (Bernoulli pixels, nats per image) or "8bit" (256-way
            categorical pixels, also bits per dimension); linked from the datamodule too.
        lr: learning rate.
        optimizer: "adam" (PixelVAE, AGAVE) or "adamax" (VLAE).
        kl_warmup_steps: linear annealing of the KL weight from 0 to 1 over this many
            optimizer steps (0 = off). Only the training loss is annealed; logged metrics
            are always the true bound.
        free_bits: minimum KL in nats per ``free_bits_unit``, applied per latent level to
            the batch-averaged KL (Kingma et al. 2016): the level's KL is clamped from below
            at free_bits x (its latent dimensions, or the image's C*H*W); 0 = off. Below
            the threshold the KL then gets no gradient.
        free_bits_unit: "latent_dim" (PixelVAE, IAF) or "data_dim" (VLAE's "0.01
            nats/data-dim").
        iwae_k: importance samples for ``test/nll_iwae`` (papers use 5000 / 4096).
        iwae_batch: most decoder evaluations in one forward pass of the IWAE estimate,
            which bounds its memory whatever ``iwae_k`` is.
        eval_seed: seed of the per-example evaluation noise: every test/val example gets
            its own generator seeded by (eval_seed, example index), so metrics do not depend
            on the batch size, the order or the number of DDP ranks.
        max_bad_steps: a step whose loss or gradient is not finite is skipped (no update;
            counted in ``train/skipped_steps``); this many in a row stop the run with a clear
            error after saving ``nonfinite-stop.ckpt`` (the last good weights) beside the
            other checkpoints.
        compile_training: run each training step's :meth:`elbo_terms` through
            ``torch.compile`` (the first steps compile; validation, test and sampling stay
            eager). It fuses the many small element-wise ops of the gated layers, which on
            a GPU each cost a kernel launch; its random numbers are not the eager ones, so
            a compiled run does not repeat an eager run's noise.
    """

    def __init__(
        self,
        image_shape: tuple[int, int, int] = (1, 28, 28),
        data_kind: Literal["binary", "8bit"] = "binary",
        lr: float = 1e-3,
        optimizer: Literal["adam", "adamax"] = "adam",
        kl_warmup_steps: int = 0,
        free_bits: float = 0.0,
        free_bits_unit: Literal["latent_dim", "data_dim"] = "latent_dim",
        iwae_k: int = 100,
        iwae_batch: int = 1000,
        eval_seed: int = 0,
        max_bad_steps: int = 10,
        compile_training: bool = False,
    ) -> None:
        super().__init__()
        if iwae_k < 1 or iwae_batch < 1:
            raise ValueError(f"iwae_k and iwae_batch must be >= 1, got {iwae_k}, {iwae_batch}")
        self.image_shape = tuple(image_shape)
        self.data_kind = data_kind
        self.likelihood = LIKELIHOODS[data_kind]
        self.lr = lr
        self.optimizer_name = optimizer
        self.kl_warmup_steps = kl_warmup_steps
        self.free_bits = free_bits
        self.free_bits_unit = free_bits_unit
        self.iwae_k = iwae_k
        self.iwae_batch = iwae_batch
        self.eval_seed = eval_seed
        if max_bad_steps < 1:
            raise ValueError(f"max_bad_steps must be >= 1, got {max_bad_steps}")
        self.max_bad_steps = max_bad_steps
        self.compile_training = compile_training
        self.bad_steps = 0  # consecutive skipped steps
        self.skipped_steps = 0
        self._bad_terms: dict[str, float] = {}
        self.latent_dims: dict[str, int] = {}  # level name -> number of latent dimensions
        self.metrics = nn.ModuleDict()
        self._generators: list[torch.Generator] | None = None
        self.run_seed: int | None = None  # seeds the training noise; kept in checkpoints
        # called here, while the subclass's __init__ frame is still on the stack, Lightning
        # records the subclass's arguments and these shared ones alike
        self.save_hyperparameters()

    # ----------------------------------------------------------------- the contract
    def elbo_terms(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-example terms in nats: ``recon`` = -log p(x|z) and ``kl/<level>``."""
        raise NotImplementedError

    def log_likelihood_bound(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """Per-example log p(x) lower bound with k importance samples (exact without latents)."""
        raise NotImplementedError

    def sample(self, n: int, noise: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """n images drawn from the model, shaped (n, C, H, W). ``noise`` (from
        :meth:`sample_noise`) fixes every level's sampling noise, which makes the sample a
        deterministic function of it; None draws fresh noise."""
        raise NotImplementedError

    def sample_noise(self, n: int, generator: torch.Generator | None = None):
        """All the noise one call of :meth:`sample` consumes, per level (top latent first,
        pixels ``"x"`` last): hold all but one level fixed to see what that level models."""
        raise NotImplementedError

    # ------------------------------------------------------------------ utilities
    def check_input(self, x: torch.Tensor) -> None:
        """Fail loudly on data that does not match the model instead of broadcasting it."""
        if x.dim() != 4 or tuple(x.shape[1:]) != self.image_shape:
            shape = ", ".join(map(str, self.image_shape))
            raise ValueError(
                f"{type(self).__name__} expects images shaped (B, {shape}),"
                f" got {tuple(x.shape)}. Set model.init_args.image_shape to match the data"
                " (the CLI links it from data.data_shape) or fix the datamodule's output."
            )

    @contextmanager
    def per_example_noise(self, index: torch.Tensor):
        """Within this context :meth:`randn` draws each example's noise from its own generator."""
        seeds = [(self.eval_seed << 32) + int(i) for i in index.tolist()]
        self._generators = [torch.Generator().manual_seed(s) for s in seeds]
        try:
            yield
        finally:
            self._generators = None

    def randn(self, batch: int, *shape: int) -> torch.Tensor:
        """Standard-normal noise (batch, *shape) for latent sampling; per example when in
        :meth:`per_example_noise`."""
        if self._generators is None:
            return torch.randn(batch, *shape, device=self.device)
        if len(self._generators) != batch:
            raise RuntimeError(f"per-example noise set for {len(self._generators)}, asked {batch}")
        rows = [torch.randn(shape, generator=g) for g in self._generators]
        return torch.stack(rows).to(self.device)

    def sample_pixels(self, n: int, params_fn, context_rows: int, noise=None) -> torch.Tensor:
        """n images drawn from this model's likelihood pixel by pixel (R -> G -> B within a
        pixel) with ``params_fn(x_rows, rows)`` giving the parameters of those canvas rows;
        each row sees ``context_rows`` rows above it (the PixelCNN's receptive field)."""
        return sample_autoregressive(
            params_fn,
            self.likelihood.sample,
            (n, *self.image_shape),
            self.device,
            noise=noise,
            context_rows=context_rows,
        )

    def iwae_chunk(self, batch: int) -> int:
        """Importance samples per forward pass so that batch x chunk <= iwae_batch."""
        return max(1, self.iwae_batch // batch)

    def to_unit_range(self, x: torch.Tensor) -> torch.Tensor:
        """Images of this model's data kind scaled to [0, 1], for display."""
        return x.float() / (255.0 if self.data_kind == "8bit" else 1.0)

    @property
    def dims(self) -> int:
        """Dimensions of one image, C * H * W (the denominator of bits per dimension)."""
        return math.prod(self.image_shape)

    @property
    def kl_weight(self) -> float:
        if self.kl_warmup_steps <= 0:
            return 1.0
        return min(1.0, self.global_step / self.kl_warmup_steps)

    def loss(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        """Training objective: mean recon + KL weight x per-level KL (with free bits)."""
        loss = terms["recon"].mean()
        for level, dims in self.latent_dims.items():
            kl = terms[f"kl/{level}"].mean()
            if self.free_bits > 0:
                unit = dims if self.free_bits_unit == "latent_dim" else self.dims
                kl = torch.clamp(kl, min=self.free_bits * unit)
            loss = loss + self.kl_weight * kl
        return loss

    @staticmethod
    def nelbo(terms: dict[str, torch.Tensor]) -> torch.Tensor:
        """Negative ELBO per example: recon + every KL term."""
        return terms["recon"] + sum(v for k, v in terms.items() if k.startswith("kl/"))

    # ------------------------------------------------------------------ Lightning
    def configure_optimizers(self) -> torch.optim.Optimizer:
        cls = {"adam": torch.optim.Adam, "adamax": torch.optim.Adamax}[self.optimizer_name]
        return cls(self.parameters(), lr=self.lr)

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        """Seed the batch's training noise (latent samples) from the run's seed, the epoch,
        the batch and the rank: a run resumed from a mid-epoch checkpoint then draws the
        same noise as the run that was never stopped (the seed is in the checkpoint)."""
        if self.run_seed is None:
            self.run_seed = int(os.environ.get("PL_GLOBAL_SEED", torch.initial_seed()))
        key = [self.run_seed, self.current_epoch, batch_idx, self.global_rank]
        torch.manual_seed(int(np.random.SeedSequence(key).generate_state(1)[0]))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["arvae_run_seed"] = self.run_seed

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.run_seed = checkpoint.get("arvae_run_seed")

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        x, _ = batch
        self.check_input(x)
        if self.compile_training:
            terms = compiled(type(self).elbo_terms)(self, x)
        else:
            terms = self.elbo_terms(x)
        loss = self.loss(terms)
        if not torch.isfinite(loss):  # its gradient is not finite either: the step is skipped
            self._bad_terms = {k: float(v.float().mean()) for k, v in terms.items()}
            return loss
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/nelbo", self.nelbo(terms).mean())
        if self.data_kind == "8bit":
            self.log("train/bpd", bits_per_dim(self.nelbo(terms).mean(), self.dims))
        for name, value in terms.items():
            self.log(f"train/{name}", value.mean())
        if self.latent_dims:
            self.log("train/kl_weight", self.kl_weight)
        return loss

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        """Run forward and backward, then update only if every gradient is finite.

        Under DDP the gradients are all-reduced before this check, so a non-finite value on
        any rank is seen by all of them and every rank skips the same step. The global
        gradient norm is logged as ``train/grad_norm``. A skipped batch still counts in
        ``global_step`` (as AMP's skipped steps do), so max_steps and schedules stay tied to
        the batches seen.
        """
        optimizer_closure()
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        # one fused (foreach) reduction: per-tensor norms cost a kernel launch each
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        if torch.isfinite(norm):
            self.bad_steps, self._bad_terms = 0, {}
            self.log("train/grad_norm", norm)
            optimizer.step()  # the closure already ran; clipping, if configured, applies here
            return
        self.bad_steps += 1
        self.skipped_steps += 1
        self.log("train/skipped_steps", float(self.skipped_steps))
        optimizer.zero_grad()
        if self.bad_steps >= self.max_bad_steps:
            self._stop_on_nonfinite()

    def _stop_on_nonfinite(self) -> None:
        trainer = self.trainer
        ckpt = trainer.checkpoint_callback
        folder = Path(ckpt.dirpath if ckpt and ckpt.dirpath else trainer.default_root_dir)
        path = folder / "nonfinite-stop.ckpt"
        trainer.save_checkpoint(path)  # every rank calls it (a collective); rank 0 writes
        terms = self._bad_terms or "finite loss, non-finite gradient"
        raise FloatingPointError(
            f"{self.bad_steps} training steps in a row had a non-finite loss or gradient (last"
            f" at step {self.global_step}, batch terms: {terms}); the run stops. The last good"
            f" weights are in {path}. Lower model.init_args.lr, turn on kl_warmup_steps or"
            " gradient clipping (trainer.gradient_clip_val), or train with precision 32-true;"
            " resume with --ckpt_path."
        )

    def _update(self, stage: str, name: str, values: torch.Tensor) -> None:
        """Accumulate per-example values into ``{stage}/{name}`` (their mean) and, for the
        test bounds, ``{stage}/{name}_se`` (the standard error of that mean)."""
        self._accumulate(f"{stage}/{name}", values, MeanMetric, prog_bar=name in BOUNDS)
        if stage == "test" and name in BOUNDS:
            self._accumulate(f"{stage}/{name}_se", values, StandardError, prog_bar=False)

    def _accumulate(self, key: str, values: torch.Tensor, kind: type, prog_bar: bool) -> None:
        mkey = key.replace("/", "__")
        if mkey not in self.metrics:
            self.metrics[mkey] = kind().to(self.device)
        metric = self.metrics[mkey]
        metric.update(values.float())
        self.log(
            key,
            metric,
            on_step=False,
            on_epoch=True,
            prog_bar=prog_bar,
            metric_attribute=f"metrics.{mkey}",
        )

    def _evaluate(self, stage: str, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        x, index = batch
        self.check_input(x)
        with self.per_example_noise(index):
            terms = self.elbo_terms(x)
            nelbo = self.nelbo(terms)
            self._update(stage, "nelbo", nelbo)
            for name, value in terms.items():
                self._update(stage, name, value)
                if stage == "test" and name.startswith("kl/"):  # the code length (VLAE §4.1)
                    self._update(stage, name.replace("kl/", "kl_bits/", 1), value / math.log(2))
            if self.data_kind == "8bit":
                self._update(stage, "bpd", bits_per_dim(nelbo, self.dims))
            if stage == "test":
                nll = -self.log_likelihood_bound(x, self.iwae_k)
                self._update(stage, "nll_iwae", nll)
                if self.data_kind == "8bit":
                    self._update(stage, "bpd_iwae", bits_per_dim(nll, self.dims))

    def validation_step(self, batch, batch_idx):
        self._evaluate("val", batch)

    def test_step(self, batch, batch_idx):
        self._evaluate("test", batch)


@functools.cache
def compiled(fn: Callable) -> Callable:
    """``torch.compile(fn)``, wrapped once per function: wrapping costs ~1 ms, too much for
    every training step, and nothing is stored on the model, which stays picklable."""
    return torch.compile(fn)


def log_mean_exp(log_w: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """log(mean(exp(log_w))) along dim, stably: the importance-weighted bound from log weights."""
    return torch.logsumexp(log_w, dim) - math.log(log_w.shape[dim])
