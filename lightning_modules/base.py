"""The common LightningModule: the model contract, the loss, logging and evaluation.

Every paper's model subclasses :class:`ImageModel` and implements the contract:
``elbo_terms`` (per-example terms, each declared in :attr:`ImageModel.term_kinds` as part of
the bound, a KL or a diagnostic), ``sample`` / ``sample_noise`` and, with latents (declared
in ``latent_shapes``), ``encode``, ``log_weights`` and ``reconstruct``. The base builds the
loss and -ELBO from the declaration and runs the one importance-weighting path
(:meth:`ImageModel.log_likelihood_bound`); callbacks, the CLI and the tests use only that
contract.

Units: every term is in nats per example (per image). Metrics (DESIGN.md "Evaluation
protocol"): ``{stage}/nelbo`` (the negative ELBO), ``{stage}/recon`` (-log p(x|z)),
``{stage}/kl/<level>`` and, at test time, ``test/kl_bits/<level>`` (the same KL in bits per
image: the code length of z) and ``test/nll_iwae`` (the importance-weighted bound
with ``iwae_k`` samples; the exact NLL for models without latents). On 8-bit data the same
bounds are also reported in bits per dimension: ``{stage}/bpd`` and ``test/bpd_iwae``. Each
test bound ``test/<b>`` comes with ``test/<b>_se``, the standard error of its mean over the
test examples. ``{stage}/active_units/<level>`` counts the level's active units (Burda et al.
2015; :class:`~lightning_modules.metrics.ActiveUnits`): 0 is a collapsed posterior.
"""

import functools
import math
import os
import warnings
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import nn
from torchmetrics import MeanMetric

from . import legacy_options
from .backbone import (
    PixelDecoder,
    PixelDecoderFactory,
    as_factory,
    built,
    network_config,
    sample_autoregressive,
)
from .iwae_chunks import ChunkTuner, RetryPass
from .likelihoods import LIKELIHOODS, Likelihood, bits_per_dim
from .metrics import ActiveUnits, StandardError
from .step_guard import StepGuard

BOUNDS = ("nelbo", "nll_iwae", "bpd", "bpd_iwae")  # the headline test numbers
TermKind = Literal["bound", "kl", "auxiliary", "diagnostic"]
"""How a term of ``elbo_terms`` counts: ``bound``, a term of -ELBO and of the loss; ``kl``,
the same for a latent level's KL (``kl/<level>``: KL warm-up and free bits apply to these
only); ``auxiliary``, a term of the loss that is not part of the bound (AGAVE's
reconstruction of its auxiliary image); ``diagnostic``, logged but in neither."""
CompileMode = Literal["default", "reduce-overhead", "max-autotune"]  # torch.compile's modes


class ImageModel(L.LightningModule):
    """Base of every model: shared options for training, evaluation and latents.

    Args:
        image_shape: (C, H, W) of the data; linked from the datamodule by the CLI.
        data_kind: "binary" (nats per image) or "8bit" (also bits per dimension): the units
            and the display of the data, linked from the datamodule too; it picks the pixel
            likelihood only when ``likelihood`` is not given.
        likelihood: the output distribution of the pixels (``lightning_modules.likelihoods``);
            None = the default of ``data_kind`` (Bernoulli, or the 256-way categorical).
        lr: learning rate.
        optimizer: "adam" (PixelVAE, PixelCNN++, AGAVE) or "adamax" (VLAE).
        lr_decay: the learning rate is multiplied by this after every optimizer step
            (PixelCNN++: 0.999995); 1 = constant.
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
        iwae_batch: decoder evaluations in one forward pass of the IWAE estimate, which
            bounds its memory whatever ``iwae_k`` is; None = tuned on the first test batch
            (:class:`~lightning_modules.iwae_chunks.ChunkTuner`: the fastest per image
            within the memory, up to 4096; on a CPU passes of 1000 images ran 2.6x slower
            than passes of 100). The bound does not depend on it.
        iwae_bf16: run the importance-weighted bound's decoder passes under bf16 autocast
            (the likelihoods stay float32); see benchmarks/iwae_speed.py for its effect on
            the bound.
        eval_seed: seed of the per-example evaluation noise: every test/val example gets
            its own generator seeded by (eval_seed, example index) and draws each importance
            sample on its own, so metrics do not depend on the batch size, the chunk size,
            the order or the number of DDP ranks.
        max_bad_steps: a step whose loss or gradient is not finite is skipped (no update;
            counted in ``train/skipped_steps``); this many in a row stop the run with a clear
            error after saving ``nonfinite-stop.ckpt`` (the last good weights) beside the
            other checkpoints.
        compile_training: run each training step's :meth:`elbo_terms` (forward and, through
            AOTAutograd, backward) through ``torch.compile`` (the first steps compile;
            validation, test and sampling stay eager). True or ``"default"`` fuses the many
            small element-wise ops of the gated layers, which on a GPU each cost a kernel
            launch; ``"reduce-overhead"`` also captures the step's kernels in CUDA graphs on
            a GPU (one launch per graph; on a CPU it is the default mode); ``"max-autotune"``
            also tunes the kernels. Where compiling fails (no C++ compiler or Triton, an op
            the compiler cannot trace), the run warns once and goes on eagerly. Its random
            numbers are not the eager ones, so a compiled run does not repeat an eager run's
            noise.
    """

    def __init__(
        self,
        image_shape: tuple[int, int, int] = (1, 28, 28),
        data_kind: Literal["binary", "8bit"] = "binary",
        likelihood: Likelihood | None = None,
        lr: float = 1e-3,
        optimizer: Literal["adam", "adamax"] = "adam",
        lr_decay: float = 1.0,
        kl_warmup_steps: int = 0,
        free_bits: float = 0.0,
        free_bits_unit: Literal["latent_dim", "data_dim"] = "latent_dim",
        iwae_k: int = 100,
        iwae_batch: int | None = None,
        iwae_bf16: bool = False,
        eval_seed: int = 0,
        max_bad_steps: int = 10,
        compile_training: bool | CompileMode = False,
    ) -> None:
        super().__init__()
        if iwae_k < 1 or (iwae_batch is not None and iwae_batch < 1):
            raise ValueError(f"iwae_k and iwae_batch must be >= 1, got {iwae_k}, {iwae_batch}")
        self.image_shape = tuple(image_shape)
        self.data_kind = data_kind
        self.likelihood = LIKELIHOODS[data_kind] if likelihood is None else built(likelihood)
        self.lr = lr
        self.optimizer_name = optimizer
        if not 0 < lr_decay <= 1:
            raise ValueError(f"lr_decay must be in (0, 1], got {lr_decay}")
        self.lr_decay = lr_decay
        self.kl_warmup_steps = kl_warmup_steps
        self.free_bits = free_bits
        self.free_bits_unit = free_bits_unit
        self.iwae_k = iwae_k
        self.iwae_batch = iwae_batch
        self.iwae_bf16 = iwae_bf16
        self.chunk_tuner = ChunkTuner()
        self.eval_seed = eval_seed
        if max_bad_steps < 1:
            raise ValueError(f"max_bad_steps must be >= 1, got {max_bad_steps}")
        self.max_bad_steps = max_bad_steps
        if compile_training not in (False, True, *CompileMode.__args__):
            raise ValueError(
                f"compile_training must be true, false or one of {CompileMode.__args__}, got"
                f" {compile_training!r}"
            )
        self.compile_training = compile_training
        self._compile_failed = False
        self.guard = StepGuard()
        self._step_terms: dict[str, torch.Tensor] = {}
        # latent level -> shape of one importance sample's standard-normal noise (top first
        # for hierarchies); empty: no latent, and the bound is the exact log-likelihood
        self.latent_shapes: dict[str, tuple[int, ...]] = {}
        self.metrics = nn.ModuleDict()
        self._generators: list[torch.Generator] | None = None
        self.run_seed: int | None = None  # seeds the training noise; kept in checkpoints
        # called here, while the subclass's __init__ frame is still on the stack, Lightning
        # records the subclass's arguments and these shared ones alike
        self.save_hyperparameters()
        configs = {k: network_config(v) for k, v in self.hparams.items()}
        if any(c is not None and c != self.hparams[k] for k, c in configs.items()):
            # a network option (class, partial, partial dict) as the full config building it
            self.save_hyperparameters({k: configs[k] or v for k, v in self.hparams.items()})

    # ----------------------------------------------------------------- the contract
    def elbo_terms(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-example terms in nats, every one declared in :attr:`term_kinds`: ``recon`` =
        -log p(x|z) and ``kl/<level>`` for the latent levels, plus any a model adds."""
        raise NotImplementedError

    @property
    def term_kinds(self) -> dict[str, TermKind]:
        """What each term of :meth:`elbo_terms` is (see :data:`TermKind`): ``recon`` and one
        ``kl/<level>`` per latent level by default. A model that returns other terms (an
        auxiliary reconstruction, a diagnostic) extends this; an undeclared term is an error."""
        return {"recon": "bound", **{f"kl/{level}": "kl" for level in self.latent_shapes}}

    def evaluation_metrics(self, terms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-example metrics a model derives from its terms (validation and test), each
        logged as ``{stage}/<name>``, its mean over the examples: none by default."""
        return {}

    def encode(self, x: torch.Tensor):
        """Latent models: the parameters of q(z|x), whatever :meth:`log_weights` needs; run
        once per image by the importance-weighted bound."""
        raise NotImplementedError

    def posterior_mean(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Latent models: E_q[z|x] per level, ``{level: (B, *latent_shapes[level])}``; its
        variance over x counts the active units (``{stage}/active_units/<level>``)."""
        raise NotImplementedError

    def log_weights(self, x: torch.Tensor, q, eps: dict[str, torch.Tensor]) -> torch.Tensor:
        """Latent models: log p(x, z_s) - log q(z_s | x) for n importance samples per example,
        (B, n), with z_s drawn from ``q`` (from :meth:`encode`) by the standard-normal noise
        ``eps[level]`` shaped (B, n, *latent_shapes[level])."""
        raise NotImplementedError

    @torch.no_grad()
    def log_likelihood_bound(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """Per-example log p(x) lower bound with k importance samples (Burda et al. 2015):
        log (1/k) sum_s p(x, z_s) / q(z_s | x), z_s ~ q(z|x); exact without latents. The
        encoder runs once; the samples go through :meth:`log_weights` in passes sized by
        ``iwae_batch`` or tuned (:attr:`chunk_tuner`), each sample's noise drawn on its own,
        so the bound does not depend on the pass sizes."""
        self.check_input(x)
        if not self.latent_shapes:
            return -self.nelbo(self.checked(self.elbo_terms(x)))
        b = x.shape[0]
        q = self.encode(x)
        log_w, done = [], 0
        while done < k:
            self.stop_if_signalled()  # a batch of k = 5000 takes minutes on a CPU
            n = min(self.iwae_samples_per_pass(b), k - done)
            log_w.append(self.iwae_pass(x, q, self.importance_noise(b, n)))
            done += n
        return log_mean_exp(torch.cat(log_w, dim=1))

    def iwae_pass(self, x: torch.Tensor, q, eps: dict[str, torch.Tensor]) -> torch.Tensor:
        """Log weights (B, n) of the samples ``eps`` in one decoder pass (timed by the
        tuner), or, out of GPU memory, in passes of the tuner's smaller size with the same
        noise (drawn once: a retried pass must not draw other samples)."""
        b, n = x.shape[0], next(iter(eps.values())).shape[1]
        tuning = (
            self.chunk_tuner.timing(b, n, self.device) if self.iwae_batch is None else nullcontext()
        )
        try:
            with tuning, self.iwae_autocast():
                return self.log_weights(x, q, eps).float()
        except RetryPass:
            torch.cuda.empty_cache()
        parts, start = [], 0
        while start < n:  # the size may shrink again on the way
            stop = start + self.iwae_samples_per_pass(b)
            parts.append(self.iwae_pass(x, q, {k: e[:, start:stop] for k, e in eps.items()}))
            start = stop
        return torch.cat(parts, dim=1)

    def iwae_samples_per_pass(self, batch: int) -> int:
        """Importance samples per decoder pass: ``iwae_batch // batch`` when set, else tuned."""
        if self.iwae_batch is not None:
            return max(1, self.iwae_batch // batch)
        return self.chunk_tuner.size(batch, self.device)

    def iwae_autocast(self):
        """bf16 autocast for the bound's decoder passes when ``iwae_bf16`` is set."""
        return torch.autocast(self.device.type, torch.bfloat16, enabled=self.iwae_bf16)

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

    def stop_if_signalled(self) -> None:
        """Raise Lightning's SIGTERMException if the trainer got a SIGTERM: long work inside
        one batch (an importance-weighted bound, pixel-by-pixel sampling) calls this between
        its pieces, so that a stop takes seconds, not the rest of the batch. The stop then
        goes as Lightning's between batches does (``on_exception`` hooks, then exit)."""
        try:
            stop = self.trainer.received_sigterm
        except RuntimeError:  # not attached to a trainer: nothing to stop
            return
        if stop:
            raise SIGTERMException

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

    def importance_noise(self, batch: int, n: int) -> dict[str, torch.Tensor]:
        """Standard-normal noise of n importance samples per example for every latent level,
        ``{level: (batch, n, *shape)}``. Under :meth:`per_example_noise` each sample is one
        draw per level from its example's generator: CPU ``torch.randn`` gives other numbers
        for one (20, 5) draw than for two (10, 5) ones, so drawing a chunk at once would tie
        the samples to the chunk size, the batch size and the number of ranks."""
        if self._generators is None:
            return {
                level: torch.randn(batch, n, *shape, device=self.device)
                for level, shape in self.latent_shapes.items()
            }
        if len(self._generators) != batch:
            raise RuntimeError(f"per-example noise set for {len(self._generators)}, asked {batch}")
        draws: dict[str, list[torch.Tensor]] = {level: [] for level in self.latent_shapes}
        for g in self._generators:
            for _ in range(n):
                for level, shape in self.latent_shapes.items():
                    draws[level].append(torch.randn(shape, generator=g))
        return {
            level: torch.stack(rows).view(batch, n, *self.latent_shapes[level]).to(self.device)
            for level, rows in draws.items()
        }

    def pixel_decoder(
        self,
        factory: PixelDecoderFactory,
        in_channels: int | None = None,
        cond_vec_dim: int = 0,
        cond_map_channels: int = 0,
        runs_data_init: bool = False,
        likelihood: Likelihood | None = None,
        channels: int | None = None,
    ) -> PixelDecoder:
        """The model's pixel network from its ``pixelcnn`` option, sized for this data and
        likelihood (or for images of ``channels`` under ``likelihood``: another level of the
        model): one parameter group per colour when the likelihood draws a pixel's
        channels one after another (each group then sees the earlier colours of the pixel),
        else one for the whole pixel (the network sees none of it). A network with a
        data-dependent init needs a model whose :meth:`data_dependent_init` runs it
        (``runs_data_init``); it gets the ``initialized`` flag the base runs that by."""
        likelihood = likelihood or self.likelihood
        c = channels or self.image_shape[0]
        n_colors = c if likelihood.sequential_channels else 1
        wrong = TypeError(
            f"pixelcnn must build a lightning_modules.backbone.PixelDecoder, got {factory!r};"
            " give a class_path such as lightning_modules.backbone.GatedPixelCNN"
        )
        try:
            net = as_factory(factory)(
                in_channels or c,
                likelihood.num_params(c),
                n_colors,
                cond_vec_dim,
                cond_map_channels,
            )
        except TypeError as error:  # not called as a PixelDecoder is, most likely not one
            if network_config(factory) is None:
                raise wrong from error
            raise
        if not isinstance(net, PixelDecoder):
            raise wrong
        if net.needs_data_init and not runs_data_init:
            raise ValueError(
                f"{type(net).__name__} needs a data-dependent init, which"
                f" {type(self).__name__} does not run yet: use a GatedPixelCNN,"
                " PlainPixelCNN or LocalPixelCNN as its pixelcnn"
            )
        if net.needs_data_init and not hasattr(self, "initialized"):
            # saved in checkpoints, so a resumed run skips the init
            self.register_buffer("initialized", torch.tensor(False))
        return net

    def sample_pixels(
        self, n: int, params_fn, context_rows: int, noise=None, cache=None
    ) -> torch.Tensor:
        """n images drawn from this model's likelihood pixel by pixel (R -> G -> B within a
        pixel) with ``params_fn(x_rows, rows)`` giving the parameters of those canvas rows;
        each row sees ``context_rows`` rows above it (the PixelCNN's receptive field).
        ``cache(canvas)``: the pixel network's cached sampler (``sampling_cache``), used
        instead of ``params_fn`` where the network has one."""
        return sample_autoregressive(
            params_fn,
            self.likelihood.sample,
            (n, *self.image_shape),
            self.device,
            noise=noise,
            sequential_channels=self.likelihood.sequential_channels,
            context_rows=context_rows,
            cache=cache,
        )

    def to_unit_range(self, x: torch.Tensor) -> torch.Tensor:
        """Images of this model's data kind scaled to [0, 1], for display."""
        return x.float() / (255.0 if self.data_kind == "8bit" else 1.0)

    @property
    def dims(self) -> int:
        """Dimensions of one image, C * H * W (the denominator of bits per dimension)."""
        return math.prod(self.image_shape)

    @property
    def latent_dims(self) -> dict[str, int]:
        """Latent level -> its number of dimensions (the free-bits unit ``latent_dim``)."""
        return {level: math.prod(shape) for level, shape in self.latent_shapes.items()}

    @property
    def kl_weight(self) -> float:
        if self.kl_warmup_steps <= 0:
            return 1.0
        return min(1.0, self.global_step / self.kl_warmup_steps)

    def checked(self, terms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``terms`` if every one is declared in :attr:`term_kinds` and every bound term is
        there; a model that returns another term fails here, before it is silently left out
        of the bound (or counted in it)."""
        kinds = self.term_kinds
        undeclared = sorted(set(terms) - set(kinds))
        missing = sorted(k for k, kind in kinds.items() if kind != "diagnostic" and k not in terms)
        if undeclared or missing:
            raise KeyError(
                f"{type(self).__name__}.elbo_terms returned undeclared terms {undeclared} and"
                f" lacks the declared bound terms {missing}: every term must be declared in"
                f" term_kinds as one of {TermKind.__args__} (declared: {kinds})"
            )
        unknown = sorted(k for k, kind in kinds.items() if kind not in TermKind.__args__)
        if unknown:
            raise KeyError(f"{type(self).__name__}.term_kinds: unknown kinds for {unknown}")
        for name, kind in kinds.items():
            if kind == "kl" and name.removeprefix("kl/") not in self.latent_shapes:
                raise KeyError(
                    f"{type(self).__name__} declares the KL term {name!r}, but"
                    f" {name.removeprefix('kl/')!r} is not one of its latent levels"
                    f" {list(self.latent_shapes)}: KL terms are named kl/<level>"
                )
        return terms

    def loss_weights(self) -> dict[str, float]:
        """Each term's weight in the training loss (1 where not given): AGAVE's λ on its KL
        and the weight of its auxiliary term. KL warm-up multiplies the KL terms' further."""
        return {}

    def loss(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        """Training objective: the mean of every bound and auxiliary term, plus the KL weight
        x each KL term's mean, clamped from below by free bits; each times its
        :meth:`loss_weights` (a weight of 0 keeps the term in the graph, with zero gradients,
        which DDP needs of every parameter)."""
        loss = torch.zeros((), device=self.device)
        weights = self.loss_weights()
        for name, kind in self.term_kinds.items():
            if kind == "diagnostic" or name not in terms:  # a test may pass part of the terms
                continue
            value = terms[name].mean()
            if kind == "kl":
                if self.free_bits > 0:
                    level = name.removeprefix("kl/")
                    unit = (
                        self.latent_dims[level]
                        if self.free_bits_unit == "latent_dim"
                        else self.dims
                    )
                    value = torch.clamp(value, min=self.free_bits * unit)
                value = self.kl_weight * value
            loss = loss + weights.get(name, 1.0) * value
        return loss

    def nelbo(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        """Negative ELBO per example: the sum of the bound and KL terms."""
        kinds = self.term_kinds
        return sum(v for k, v in self.checked(terms).items() if kinds[k] in ("bound", "kl"))

    # ------------------------------------------------------------------ Lightning
    def configure_optimizers(self):
        """Adam or Adamax at ``lr``. Adam is fused: one kernel for every parameter instead of
        several per tensor (the small networks here are launch-bound on a GPU), and it can
        skip a non-finite step without a host sync."""
        cls = {"adam": torch.optim.Adam, "adamax": torch.optim.Adamax}[self.optimizer_name]
        fused = {"fused": True} if cls is torch.optim.Adam else {}
        optimizer = cls(self.parameters(), lr=self.lr, **fused)
        if self.lr_decay == 1.0:
            return optimizer
        decay = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=self.lr_decay)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": decay, "interval": "step"}}

    def data_dependent_init(self, x: torch.Tensor) -> None:
        """Models with a data-dependent initialization (weight norm, Salimans & Kingma 2016)
        run it here; they hold a boolean buffer ``initialized``, and the base calls this once,
        on the first training batch, never after a resume (the flag is in the checkpoint)."""
        raise NotImplementedError

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        """Seed the batch's training noise (latent samples) from the run's seed, the epoch,
        the batch and the rank: a run resumed from a mid-epoch checkpoint then draws the
        same noise as the run that was never stopped (the seed is in the checkpoint). On
        the first batch of a model with an ``initialized`` flag, run its data-dependent init;
        under DDP rank zero's result is broadcast, so every replica starts from the same
        weights."""
        if self.run_seed is None:
            self.run_seed = int(os.environ.get("PL_GLOBAL_SEED", torch.initial_seed()))
        key = [self.run_seed, self.current_epoch, batch_idx, self.global_rank]
        torch.manual_seed(int(np.random.SeedSequence(key).generate_state(1)[0]))
        if self.initialize_from(batch[0]) and dist.is_available() and dist.is_initialized():
            with torch.no_grad():
                for p in self.parameters():
                    dist.broadcast(p.data, src=0)

    def initialize_from(self, x: torch.Tensor) -> bool:
        """Run the data-dependent init on batch ``x`` unless the model has none or has run it
        (its ``initialized`` flag, which this sets); whether it ran. Training calls it on the
        first batch; so do the benchmarks, which train outside Lightning's loop."""
        initialized = getattr(self, "initialized", None)
        if initialized is None or bool(initialized):
            return False
        self.check_input(x)
        with torch.no_grad():
            self.data_dependent_init(x)
            initialized.fill_(True)
        return True

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, *args, **kwargs):
        """Lightning's; a checkpoint whose model options predate the ``pixelcnn`` option fails
        with a message that says so (``arvae test --ckpt_path`` translates them)."""
        try:
            return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)
        except Exception as error:
            ckpt = torch.load(checkpoint_path, map_location="cpu", weights_only=True, mmap=True)
            saved = {k: v for k, v in (ckpt.get("hyper_parameters") or {}).items() if k[0] != "_"}
            name = (ckpt.get("hyper_parameters") or {}).get("_class_path", cls.__name__)
            upgraded = legacy_options.upgrade(name, saved)
            if upgraded != saved:
                old = ", ".join(sorted(saved.keys() - upgraded.keys()))
                raise ValueError(
                    f"{checkpoint_path}: its model options are those of arvae up to commit"
                    f" {legacy_options.LAST_COMMIT} ({old}),"
                    " before every model took its network as one `pixelcnn` option. Test it with"
                    " `arvae test --ckpt_path FILE`, which translates them, or read it with"
                    f" that commit: git checkout {legacy_options.LAST_COMMIT}"
                ) from error
            raise

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["arvae_run_seed"] = self.run_seed

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.run_seed = checkpoint.get("arvae_run_seed")

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        x, _ = batch
        self.check_input(x)
        loss, terms = self.training_loss(x)
        # logged as they are, NaN or inf on a skipped step: a value left out would show as
        # the epoch's last logged one in the step's row of metrics.csv
        self.log("train/loss", loss)  # warm-up / free-bits weighted: the bar shows the bound
        nelbo = self.nelbo(terms).mean()
        self.log("train/nelbo", nelbo, prog_bar=True)
        if self.data_kind == "8bit":
            self.log("train/bpd", bits_per_dim(nelbo, self.dims))
        self._step_terms = {name: value.mean().detach() for name, value in terms.items()}
        for name, value in self._step_terms.items():
            self.log(f"train/{name}", value)
        if self.latent_dims:
            self.log("train/kl_weight", self.kl_weight)
        return loss

    def training_loss(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The training objective of batch x and its per-example terms: what each training
        step differentiates, compiled when ``compile_training`` says so."""
        terms = self.elbo_terms(x) if not self.compile_training else self._compiled_terms(x)
        return self.loss(self.checked(terms)), terms

    def _compiled_terms(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self._compile_failed:
            return self.elbo_terms(x)
        mode = "default" if self.compile_training is True else self.compile_training
        try:
            if mode == "reduce-overhead":  # a new step: the last one's graph outputs are done
                torch.compiler.cudagraph_mark_step_begin()
            return compiled(type(self).elbo_terms, mode)(self, x)
        except torch.OutOfMemoryError:
            raise
        except Exception as error:
            terms = self.elbo_terms(x)  # an error of the model, not the compiler, is raised here
            self._compile_failed = True
            warnings.warn(
                f"compile_training={self.compile_training!r}: torch.compile failed"
                f" ({type(error).__name__}: {str(error).strip()[:500]}); training goes on"
                " eagerly. Set compile_training: false to skip the attempt.",
                stacklevel=2,
            )
            return terms

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        """Run forward and backward, then update only if every gradient is finite.

        The skip costs no host sync where the update can skip itself: Adam is fused, and is
        told that the step's gradients are not finite (the kernel then leaves the weights,
        moments and step count as they were); under fp16 AMP the gradient scaler skips the
        step (and lowers its scale). Adamax's skip is decided on the host. Under DDP the
        gradients are all-reduced before this check, so every rank skips the same steps.

        The global gradient norm is logged as ``train/grad_norm``, ``train/skipped`` is 1 on
        a skipped step (its loss and gradient norm are logged as they were, not finite) and
        ``train/skipped_steps`` counts them. A skipped batch still counts in ``global_step``
        (as AMP's skipped steps do), so max_steps and schedules stay tied to the batches
        seen. ``max_bad_steps`` skipped steps in a row stop the run (under fp16 AMP, while
        its scale is above 1, only those with a non-finite loss count). :class:`StepGuard`
        reads the count a step late: the stop comes after the next step's backward, before
        its update.
        """
        loss = optimizer_closure()  # forward and backward
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        # one fused (foreach) reduction: per-tensor norms cost a kernel launch each
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        norm = norm.to(self.device)
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        scale = 1.0 if scaler is None else scaler.get_scale()  # fp16 AMP: gradients are scaled
        norm = norm / scale
        skipped = ~torch.isfinite(norm)
        # while fp16 AMP's scale is above 1 an overflow is the scaler finding its scale (it
        # skips the step and halves it): only a non-finite loss counts towards the stop
        bad = skipped if scale <= 1 else skipped & ~torch.isfinite(loss.detach())
        if self.guard.previous_run() >= self.max_bad_steps:
            self._stop_on_nonfinite()
        self.log("train/grad_norm", norm)
        self.log("train/skipped", skipped.float())
        inner = getattr(optimizer, "optimizer", optimizer)  # Lightning's wrapper holds it
        # the groups say how it steps: one resumed from a checkpoint of an unfused Adam is not
        fused = all(group.get("fused") for group in inner.param_groups)
        if scaler is None and fused:
            inner.found_inf = skipped.float()  # read by the fused kernel: no host sync
        if scaler is not None or fused or not bool(skipped):
            # the closure ran: its result goes to the step, as Lightning's own closure's
            # would (the AMP scaler steps only when it has one); clipping applies here
            optimizer.step(closure=lambda: loss)
        else:
            optimizer.zero_grad()
        inner.__dict__.pop("found_inf", None)
        self.guard.record(skipped, bad, self._step_terms, self.global_step)
        self.log("train/skipped_steps", self.guard.skipped.float())

    @property
    def skipped_steps(self) -> int:
        """Training steps skipped so far in this run (reading it waits for the device)."""
        return self.guard.skipped_steps

    @property
    def bad_steps(self) -> int:
        """The current run of bad steps (skipped ones that count towards ``max_bad_steps``;
        reading it waits for the device)."""
        return self.guard.bad_steps

    def on_train_end(self) -> None:
        """The last steps of a run are checked too (the guard reads a step late)."""
        if self.guard.previous_run() >= self.max_bad_steps:
            self._stop_on_nonfinite()

    def _stop_on_nonfinite(self) -> None:
        trainer = self.trainer
        ckpt = trainer.checkpoint_callback
        folder = Path(ckpt.dirpath if ckpt and ckpt.dirpath else trainer.default_root_dir)
        path = folder / "nonfinite-stop.ckpt"
        trainer.save_checkpoint(path)  # every rank calls it (a collective); rank 0 writes
        terms = self.guard.last_bad_terms()
        if all(math.isfinite(v) for v in terms.values()):
            terms = f"{terms}: a finite loss, a non-finite gradient"
        raise FloatingPointError(
            f"{self.max_bad_steps} training steps in a row had a non-finite loss or gradient"
            f" (the last at step {self.guard.last_bad_step}, its loss terms: {terms}); the run"
            f" stops. The last good weights are in {path}. Lower model.init_args.lr, turn on"
            " kl_warmup_steps or gradient clipping (trainer.gradient_clip_val), or train with"
            " precision 32-true; resume with --ckpt_path."
        )

    def _update(self, stage: str, name: str, values: torch.Tensor) -> None:
        """Accumulate per-example values into ``{stage}/{name}`` (their mean) and, for the
        test bounds, ``{stage}/{name}_se`` (the standard error of that mean)."""
        self._accumulate(f"{stage}/{name}", values, MeanMetric, prog_bar=name in BOUNDS)
        if stage == "test" and name in BOUNDS:
            self._accumulate(f"{stage}/{name}_se", values, StandardError, prog_bar=False)

    def _accumulate(self, key: str, values: torch.Tensor, kind: Callable, prog_bar: bool) -> None:
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
            terms = self.checked(self.elbo_terms(x))
            nelbo = self.nelbo(terms)
            self._update(stage, "nelbo", nelbo)
            for name, value in terms.items():
                self._update(stage, name, value)
                if stage == "test" and name.startswith("kl/"):  # the code length (VLAE §4.1)
                    self._update(stage, name.replace("kl/", "kl_bits/", 1), value / math.log(2))
            if self.data_kind == "8bit":
                self._update(stage, "bpd", bits_per_dim(nelbo, self.dims))
            for name, value in self.evaluation_metrics(terms).items():
                self._update(stage, name, value)
            if self.latent_shapes:
                for level, mean in self.posterior_mean(x).items():
                    units = functools.partial(ActiveUnits, self.latent_dims[level])
                    self._accumulate(f"{stage}/active_units/{level}", mean, units, False)
            if stage == "test":
                nll = -self.log_likelihood_bound(x, self.iwae_k)
                self._update(stage, "nll_iwae", nll)
                if self.data_kind == "8bit":
                    self._update(stage, "bpd_iwae", bits_per_dim(nll, self.dims))

    def validation_step(self, batch, batch_idx):
        self._evaluate("val", batch)

    def test_step(self, batch, batch_idx):
        self._evaluate("test", batch)


def saved_weights(path: str | os.PathLike, option: str) -> dict[str, torch.Tensor]:
    """The ``state_dict`` of the checkpoint at ``path``, which the model option ``option``
    names (weights taken from another run); a missing file is named with that option."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{option}: no checkpoint at {path}") from error


@functools.cache
def compiled(fn: Callable, mode: CompileMode = "default") -> Callable:
    """``torch.compile(fn, mode=mode)``, wrapped once per function and mode: wrapping costs
    ~1 ms, too much for every training step, and nothing is stored on the model, which stays
    picklable."""
    return torch.compile(fn, mode=mode)


def log_mean_exp(log_w: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """log(mean(exp(log_w))) along dim, stably: the importance-weighted bound from log weights."""
    return torch.logsumexp(log_w, dim) - math.log(log_w.shape[dim])
