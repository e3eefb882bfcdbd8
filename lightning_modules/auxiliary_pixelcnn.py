"""PixelCNNs with auxiliary variables (Kolesnikov & Lampert, ICML 2017): the Grayscale and the
Pyramid PixelCNN.

A chain of deterministic views X_0 = X, X_{l+1} = ψ_{l+1}(X_l) (``views``: a 4-bit grayscale
image, or the image at half resolution, applied recursively), each level modelled given the
next coarser one, the coarsest on its own (eqs. 2-4):

    log p(X) = log p(X_L) + sum_{l < L} log p(X_l | X_{l+1}),   X_{l+1} = ψ(X_l)
    p(X_l | X_{l+1}) = prod_j p(x_j | x_<j ; f_w(X_{l+1}))

p(X_L) is a PixelCNN++ (``base``) with its own likelihood (the Grayscale PixelCNN's 16-way
softmax); each p(X_l | X_{l+1}) a PixelCNN++ (``conditional``) with the image's likelihood
(the mixture of logistics) whose every gated block adds the embedding f_w(X_{l+1})
(``embedding``: backbone.EmbeddingNet). No latent: the terms are exact log-probabilities of
the factors, and the reported total is their sum. Since p(X_l | X_{l+1}) may also put mass
on images whose view is not X_{l+1}, the total is the paper's bound (eq. 5): a lower bound on
the log-likelihood of the normalized model (Z <= 1 only raises it).

The factors share no parameters, so they train together (the sum is the loss) or one at a
time (``train_factors``), and a model can take each factor's weights from another run's
checkpoint (``factor_checkpoints``), which tests two separately trained factors as one
model.

Levels are named in metric keys: X_0 is ``x``, a coarser level by its view (``gray4``,
``16x16``, ...). Per test image (nats): ``nll/<level>`` = -log p(X_level | the next coarser
level) (the base: -log p(X_L)); on 8-bit data in bits per dimension of X, so that they add
up to ``bpd``: ``bpd/<level>`` (Table 1's 0.459 + 2.52 = 2.98), and ``bpd_at/<level>``, the
whole model's bits per dimension of the image at that level (its factor and every coarser
one over that level's dimensions: Table 2's 4.58 ... 1.52 from 8x8 to 128x128).
"""

import math
from collections.abc import Callable

import torch
from torch import nn

from .backbone import (
    PixelCNNppNet,
    PixelDecoderFactory,
    as_factory,
    built,
    sample_autoregressive,
)
from .backbone.embedding_net import EmbeddingNet
from .backbone.pixelcnnpp import sampling_canvas, sampling_rows
from .base import ImageModel, saved_weights
from .likelihoods import Categorical, DiscretizedLogisticMixture, Likelihood
from .views import View

EmbeddingFactory = Callable[[int], EmbeddingNet]


class AuxiliaryPixelCNN(ImageModel):
    """A PixelCNN with auxiliary variables: views, a base PixelCNN and conditional ones.

    Args:
        views: ψ_1, ψ_2, ... in order (``lightning_modules.views``): [Grayscale] for the
            Grayscale PixelCNN, [HalfResolution] x 4 for the 128 -> 8 pyramid.
        base: the pixel network of p(X_L) (class_path and options, e.g. PixelCNNppNet).
        base_likelihood: its likelihood; None = a categorical over the view's levels when
            it has fewer than 256 (the Grayscale PixelCNN's 16-way softmax), else the
            image's.
        conditional: the pixel network of every p(X_l | X_{l+1}), one per level.
        embedding: f_w, one per conditional level (EmbeddingNet and its options); its output
            enters ``conditional`` as the map added into every block.
        likelihood: of X and of every conditional level; None = a 10-component discretized
            logistic mixture (PixelCNN++).
        train_factors: the levels whose factors are trained (None: all); the others are
            frozen and left out of the training loss, but evaluated (a separate run for
            each factor, combined by ``factor_checkpoints``).
        factor_checkpoints: level -> a checkpoint of this model whose weights of that
            level's factor (network and embedding) replace this model's, at construction
            and whenever a checkpoint is loaded.
        **kwargs: the shared options of :class:`ImageModel`.
    """

    def __init__(
        self,
        views: list[View],
        base: PixelDecoderFactory = PixelCNNppNet,
        base_likelihood: Likelihood | None = None,
        conditional: PixelDecoderFactory = PixelCNNppNet,
        embedding: EmbeddingFactory = EmbeddingNet,
        likelihood: Likelihood | None = None,
        train_factors: list[str] | None = None,
        factor_checkpoints: dict[str, str] | None = None,
        **kwargs,
    ) -> None:
        kwargs.setdefault("data_kind", "8bit")
        likelihood = DiscretizedLogisticMixture() if likelihood is None else built(likelihood)
        super().__init__(likelihood=likelihood, **kwargs)
        if not views:
            raise ValueError("AuxiliaryPixelCNN needs at least one view (views: [...])")
        self.views = [built(view) for view in views]
        self.level_shapes = [self.image_shape]
        for view in self.views:
            self.level_shapes.append(view.shape(self.level_shapes[-1]))
        self.level_names = ["x"] + [
            v.name(shape) for v, shape in zip(self.views, self.level_shapes[:-1], strict=True)
        ]
        if len(set(self.level_names)) != len(self.level_names):
            raise ValueError(f"two levels share a name: {self.level_names}")
        changed = [v for v in self.views[:-1] if v.out_levels != 256]
        if changed:
            raise ValueError(
                f"views {changed}: only the last view may change the levels of the image (the"
                " levels between are modelled with the image's likelihood)"
            )
        top = self.views[-1].out_levels
        if base_likelihood is None:
            base_likelihood = Categorical(top) if top < 256 else self.likelihood
        base_likelihood = built(base_likelihood)
        self.likelihoods = [self.likelihood] * len(self.views) + [base_likelihood]

        self.nets = nn.ModuleDict()
        self.embeddings = nn.ModuleDict()
        for level, name in enumerate(self.level_names):
            channels = self.level_shapes[level][0]
            lik = self.likelihoods[level]
            if level == len(self.views):  # the coarsest level: unconditional
                net = self.pixel_decoder(
                    base, runs_data_init=True, likelihood=lik, channels=channels
                )
            else:
                embed = as_factory(embedding)(self.level_shapes[level + 1][0])
                self.embeddings[name] = embed
                net = self.pixel_decoder(
                    conditional,
                    cond_map_channels=embed.channels,
                    runs_data_init=True,
                    likelihood=lik,
                    channels=channels,
                )
            self.nets[name] = net

        unknown = sorted(set(train_factors or []) - set(self.level_names))
        if unknown:
            raise ValueError(f"train_factors {unknown}: the levels are {self.level_names}")
        self.train_factors = list(self.level_names if train_factors is None else train_factors)
        for name in set(self.level_names) - set(self.train_factors):
            self.nets[name].requires_grad_(False)
            if name in self.embeddings:
                self.embeddings[name].requires_grad_(False)
        self.factor_checkpoints = dict(factor_checkpoints or {})
        if self.factor_checkpoints:
            self.load_state_dict(self._with_factors(self.state_dict()))

    # ----------------------------------------------------------------- the model
    def views_of(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[X_0, X_1, ..., X_L]: the image and its views, finest first."""
        out = [x]
        for view in self.views:
            out.append(view(out[-1]))
        return out

    def embed(self, name: str, coarser: torch.Tensor, level: int) -> torch.Tensor:
        """f_w(X_{l+1}): the map conditioning level ``name`` (index ``level``)."""
        return self.embeddings[name](self.likelihoods[level + 1].network_input(coarser))

    def factor_params(self, level: int, x_l: torch.Tensor, cond: torch.Tensor | None):
        """Likelihood parameters of every pixel of X_level (causal in X_level)."""
        name = self.level_names[level]
        net_in = self.likelihoods[level].network_input(x_l)
        return self.nets[name](net_in) if cond is None else self.nets[name](net_in, None, cond)

    def nll(self, level: int, levels: list[torch.Tensor]) -> torch.Tensor:
        """-log p(X_level | X_level+1) per example (the base: -log p(X_L)), nats."""
        name = self.level_names[level]
        cond = None if name not in self.embeddings else self.embed(name, levels[level + 1], level)
        params = self.factor_params(level, levels[level], cond)
        return -self.likelihoods[level].log_prob(params, levels[level])

    @property
    def active_factors(self) -> list[str]:
        """The factors computed: in training only the trained ones, else every one."""
        return self.train_factors if self.training else self.level_names

    @property
    def term_kinds(self):
        return {f"nll/{name}": "bound" for name in self.active_factors}

    def elbo_terms(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self.check_input(x)
        levels = self.views_of(x)
        return {
            f"nll/{name}": self.nll(level, levels)
            for level, name in enumerate(self.level_names)
            if name in self.active_factors
        }

    def evaluation_metrics(self, terms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-example ``bpd/<level>`` (over X's dimensions: they add up to ``bpd``) and
        ``bpd_at/<level>`` (the image at that level, over its own dimensions)."""
        if self.data_kind != "8bit":
            return {}
        out, coarser = {}, 0.0
        for level in reversed(range(len(self.level_names))):
            name = self.level_names[level]
            nats = terms[f"nll/{name}"]
            coarser = coarser + nats
            out[f"bpd/{name}"] = nats / (self.dims * math.log(2))
            out[f"bpd_at/{name}"] = coarser / (math.prod(self.level_shapes[level]) * math.log(2))
        return out

    def data_dependent_init(self, x: torch.Tensor) -> None:
        levels = self.views_of(x)
        for level, name in enumerate(self.level_names):
            if name in self.factor_checkpoints:  # trained elsewhere: keep its weights
                continue
            net_in = self.likelihoods[level].network_input(levels[level])
            if name in self.embeddings:
                coarser = self.likelihoods[level + 1].network_input(levels[level + 1])
                self.embeddings[name].init_from_data(coarser)
                self.nets[name].init_from_data(
                    net_in, None, self.embed(name, levels[level + 1], level)
                )
            else:
                self.nets[name].init_from_data(net_in)

    # ----------------------------------------------------------------- sampling
    def sample_noise(self, n: int, generator: torch.Generator | None = None):
        """Noise per level, coarsest first (the order of sampling)."""
        return {
            name: self.likelihoods[level].noise((n, *self.level_shapes[level]), generator)
            for level, name in reversed(list(enumerate(self.level_names)))
        }

    def sampler_crop(self, level: int, rows: int, cond: torch.Tensor | None) -> int:
        """How many rows of the canvas (and of the map ``cond``) a level's network runs on to
        give the parameters of its first ``rows`` rows: ``rows`` rounded up to a multiple of
        its coarsest stream's stride (zeros below: causal), so that every coarser cell above
        averages the rows it does in training and the outputs are exactly the full image's;
        the whole height for a map of another resolution."""
        return sampling_rows(
            self.nets[self.level_names[level]], rows, self.level_shapes[level][1], cond
        )

    def sample_level(
        self,
        level: int,
        n: int,
        coarser: torch.Tensor | None,
        noise: torch.Tensor | None,
        rows: int | None = None,
    ) -> torch.Tensor:
        """X_level drawn pixel by pixel given X_level+1 (``coarser``; None for the base);
        ``rows``: only the first rows (what a benchmark times)."""
        name = self.level_names[level]
        shape = full = (n, *self.level_shapes[level])
        if rows is not None:
            shape = (*shape[:2], rows, shape[3])
        cond = None if coarser is None else self.embed(name, coarser.to(self.device), level)
        lik = self.likelihoods[level]

        def cache(x: torch.Tensor):  # on the whole level's canvas: the first rows are exact
            return self.nets[name].sampling_cache(lik.network_input, x.new_zeros(full), None, cond)

        def params(x_rows: torch.Tensor, rows: slice) -> torch.Tensor:
            net, height = self.nets[name], self.level_shapes[level][1]
            canvas, cropped = sampling_canvas(net, x_rows, height, cond)
            return self.factor_params(level, canvas, cropped)[:, :, rows]

        if coarser is None:
            return sample_autoregressive(
                params, lik.sample, shape, self.device, noise, lik.sequential_channels, cache=cache
            )
        view, coarser = self.views[level], coarser.to(self.device)

        def keep_view(pixel_params, pixel_noise, canvas, i, j):
            bounds = view.pixel_bounds(coarser, canvas, i, j)
            return lik.sample(pixel_params, pixel_noise, bounds=bounds)

        return sample_autoregressive(
            params,
            keep_view,
            shape,
            self.device,
            noise,
            lik.sequential_channels,
            at_position=True,
            cache=cache,
        )

    @torch.no_grad()
    def sample(self, n: int, noise: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """n images: the coarsest view first, then each finer level given it."""
        return self.sample_levels(n, noise)[0]

    @torch.no_grad()
    def sample_levels(self, n: int, noise=None, given: torch.Tensor | None = None, start=None):
        """[X_0, ..., X_L] of n samples (finest first). ``given``: X_start, held fixed (e.g.
        grayscale images to colourize, start = 1), with only the finer levels drawn."""
        top = len(self.level_names) - 1
        start = top + 1 if given is None else start
        levels: list[torch.Tensor | None] = [None] * (top + 1)
        if given is not None:
            levels[start] = given.to(self.device).float()
        for level in reversed(range(start)):
            coarser = levels[level + 1] if level < top else None
            level_noise = None if noise is None else noise[self.level_names[level]]
            levels[level] = self.sample_level(level, n, coarser, level_noise)
        return levels

    @torch.no_grad()
    def colourize(self, views: torch.Tensor, n_colourings: int = 1) -> torch.Tensor:
        """``n_colourings`` images X ~ p(X | X_1) per given view X_1 (B, *level_shapes[1]):
        (B * n_colourings, C, H, W), the colourings of each input together (Fig. 3)."""
        given = views.repeat_interleave(n_colourings, 0)
        return self.sample_levels(given.shape[0], given=given, start=1)[0]

    # ----------------------------------------------------------------- checkpoints
    def _with_factors(self, state_dict: dict) -> dict:
        """``state_dict`` with each level of ``factor_checkpoints`` taken from its file."""
        for name, path in self.factor_checkpoints.items():
            if name not in self.level_names:
                raise ValueError(
                    f"factor_checkpoints: {name!r} is not a level of {self.level_names}"
                )
            saved = saved_weights(path, f"factor_checkpoints[{name!r}]")
            prefixes = (f"nets.{name}.", f"embeddings.{name}.")
            mine = {k for k in state_dict if k.startswith(prefixes)}
            theirs = {k for k in saved if k.startswith(prefixes)}
            if mine != theirs:
                raise ValueError(
                    f"factor_checkpoints[{name!r}] = {path}: its level {name!r} is not this"
                    f" model's (missing {sorted(mine - theirs)[:3]}, extra"
                    f" {sorted(theirs - mine)[:3]}); train it with the same views and networks"
                )
            state_dict.update({k: saved[k] for k in mine})
        return state_dict

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        if self.factor_checkpoints:
            checkpoint["state_dict"] = self._with_factors(dict(checkpoint["state_dict"]))
