"""MADE (Germain et al. 2015): a masked MLP whose outputs for variable i see only the
variables before i in a fixed order, so one pass gives every autoregressive conditional.

Degrees: the variable at position p of the order has degree p + 1. Hidden units get
degrees cycling deterministically through ``min_degree .. dim - 1`` (no random draw, so runs
are reproducible; a layer with at least ``dim - min_degree`` units holds every degree, so
every output can depend on every earlier input). A hidden unit sees the units below it of
degree <= its own; an output of degree d sees the last hidden units of degree < d.
With a context vector ``min_degree`` is 0: degree-0 units see the context and no variable,
which is how the context reaches every output, the first variable's included.
"""

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

from .init import he_init_, shrink_init_


class MaskedLinear(nn.Linear):
    """Linear layer whose weight is multiplied by a fixed 0/1 mask of shape (out, in)."""

    def __init__(self, mask: Tensor, bias: bool = True) -> None:
        super().__init__(mask.shape[1], mask.shape[0], bias)
        self.register_buffer("mask", mask.to(self.weight.dtype), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


class MADE(nn.Module):
    """Germain et al. 2015. Output block k, position i depends only on inputs z_j that come
    before i in `order`, plus (if context_dim > 0) an unmasked context vector.

    The order is 0, 1, ..., dim - 1, or its reverse (``reverse=True``): flows alternate the
    two between steps. ``n_hidden_layers`` counts hidden layers of ``hidden`` ReLU units, so
    the "3-layer MADE with 640 hidden units" of VLAE (appendix A) is input -> 640 -> 640 ->
    output: ``hidden=640, n_hidden_layers=2`` (three weight layers). The context enters the
    first hidden layer through an unmasked linear map (as the IAF encoder context h does).

    Init: He init for the hidden layers (counting only unmasked inputs), and the output layer
    scaled by 1e-2 with zero bias, so every output starts near 0: a flow built on it then
    starts near the identity and training starts stable.
    """

    def __init__(
        self,
        dim: int,
        hidden: int,
        n_hidden_layers: int,
        n_outputs: int,
        context_dim: int = 0,
        reverse: bool = False,
    ) -> None:
        super().__init__()
        min_degree = 0 if context_dim else 1
        if n_hidden_layers and hidden < dim - min_degree:
            raise ValueError(f"hidden={hidden} < {dim - min_degree}: some inputs would be cut")
        self.n_outputs = n_outputs
        degrees = torch.arange(1, dim + 1)
        if reverse:
            degrees = degrees.flip(0)
        self.register_buffer("degrees", degrees, persistent=False)
        d_hidden = torch.arange(hidden) % max(dim - min_degree, 1) + min_degree
        d_out = repeat(degrees, "d -> (k d)", k=n_outputs)
        d_in = [degrees] + [d_hidden] * n_hidden_layers
        masks = [d_hidden[:, None] >= d[None, :] for d in d_in[:-1]]
        masks.append(d_out[:, None] > d_in[-1][None, :])
        self.layers = nn.ModuleList(MaskedLinear(m) for m in masks)
        self.context = nn.Linear(context_dim, masks[0].shape[0]) if context_dim else None
        he_init_(self)
        shrink_init_(self.layers[-1])

    def forward(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        """(B, dim) [, (B, context_dim)] -> (B, n_outputs, dim)."""
        if (context is None) != (self.context is None):
            raise ValueError("pass a context exactly when the MADE was built with context_dim")
        h = self.layers[0](z)
        if self.context is not None:
            h = h + self.context(context)
        for layer in self.layers[1:]:
            h = layer(torch.relu(h))
        return rearrange(h, "b (k d) -> b k d", k=self.n_outputs)
