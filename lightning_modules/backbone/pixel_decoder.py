"""The one interface of every autoregressive pixel network (gated, plain, local, PixelCNN++).

A model builds its decoder from a factory given in YAML by ``class_path``; the model fills
in what its data and likelihood decide, the config everything else::

    pixelcnn:
      class_path: lightning_modules.backbone.GatedPixelCNN
      init_args: {n_layers: 3, channels: 32, first_kernel: 7, kernel: 5}

The first five arguments of every network, in this order, are the model's:
``in_channels`` (what the network reads per pixel), ``out_channels`` (the likelihood's
parameters), ``n_colors`` (colour groups that see each other within a pixel, 1 = the
network sees no channel of the pixel it predicts), ``cond_vec_dim`` and
``cond_map_channels`` (0 = that conditioning unused). Options shared by several networks
have one name: ``channels`` (feature width), ``n_layers`` (masked layers), ``kernel`` and
``first_kernel`` (their filter sizes).
"""

import functools
import importlib
import inspect
from collections.abc import Callable

import torch
from torch import nn


class PixelDecoder(nn.Module):
    """``forward(x, cond_vec, cond_map) -> params`` (B, out_channels, H, W), the output at a
    pixel a function of the pixels before it in raster order (and, with ``n_colors`` > 1, of
    the earlier colour groups of the pixel itself), and of the conditioning, which may see
    everything.

    ``receptive_rows``: how many rows above a pixel its output can depend on, or None for
    the whole image; sampling gives the network only those rows of the canvas (exact, and
    most of the compute saved for a small field). ``sampling_cache`` is the fast sampler:
    the network evaluated one position at a time on stored layer maps (None: a network
    without one, sampled by whole forward passes). ``init_from_data`` is a network's
    data-dependent initialization, run by the model on its first training batch when
    ``needs_data_init`` is set.
    """

    receptive_rows: int | None = None
    needs_data_init: bool = False
    cache_type: type | None = None  # its PixelCache class, called (net, input_fn, x, vec, map)
    model_given = 5  # the leading arguments a model fills in (see the module docstring)

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        n_colors: int = 1,
        cond_vec_dim: int = 0,
        cond_map_channels: int = 0,
    ) -> None:
        super().__init__()
        if n_colors < 1 or in_channels % n_colors or out_channels % n_colors:
            raise ValueError(
                f"{type(self).__name__}: in_channels ({in_channels}) and out_channels"
                f" ({out_channels}) must be multiples of n_colors ({n_colors} >= 1), one group"
                " of channels per colour"
            )
        self.in_channels, self.out_channels, self.n_colors = in_channels, out_channels, n_colors
        self.cond_vec_dim, self.cond_map_channels = cond_vec_dim, cond_map_channels

    def check_conditioning(self, cond_vec: torch.Tensor | None, cond_map: torch.Tensor | None):
        """A clear error when the conditioning does not match what the network was built for."""
        for name, value, dim in (
            ("cond_vec", cond_vec, self.cond_vec_dim),
            ("cond_map", cond_map, self.cond_map_channels),
        ):
            if (value is None) != (dim == 0) or (value is not None and value.shape[1] != dim):
                got = None if value is None else tuple(value.shape)
                raise ValueError(
                    f"{type(self).__name__}: {name} built for {dim} channels (0: none), got {got}"
                )

    def sampling_cache(
        self,
        input_fn,
        x: torch.Tensor,
        cond_vec: torch.Tensor | None = None,
        cond_map: torch.Tensor | None = None,
    ):
        """A :class:`~.sampling_cache.PixelCache` (of the network's ``cache_type``) for
        sampling the canvas x (its shape and device) position by position, ``input_fn`` the
        model's per-pixel data-to-input transform; None for a network without one."""
        if self.cache_type is None:
            return None
        self.check_conditioning(cond_vec, cond_map)
        return self.cache_type(self, input_fn, x, cond_vec, cond_map)

    def init_from_data(
        self,
        x: torch.Tensor,
        cond_vec: torch.Tensor | None = None,
        cond_map: torch.Tensor | None = None,
    ) -> int:
        """Data-dependent init from one batch; returns the layers initialized (none here)."""
        return 0


# what a model's ``pixelcnn`` option holds: the network class with its options bound, called
# by the model as factory(in_channels, out_channels, n_colors, cond_vec_dim, cond_map_channels)
PixelDecoderFactory = Callable[[int, int, int, int, int], PixelDecoder]


def class_path(cls: type) -> str:
    """The import path of a class as jsonargparse writes it: through its package when the
    package exports it (``lightning_modules.backbone.GatedPixelCNN``)."""
    package = cls.__module__.rpartition(".")[0]
    if package and getattr(importlib.import_module(package), cls.__name__, None) is cls:
        return f"{package}.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def factory_config(factory) -> dict:
    """A factory (a PixelDecoder class, or a functools.partial of one with options bound) as
    the config that builds it: ``{"class_path": ..., "init_args": {every option}}``, the form
    a YAML config and a checkpoint's hyper-parameters hold."""
    cls, bound = (
        (factory.func, factory.keywords)
        if isinstance(factory, functools.partial)
        else (factory, {})
    )
    options = list(inspect.signature(cls).parameters.values())[cls.model_given :]
    init_args = {p.name: bound.get(p.name, p.default) for p in options}
    return {"class_path": class_path(cls), "init_args": init_args}


def as_factory(spec) -> Callable[..., PixelDecoder]:
    """A factory from either form: a class or partial (as jsonargparse gives it), or a
    ``{"class_path", "init_args"}`` dict (a checkpoint's hyper-parameters, a Python config)."""
    if not isinstance(spec, dict):
        return spec
    module, _, name = spec["class_path"].rpartition(".")
    return functools.partial(
        getattr(importlib.import_module(module), name), **spec.get("init_args", {})
    )


def built(part):
    """A part given as an object (a likelihood, a view), or as its config (``{"class_path":
    ..., "init_args": ...}``, as a parsed config file or a checkpoint holds it) built."""
    return as_factory(part)() if isinstance(part, dict) else part


def network_config(value) -> dict | None:
    """The config of a network option in any of its forms (class, partial, config dict),
    every init arg filled in; None for anything that is not a network option: a module
    class (a PixelDecoder, an EmbeddingNet) with ``model_given``, the number of its leading
    arguments that the model fills in."""
    if isinstance(value, dict) and "class_path" in value:
        try:
            value = as_factory(value)
        except (ImportError, AttributeError, TypeError):
            return None
    cls = value.func if isinstance(value, functools.partial) else value
    if isinstance(cls, type) and issubclass(cls, nn.Module) and hasattr(cls, "model_given"):
        return factory_config(value)
    return None
