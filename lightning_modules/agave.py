"""Auxiliary Guided Autoregressive Variational Autoencoders (AGAVE; ICLR 2018 submission,
§3.2 and §4.1): a full-capacity PixelCNN++ decoder that keeps using its latents.

One encoder q(z|x), two decoders that share z, and the objective of eq. 7::

    L(x, y) = E_q[sum_i ln p(x_i | x_<i, f(z))] + E_q[sum_j ln p(y_j | z)] - λ KL(q(z|x) || p(z))
              primary reconstruction: PixelCNN++   auxiliary reconstruction: VAE

y = ψ(x) is the auxiliary image: x itself, x on b colour levels (``views.Quantize``), at half
or quarter resolution (``views.HalfResolution``), or both. The VAE decoder's output f(z) is
the per-pixel, per-channel mean of a logistic whose scale is learned per channel and shared
over the pixels, scored on y's b levels (eq. 8: ``likelihoods.DiscretizedLogistic``). The
PixelCNN++ reads f(z), up-sampled (nearest neighbour) to x's size when y is smaller, through
a non-masked convolution of its own in every gated block (``PixelCNNppNet``'s ``cond_map``),
optionally after a stack of non-shifted gated blocks (``cond_net``). Since p(y|z) is
factorized, only z can carry y's structure, so z is informative, and the PixelCNN++ gains by
reading it however expressive it is (appendix A): no capacity limit is needed.

λ = 1 makes the objective the ELBO of (x, y) taken as conditionally independent given z;
λ = 2 the sum of x's and y's ELBOs sharing the encoder; a larger λ gives valid but looser
bounds and less information in z. Reported bounds are x's: -ELBO = recon + KL and the
importance-weighted bound through the PixelCNN++ (150 samples in the paper); ``recon_y``
is a term of the loss only (an ``auxiliary`` term).
"""

import math
from collections.abc import Callable

import torch
from einops import rearrange, repeat
from torch import nn

from .backbone import (
    PixelCNNppNet,
    PixelDecoderFactory,
    as_factory,
    data_dependent_init_,
    resnet,
    sample_autoregressive,
    weight_norm_,
    zero_init_,
)
from .backbone.embedding_net import EmbeddingNet
from .backbone.flows import standard_normal_log_prob
from .backbone.pixelcnnpp import sampling_canvas
from .base import ImageModel, saved_weights
from .likelihoods import (
    DiagonalGaussian,
    DiscretizedLogistic,
    DiscretizedLogisticMixture,
    Likelihood,
)
from .views import HalfResolution, Quantize, View

EmbeddingFactory = Callable[[int], EmbeddingNet]


class AGAVE(ImageModel):
    """AGAVE on 8-bit images (CIFAR-10 in the paper).

    The VAE is the ResNet VAE of VLAE, close to Kingma et al. (2016)'s IAF-VAE without its
    hierarchy and flows: a 3x3 convolution, pre-activation residual blocks (ELU, no batch
    norm, weight norm with a data-dependent init) halving the size ``latent_downsamplings``
    times, and a diagonal Gaussian latent map z of ``latent_channels`` (32 x 16 x 16 on
    CIFAR-10: Kingma et al.'s latent maps); the decoder mirrors it to y's size.

    Args:
        lam: λ, the weight of the KL in the loss (eq. 7); the paper's best: 12.
        aux_levels: b, the colour levels of y (256 = x's; 256 / b must be whole).
        aux_downsamplings: y at x's size halved this many times (1: 16x16, 2: 8x8 on 32x32).
        auxiliary_weight: the weight of the auxiliary reconstruction in the loss; 0 drops it
            (appendix C's control, started from a checkpoint trained with it).
        pretrain_steps: for this many training steps the VAE and the PixelCNN++ train
            independently (the PixelCNN++ sees f(z) zeroed, so its loss reaches no VAE
            weight), then jointly (§4.1); a resumed run takes up the phase of its step.
        latent_channels / latent_downsamplings: z is latent_channels x (H, W) / 2^that.
        width / blocks: channels of the ResNet VAE and residual blocks per resolution.
        pixelcnn: the PixelCNN++ of p(x | f(z)) (class_path and options).
        cond_net: what f(z) goes through before it reaches the PixelCNN++ (EmbeddingNet and
            its options: non-shifted gated blocks, every output pixel may see all of f(z));
            None: f(z) itself.
        likelihood: of x; None = a 10-component discretized logistic mixture (PixelCNN++).
        init_checkpoint: an AGAVE checkpoint whose weights (not its optimizer or step) a
            fresh fit starts from (appendix C: the control starts from a model trained with
            the auxiliary term); a resumed fit keeps its own.
        **kwargs: the shared options of :class:`ImageModel` (the paper: optimizer adamax,
            lr 2e-3, no decay; iwae_k 150).
    """

    def __init__(
        self,
        lam: float = 2.0,
        aux_levels: int = 256,
        aux_downsamplings: int = 0,
        auxiliary_weight: float = 1.0,
        pretrain_steps: int = 0,
        latent_channels: int = 32,
        latent_downsamplings: int = 1,
        width: int = 64,
        blocks: int = 2,
        pixelcnn: PixelDecoderFactory = PixelCNNppNet,
        cond_net: EmbeddingFactory | None = None,
        likelihood: Likelihood | None = None,
        init_checkpoint: str | None = None,
        **kwargs,
    ) -> None:
        kwargs.setdefault("data_kind", "8bit")
        kwargs.setdefault("optimizer", "adamax")
        kwargs.setdefault("lr", 2e-3)
        kwargs.setdefault("iwae_k", 150)
        likelihood = DiscretizedLogisticMixture() if likelihood is None else likelihood
        super().__init__(likelihood=likelihood, **kwargs)
        if lam <= 0 or auxiliary_weight < 0 or pretrain_steps < 0:
            raise ValueError(
                f"need lam > 0, auxiliary_weight >= 0 and pretrain_steps >= 0, got {lam},"
                f" {auxiliary_weight}, {pretrain_steps}"
            )
        c, height, width_px = self.image_shape
        stride = 2 ** max(latent_downsamplings, aux_downsamplings)
        if height % stride or width_px % stride:
            raise ValueError(
                f"AGAVE halves {height}x{width_px} images {stride.bit_length() - 1} times"
                " (latent_downsamplings, aux_downsamplings): the size must be a multiple of"
                f" {stride}"
            )
        self.lam, self.auxiliary_weight = lam, auxiliary_weight
        self.pretrain_steps = pretrain_steps
        self.aux_views: list[View] = [Quantize(aux_levels)] if aux_levels < 256 else []
        self.aux_views += [HalfResolution(aux_levels) for _ in range(aux_downsamplings)]
        self.aux_shape = self.image_shape
        for view in self.aux_views:
            self.aux_shape = view.shape(self.aux_shape)
        self.aux_likelihood = DiscretizedLogistic(aux_levels)
        self.upsampling = 2**aux_downsamplings
        latent_size = (height // 2**latent_downsamplings, width_px // 2**latent_downsamplings)
        self.latent_shapes = {"z": (latent_channels, *latent_size)}

        head = zero_init_(nn.Conv2d(width, 2 * latent_channels, 3, padding=1))
        self.encoder = nn.Sequential(
            nn.Conv2d(c, width, 3, padding=1),
            resnet([width] * (latent_downsamplings + 1), width, "down", blocks, batch_norm=False),
            nn.ELU(),
            head,
        )
        steps = latent_downsamplings - aux_downsamplings
        self.decoder = nn.Sequential(
            nn.Conv2d(latent_channels, width, 3, padding=1),
            resnet(
                [width] * (abs(steps) + 1),
                width,
                "up" if steps > 0 else "down",
                blocks,
                batch_norm=False,
            ),  # fmt: skip
            nn.ELU(),
            nn.Conv2d(width, c, 3, padding=1),
        )
        # the logistic scale of y, per channel and shared over the pixels (§4.1)
        self.aux_log_scale = nn.Parameter(torch.full((c,), math.log(0.1)))
        weight_norm_(self.encoder, skip=(head,))
        weight_norm_(self.decoder)
        self.cond_net = None if cond_net is None else as_factory(cond_net)(c)
        self.pixelcnn = self.pixel_decoder(
            pixelcnn,
            cond_map_channels=c if self.cond_net is None else self.cond_net.channels,
            runs_data_init=True,
        )
        if not hasattr(self, "initialized"):  # the VAE's weight norm needs its init anyway
            self.register_buffer("initialized", torch.tensor(False))
        self.init_checkpoint = init_checkpoint

    def on_train_start(self) -> None:
        """A fresh fit with ``init_checkpoint`` takes that run's weights (a resumed one, at a
        step > 0, has its own); they include the data-dependent init's flag."""
        if not self.init_checkpoint or self.global_step > 0:
            return
        path = self.init_checkpoint
        state, mine = saved_weights(path, "init_checkpoint"), self.state_dict()
        if set(state) != set(mine) or any(state[k].shape != v.shape for k, v in mine.items()):
            missing, extra = sorted(set(mine) - set(state))[:3], sorted(set(state) - set(mine))[:3]
            raise ValueError(
                f"init_checkpoint {path} does not hold this model's weights (missing {missing},"
                f" extra {extra}, or other shapes): start from a run with the same networks and y"
            )
        self.load_state_dict(state)

    # ------------------------------------------------------------------ pieces
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-std of the diagonal Gaussian q(z|x), each (B, *latent_shapes["z"])."""
        mean, log_std = self.encoder(self.likelihood.network_input(x)).float().chunk(2, dim=1)
        return mean, log_std

    def vae_output(self, z: torch.Tensor) -> torch.Tensor:
        """f(z): the logistic means of y, (B, C, *y's size), on the [-1, 1] scale of x."""
        return self.decoder(z).float()

    def aux_image(self, x: torch.Tensor) -> torch.Tensor:
        """y = ψ(x): the levels the VAE reconstructs."""
        for view in self.aux_views:
            x = view(x)
        return x

    def aux_params(self, f: torch.Tensor) -> torch.Tensor:
        """The parameters of p(y|z): the means f(z) and the shared per-channel log-scales."""
        scales = self.aux_log_scale.float()[None, :, None, None].expand_as(f)
        return torch.cat([f, scales], dim=1)

    def upsampled(self, f: torch.Tensor) -> torch.Tensor:
        """f(z) at x's size: each pixel of a smaller y repeated over the block it stands for."""
        if self.upsampling > 1:
            f = f.repeat_interleave(self.upsampling, 2).repeat_interleave(self.upsampling, 3)
        return f[:, :, : self.image_shape[1], : self.image_shape[2]]

    def condition(self, f: torch.Tensor) -> torch.Tensor:
        """What the PixelCNN++ sees of z: f(z) at x's size, through ``cond_net`` if any."""
        f = self.upsampled(f)
        return f if self.cond_net is None else self.cond_net(f)

    def pixel_params(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Mixture parameters of every pixel of x given the conditioning (causal in x)."""
        return self.pixelcnn(self.likelihood.network_input(x), None, cond)

    @property
    def pretraining(self) -> bool:
        """In the independent phase: a training step before ``pretrain_steps``."""
        return self.training and self.global_step < self.pretrain_steps

    # ---------------------------------------------------------------- contract
    @property
    def term_kinds(self):
        return {"recon": "bound", "kl/z": "kl", "recon_y": "auxiliary"}

    def loss_weights(self) -> dict[str, float]:
        return {"kl/z": self.lam, "recon_y": self.auxiliary_weight}

    def elbo_terms(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``recon`` = -ln p(x | x_<i, f(z)), ``recon_y`` = -ln p(y | z) and ``kl/z``, per image
        in nats, for one z ~ q(z|x)."""
        self.check_input(x)
        mean, log_std = self.encode(x)
        z = DiagonalGaussian.sample(mean, log_std, self.randn(x.shape[0], *self.latent_shapes["z"]))
        f = self.vae_output(z)
        recon_y = -self.aux_likelihood.log_prob(self.aux_params(f), self.aux_image(x))
        cond = self.condition(f)
        if self.pretraining:
            cond = cond * 0.0  # zero, in the graph: DDP wants a gradient for every parameter
        recon = -self.likelihood.log_prob(self.pixel_params(x, cond), x)
        kl = DiagonalGaussian.kl_standard_normal(mean, log_std).flatten(1).sum(1)
        return {"recon": recon, "recon_y": recon_y, "kl/z": kl}

    def evaluation_metrics(self, terms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Fig. 4's decomposition in bits per dimension: ``bpd/kl`` and ``bpd/recon`` (of x's
        dimensions: they add up to ``bpd``, the PixelCNN++ decoder's bound), ``bpd/recon_y``
        and ``bpd_vae`` (the VAE decoder's reconstruction of y and its bound, KL included,
        over y's dimensions)."""
        if self.data_kind != "8bit":
            return {}
        x_dims, y_dims = self.dims * math.log(2), math.prod(self.aux_shape) * math.log(2)
        kl = terms["kl/z"]
        return {
            "bpd/kl": kl / x_dims,
            "bpd/recon": terms["recon"] / x_dims,
            "bpd/recon_y": terms["recon_y"] / y_dims,
            "bpd_vae": (terms["recon_y"] + kl) / y_dims,
        }

    def posterior_mean(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"z": self.encode(x)[0]}

    def log_weights(self, x: torch.Tensor, q, eps: dict[str, torch.Tensor]) -> torch.Tensor:
        """ln p(x | f(z_s)) + ln p(z_s) - ln q(z_s | x), (B, n): x's importance weights through
        the PixelCNN++ (the auxiliary decoder is not part of x's model)."""
        mean, log_std = q
        b, n = eps["z"].shape[:2]
        z = DiagonalGaussian.sample(mean[:, None], log_std[:, None], eps["z"]).flatten(0, 1)
        xs = repeat(x, "b c h w -> (b n) c h w", n=n)
        log_px = self.likelihood.log_prob(
            self.pixel_params(xs, self.condition(self.vae_output(z))), xs
        )
        means, log_stds = (repeat(t, "b ... -> (b n) ...", n=n) for t in q)
        log_w = (
            log_px
            + standard_normal_log_prob(z.flatten(1))
            - DiagonalGaussian.log_prob(means, log_stds, z)
        )
        return rearrange(log_w, "(b n) -> b n", b=b)

    def data_dependent_init(self, x: torch.Tensor) -> None:
        """Weight norm's init of the VAE, then of ``cond_net`` and the PixelCNN++ on its f(z)
        (z = the posterior mean), whatever the phase, so that the blocks' maps start scaled
        for the f(z) they will see."""
        vae, out = nn.ModuleList([self.encoder, self.decoder]), []
        # the init pass outputs what the initialized layers do: f(z) needs no second pass
        data_dependent_init_(vae, lambda: out.append(self.vae_output(self.encode(x)[0])))
        f = out[0]
        if self.cond_net is not None:
            self.cond_net.init_from_data(self.upsampled(f))
        self.pixelcnn.init_from_data(self.likelihood.network_input(x), None, self.condition(f))

    # ----------------------------------------------------------------- sampling
    def sample_noise(self, n: int, generator: torch.Generator | None = None):
        return {
            "z": DiagonalGaussian.noise((n, *self.latent_shapes["z"]), generator),
            "x": self.likelihood.noise((n, *self.image_shape), generator),
        }

    @torch.no_grad()
    def decode(self, f: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """x ~ p(x | f(z)) pixel by pixel, given the VAE's output ``f`` (B, C, *y's size)."""
        cond = self.condition(f.to(self.device))
        height = self.image_shape[1]

        def params(x_rows: torch.Tensor, rows: slice) -> torch.Tensor:
            canvas, cropped = sampling_canvas(self.pixelcnn, x_rows, height, cond)
            return self.pixel_params(canvas, cropped)[:, :, rows]

        lik = self.likelihood
        shape = (f.shape[0], *self.image_shape)
        return sample_autoregressive(
            params,
            lik.sample,
            shape,
            self.device,
            noise,
            lik.sequential_channels,
            cache=lambda x: self.pixelcnn.sampling_cache(lik.network_input, x, None, cond),
        )

    @torch.no_grad()
    def sample(self, n: int, noise: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """z ~ p(z) = N(0, I), f(z), then x ~ p(x | f(z))."""
        noise = self.sample_noise(n) if noise is None else noise
        return self.decode(self.vae_output(noise["z"].to(self.device)), noise["x"])

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """x -> z = the mean of q(z|x) -> f(z) -> a sample of p(x | f(z))."""
        self.check_input(x)
        return self.decode(self.vae_output(self.encode(x)[0]))
