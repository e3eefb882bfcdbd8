"""Cached sampling (Ramachandran et al. 2017): every pixel network with a cache gives, at
each position, the parameters of its full forward pass from a canvas filled only up to that
position, and every model that samples through it draws the same images from the same
noise as the uncached reference."""

import functools

import pytest
import torch
from decoders import gated, local, pixelcnnpp, plain
from test_hierarchical import TINY
from tiny_data import TinyBinary

from lightning_modules import (
    AGAVE,
    VLAE,
    AuxiliaryPixelCNN,
    HierarchicalPixelVAE,
    PixelCNN,
    PixelVAE,
)
from lightning_modules.backbone import EmbeddingNet, PixelCNNppNet, reference_sampling
from lightning_modules.backbone.pixelcnnpp import sampling_canvas
from lightning_modules.likelihoods import Categorical, DiscretizedLogisticMixture
from lightning_modules.views import Grayscale, HalfResolution

CACHED = {
    "gated": gated(n_layers=3, channels=6, first_kernel=5, kernel=3),
    "plain": plain(n_layers=3, channels=6, first_kernel=5, kernel=3),
    "local": local(n_layers=3, channels=5, n_1x1_blocks=2, tie_weights=False),
    "local_tied": local(n_layers=3, channels=5, n_1x1_blocks=1),
}


def perturbed_(module: torch.nn.Module, seed: int = 0, scale: float = 0.3):
    """Random weights away from any initial symmetry (zero-initialized heads included)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))
    return module


@pytest.mark.parametrize("colours", [1, 3])
@pytest.mark.parametrize("name", sorted(CACHED))
def test_a_cache_gives_the_full_forward_pass_at_every_position(name, colours):
    """Odd size (9 x 7), random weights, a conditioning vector and map: filling the canvas
    in raster order (a pixel's colour groups in turn), the cache's output at each position
    equals the full network's on the finished image, and never reads a later position."""
    if name.startswith("local") and colours > 1:
        pytest.skip("LocalPixelCNN models one colour group")
    cond_vec = 0 if name.startswith("local") else 3
    net = perturbed_(CACHED[name](colours, 2 * colours, colours, cond_vec, 2)).double().eval()
    b, h, w = 2, 9, 7
    x = torch.randn(b, colours, h, w, dtype=torch.float64)
    vec = torch.randn(b, cond_vec, dtype=torch.float64) if cond_vec else None
    cmap = torch.randn(b, 2, h, w, dtype=torch.float64)
    with torch.no_grad():
        full = net(x, vec, cmap)
    canvas = torch.full_like(x, 7.0)  # later positions hold garbage the cache must not read
    cache = net.sampling_cache(lambda v: v, canvas, vec, cmap)
    for i in range(h):
        for j in range(w):
            for c in range(colours):
                canvas[:, :c, i, j] = x[:, :c, i, j]
                group = slice(c, None, colours)  # the parameters of colour c
                torch.testing.assert_close(
                    cache.params(canvas, i, j)[:, group, 0, 0],
                    full[:, group, i, j],
                    rtol=1e-9,
                    atol=1e-9,
                )
            canvas[:, :, i, j] = x[:, :, i, j]


def counting_calls(net: torch.nn.Module) -> list[int]:
    calls = [0]
    net.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def same_draws(model, *nets: torch.nn.Module, n: int = 3) -> torch.Tensor:
    """The model's samples from one noise, cached and by the reference sampler: equal, and
    the cached run never calls any of the whole networks ``nets``."""
    model.eval()
    noise = model.sample_noise(n, torch.Generator().manual_seed(1))
    calls = [counting_calls(net) for net in nets]
    cached = model.sample(n, noise)
    assert all(c[0] == 0 for c in calls), "the cached sampler ran a whole network"
    with reference_sampling():
        reference = model.sample(n, noise)
    assert all(c[0] > 0 for c in calls)
    assert torch.equal(cached, reference)
    return cached


@pytest.mark.parametrize("name", sorted(CACHED))
def test_pixelcnn_samples_equal_the_reference(name):
    torch.manual_seed(0)
    model = PixelCNN(image_shape=(1, 9, 7), pixelcnn=CACHED[name])
    perturbed_(model.net)
    draws = same_draws(model, model.net)
    assert 0 < draws.mean() < 1  # not a constant image


def test_colour_samples_equal_the_reference_r_then_g_then_b():
    """256-way categorical colours, each pixel's R, G, B drawn in turn (n_colors = 3)."""
    torch.manual_seed(0)
    model = PixelCNN(
        image_shape=(3, 7, 5),
        data_kind="8bit",
        likelihood=Categorical(256),
        pixelcnn=gated(n_layers=2, channels=6, first_kernel=3, kernel=3),
    )
    perturbed_(model.net)
    draws = same_draws(model, model.net)
    assert draws.unique().numel() > 20


@pytest.mark.parametrize("conditioning", ["upsample", "vector"])
def test_pixelvae_decodes_like_the_reference(conditioning):
    torch.manual_seed(0)
    model = PixelVAE(
        latent_dim=3, conditioning=conditioning, pixelcnn=gated(n_layers=2, channels=4)
    )
    perturbed_(model.pixelcnn, scale=0.1)
    assert 0 < same_draws(model, model.pixelcnn, n=2).mean() < 1  # not a constant image


def test_vlae_decodes_like_the_reference():
    torch.manual_seed(0)
    model = VLAE(width=8, blocks=1, latent_dim=6, flow_hidden=24, context_dim=5)
    dm = TinyBinary(n_train=8)
    dm.setup("fit")
    model.on_train_batch_start((torch.stack([dm.train_set[i][0] for i in range(8)]), None), 0)
    perturbed_(model.pixelcnn, scale=0.05)
    assert 0 < same_draws(model, model.pixelcnn, n=2).mean() < 1


def test_hierarchical_pixelvae_samples_latent_maps_and_pixels_like_the_reference():
    """The PixelCNN prior over z_1 (Gaussian outputs, a map's channels drawn together) and
    the pixel decoder (embedded 8-bit input, R -> G -> B), both cached."""
    torch.manual_seed(0)
    model = HierarchicalPixelVAE(**{**TINY, "n_prior_layers": 2})  # two masked prior layers
    perturbed_(model.pixelcnn)
    perturbed_(model.priors[0], scale=0.1)
    assert same_draws(model, model.pixelcnn, model.priors[0], n=2).unique().numel() > 20


# ------------------------------------------------------------------ PixelCNN++
@pytest.mark.parametrize(
    "size, resolutions, nr_resnet, cond_vec, map_size",
    [
        ((9, 7), 3, 1, 3, (9, 7)),  # odd sizes: ceil-halved streams, a map at the image's size
        ((8, 8), 3, 2, 0, None),
        ((5, 6), 1, 1, 0, (5, 6)),  # the Pyramid PixelCNN's light network
        ((11, 9), 2, 1, 0, (3, 3)),  # a coarser map, repeated up to each stream
    ],
)
def test_the_pixelcnnpp_cache_gives_the_full_forward_pass(
    size, resolutions, nr_resnet, cond_vec, map_size
):
    """Both streams at every resolution, cells of the coarser ones computed at the first
    pixel they feed: equal to the network's forward pass at every position (float64)."""
    cond_map = 0 if map_size is None else 2
    net = PixelCNNppNet(
        3, 10, 1, cond_vec, cond_map, nr_resnet=nr_resnet, channels=8, dropout=0.5,
        resolutions=resolutions,
    )  # fmt: skip
    net = perturbed_(net).double().eval()  # eval: no dropout, as sampling runs
    b, (h, w) = 2, size
    x = torch.randn(b, 3, h, w, dtype=torch.float64)
    vec = torch.randn(b, cond_vec, dtype=torch.float64) if cond_vec else None
    cmap = None if map_size is None else torch.randn(b, 2, *map_size, dtype=torch.float64)
    with torch.no_grad():
        full = net(x, vec, cmap)
    canvas = torch.full_like(x, 7.0)
    cache = net.sampling_cache(lambda v: v, canvas, vec, cmap)
    for i in range(h):
        for j in range(w):
            torch.testing.assert_close(
                cache.params(canvas, i, j)[:, :, 0, 0], full[:, :, i, j], rtol=1e-9, atol=1e-9
            )
            canvas[:, :, i, j] = x[:, :, i, j]


NET = pixelcnnpp(nr_resnet=1, channels=8, dropout=0.0)
MIXTURE = dict(likelihood=DiscretizedLogisticMixture(n_mix=2))


def colour_images(shape, n=4) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (n, *shape), generator=g).float()


def initialized_(model, x: torch.Tensor):
    """The data-dependent init, then every weight perturbed."""
    model.data_dependent_init(x)
    return perturbed_(model, scale=0.1)


def test_pixelcnnpp_samples_equal_the_reference():
    torch.manual_seed(0)
    model = PixelCNN(image_shape=(3, 7, 5), data_kind="8bit", pixelcnn=NET, **MIXTURE)
    initialized_(model, colour_images((3, 7, 5)))
    draws = same_draws(model, model.net)
    assert draws.unique().numel() > 20


def test_grayscale_and_pyramid_pixelcnns_sample_and_colourize_like_the_reference():
    """Each level's network cached, the sampler keeping the coarser view (bounded draws)."""
    torch.manual_seed(0)
    embed = functools.partial(EmbeddingNet, n_blocks=3, channels=6, dropout=0.0)
    grayscale = AuxiliaryPixelCNN(
        views=[Grayscale()], image_shape=(3, 7, 5), base=NET, conditional=NET,
        embedding=functools.partial(embed, down_after=[1], up_after=[2]),
        **MIXTURE,
    )  # fmt: skip
    x = colour_images((3, 7, 5))
    initialized_(grayscale, x).eval()
    assert same_draws(grayscale, *grayscale.nets.values()).unique().numel() > 20
    views = grayscale.views_of(x)[1]
    torch.manual_seed(2)  # colourize draws its noise from the global generator
    cached = grayscale.colourize(views, n_colourings=2)
    with reference_sampling():
        torch.manual_seed(2)
        assert torch.equal(grayscale.colourize(views, n_colourings=2), cached)
    pyramid = AuxiliaryPixelCNN(
        views=[HalfResolution(), HalfResolution()], image_shape=(3, 9, 7),
        base=pixelcnnpp(nr_resnet=1, channels=8, dropout=0.0, resolutions=1),
        conditional=pixelcnnpp(nr_resnet=1, channels=8, dropout=0.0, resolutions=1),
        embedding=functools.partial(embed, down_after=[1], up_after=[2, 3], n_blocks=4),
        **MIXTURE,
    )  # fmt: skip
    initialized_(pyramid, colour_images((3, 9, 7)))
    assert same_draws(pyramid, *pyramid.nets.values()).unique().numel() > 20


def test_agave_decodes_like_the_reference():
    torch.manual_seed(0)
    model = AGAVE(image_shape=(3, 8, 8), latent_channels=2, width=8, blocks=1, pixelcnn=NET,
                  aux_downsamplings=1, **MIXTURE)  # fmt: skip
    initialized_(model, colour_images((3, 8, 8)))
    assert same_draws(model, model.pixelcnn, n=2).unique().numel() > 20


def test_the_reference_sampler_keeps_a_conditioning_map_of_another_height_whole():
    """An embedding map larger than the image (8 x 6 for 7 x 5) is resized by the network as
    in training; cropping it to the image's rows changed every coarser cell (found by the
    parity test above)."""
    net = PixelCNNppNet(3, 10, 1, 0, 2, nr_resnet=1, channels=4)
    cond = torch.randn(1, 2, 8, 6)
    canvas, cropped = sampling_canvas(net, torch.zeros(1, 3, 2, 5), 7, cond)
    assert canvas.shape == (1, 3, 7, 5) and cropped is cond
    canvas, cropped = sampling_canvas(net, torch.zeros(1, 3, 2, 5), 7, cond[:, :, :7])
    assert canvas.shape == (1, 3, 4, 5) and cropped.shape == (1, 2, 4, 6)
