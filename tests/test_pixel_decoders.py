"""One pixel-decoder interface: every network of the backbone is built and called the same
way, fits every model that can feed it, and is saved as the config that builds it."""

from functools import partial
from pathlib import Path

import pytest
import torch
from decoders import gated, local, pixelcnnpp, plain

from lightning_modules import VLAE, HierarchicalPixelVAE, PixelCNN, PixelVAE, legacy_options
from lightning_modules.backbone import (
    GatedPixelCNN,
    LocalPixelCNN,
    PixelCNNppNet,
    PixelDecoder,
    PlainPixelCNN,
    as_factory,
    factory_config,
)
from lightning_modules.likelihoods import Categorical, DiscretizedLogisticMixture

NETWORKS = {
    "gated": gated(n_layers=2, channels=6, first_kernel=3, kernel=3),
    "plain": plain(n_layers=2, channels=6, first_kernel=3, kernel=3),
    "local": local(n_layers=2, channels=6, n_1x1_blocks=1),
    "pixelcnnpp": pixelcnnpp(nr_resnet=1, channels=8, dropout=0.0),
}


def perturbed(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights away from any initial symmetry; float64 for exact zero comparisons."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return net.double().eval()


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_every_network_has_one_interface_causal_and_within_its_rows(name):
    """factory(in, out, n_colors, cond_vec_dim, cond_map_channels) builds each network; the
    output at a pixel does not move when that pixel or any later one changes (odd size,
    random weights, a conditioning map), and not when rows above its receptive_rows do."""
    cond_vec = 0 if name == "local" else 3
    net = NETWORKS[name](2, 4, 1, cond_vec, 2)
    assert isinstance(net, PixelDecoder)
    net = perturbed(net)
    h, w, i, j = 9, 7, 6, 3
    x = torch.randn(1, 2, h, w, dtype=torch.float64)
    vec = torch.randn(1, 3, dtype=torch.float64) if cond_vec else None
    cmap = torch.randn(1, 2, h, w, dtype=torch.float64)
    out = net(x, vec, cmap)
    assert out.shape == (1, 4, h, w)
    later = x.clone()
    later[:, :, i, j:] += 1.0
    later[:, :, i + 1 :] -= 1.0
    torch.testing.assert_close(net(later, vec, cmap)[:, :, i, j], out[:, :, i, j], rtol=0, atol=0)
    earlier = x.clone()
    earlier[:, :, i, j - 1] += 1.0
    assert not torch.equal(net(earlier, vec, cmap)[:, :, i, j], out[:, :, i, j])
    if net.receptive_rows is not None:
        far = x.clone()
        far[:, :, : i - net.receptive_rows] += 1.0
        torch.testing.assert_close(net(far, vec, cmap)[:, :, i], out[:, :, i], rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_a_network_refuses_conditioning_it_was_not_built_for(name):
    net = NETWORKS[name](1, 2, 1, 0, 2)
    x = torch.zeros(1, 1, 5, 5)
    with pytest.raises(ValueError, match="cond_map built for 2 channels"):
        net(x, None, torch.zeros(1, 3, 5, 5))
    with pytest.raises(ValueError, match="cond_vec built for 0 channels"):
        net(x, torch.zeros(1, 4), torch.zeros(1, 2, 5, 5))


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_every_network_fits_the_pixelcnn_model_and_sums_to_one(name):
    """The same model class with any network: over all 2^6 binary 2x3 images the
    probabilities sum to one, after the network's data-dependent init where it has one."""
    model = PixelCNN(image_shape=(1, 2, 3), pixelcnn=NETWORKS[name]).eval()
    x = torch.cartesian_prod(*[torch.arange(2.0)] * 6).view(64, 1, 2, 3)
    assert hasattr(model, "initialized") == (name == "pixelcnnpp")
    if name == "pixelcnnpp":
        model.data_dependent_init(x)
    perturbed(model.net, seed=1).float()
    with torch.no_grad():
        total = model.log_likelihood_bound(x, 1).double().exp().sum()
    assert abs(float(total) - 1.0) < 1e-4
    assert model.sample(2).shape == (2, 1, 2, 3)


def test_the_colour_grouping_follows_the_likelihood():
    """A likelihood drawing a pixel's channels in turn gets one output group per colour; one
    coupling them itself gets a network that sees none of the pixel, and PixelCNN++ refuses
    the first kind by name."""
    rgb = dict(image_shape=(3, 5, 5), data_kind="8bit")
    assert PixelCNN(**rgb, pixelcnn=NETWORKS["gated"]).net.n_colors == 3
    mixture = DiscretizedLogisticMixture(n_mix=2)
    assert PixelCNN(**rgb, likelihood=mixture, pixelcnn=NETWORKS["gated"]).net.n_colors == 1
    with pytest.raises(ValueError, match="cannot order the colours"):
        PixelCNN(**rgb, likelihood=Categorical(256), pixelcnn=NETWORKS["pixelcnnpp"])


@pytest.mark.parametrize(
    "make",
    [
        lambda: PixelVAE(latent_dim=3, pixelcnn=NETWORKS["plain"]),
        lambda: PixelVAE(latent_dim=3, pixelcnn=NETWORKS["local"]),
        lambda: PixelVAE(latent_dim=3, pixelcnn=NETWORKS["pixelcnnpp"]),
        lambda: VLAE(width=8, blocks=1, latent_dim=4, flow_hidden=16, pixelcnn=NETWORKS["gated"]),
    ],
    ids=["pixelvae-plain", "pixelvae-local", "pixelvae-pixelcnnpp", "vlae-gated"],
)
def test_latent_models_take_other_networks(make):
    torch.manual_seed(0)
    model = make()
    x = torch.bernoulli(torch.full((4, 1, 28, 28), 0.3))
    if hasattr(model, "initialized"):
        with torch.no_grad():
            model.data_dependent_init(x)
    loss = model.loss(model.checked(model.elbo_terms(x)))
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.pixelcnn.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)  # the network is on the loss's path
    with torch.no_grad():
        bound = model.eval().log_likelihood_bound(x, 3)
    assert bound.shape == (4,) and torch.isfinite(bound).all()


def test_models_without_the_pixelcnnpp_init_refuse_it_by_name():
    with pytest.raises(ValueError, match="HierarchicalPixelVAE does not run yet"):
        HierarchicalPixelVAE(
            image_shape=(3, 8, 8),
            latent_channels=(2, 3),
            latent_sizes=(4, 1),
            pixel_widths=(6, 8),
            latent_width=8,
            embed_dim=2,
            likelihood=DiscretizedLogisticMixture(n_mix=2),
            pixelcnn=NETWORKS["pixelcnnpp"],
        )
    with pytest.raises(ValueError, match="VLAE does not run yet"):
        VLAE(pixelcnn=NETWORKS["pixelcnnpp"])
    with pytest.raises(TypeError, match="must build a lightning_modules.backbone.PixelDecoder"):
        PixelCNN(pixelcnn=partial(torch.nn.Conv2d, kernel_size=1))


def test_a_network_option_is_saved_as_the_config_that_builds_it():
    """In Python the option is a class or a partial; the hyper-parameters hold class_path and
    every init arg (as the CLI writes them), and a model rebuilt from them is the same."""
    assert factory_config(GatedPixelCNN) == {
        "class_path": "lightning_modules.backbone.GatedPixelCNN",
        "init_args": {"n_layers": 3, "channels": 32, "first_kernel": 7, "kernel": 5},
    }
    model = PixelVAE(latent_dim=3, pixelcnn=NETWORKS["plain"])
    saved = model.hparams["pixelcnn"]
    assert saved["class_path"] == "lightning_modules.backbone.PlainPixelCNN"
    assert saved["init_args"] == {"n_layers": 2, "channels": 6, "first_kernel": 3, "kernel": 3}
    rebuilt = PixelVAE(**model.hparams)
    rebuilt.load_state_dict(model.state_dict())  # strict: the same modules
    assert isinstance(as_factory(saved)(1, 1), PlainPixelCNN)
    for cls in (GatedPixelCNN, PlainPixelCNN, LocalPixelCNN, PixelCNNppNet):
        config = factory_config(cls)
        assert factory_config(as_factory(config)) == config  # the config round-trips


OLD = {  # model -> (options as main up to 82b1a17 saved them, the same model today)
    "PixelCNN": (
        dict(kind="plain", n_layers=2, channels=6, first_kernel=3, kernel=3),
        dict(pixelcnn=NETWORKS["plain"]),
    ),
    "PixelVAE": (
        dict(n_pixelcnn_layers=2, pixelcnn="gated", pixelcnn_channels=6, first_kernel=3, kernel=3),
        dict(pixelcnn=NETWORKS["gated"]),
    ),
    "VLAE": (
        dict(decoder="pixelcnn", pixelcnn_channels=6, n_masked=2, n_1x1_blocks=1, tie_weights=True),
        dict(pixelcnn=NETWORKS["local"]),
    ),
}


@pytest.mark.parametrize("name", sorted(OLD))
def test_old_options_translate_into_the_same_model(name):
    old, new = OLD[name]
    cls = {"PixelCNN": PixelCNN, "PixelVAE": PixelVAE, "VLAE": VLAE}[name]
    upgraded = legacy_options.upgrade(f"lightning_modules.{name}", old)
    torch.manual_seed(0)
    today = cls(**new)
    translated = cls(**upgraded)
    assert translated.hparams["pixelcnn"] == today.hparams["pixelcnn"]
    translated.load_state_dict(today.state_dict())


def test_vlae_switches_and_pixelcnnpp_options_translate():
    up = legacy_options.upgrade
    assert up("lightning_modules.VLAE", {"decoder": "factorized"})["pixelcnn"] is None
    assert up("lightning_modules.VLAE", {"decoder": "unconditional"})["latent"] is False
    assert up("lightning_modules.PixelVAE", {"n_pixelcnn_layers": 0})["pixelcnn"] is None
    pp = up("lightning_modules.PixelCNNpp", dict(nr_resnet=2, nr_filters=64, nr_logistic_mix=4))
    assert pp["pixelcnn"]["init_args"] == {"nr_resnet": 2, "channels": 64, "dropout": 0.5}
    assert pp["likelihood"]["init_args"] == {"n_mix": 4}
    today = {"pixelcnn": None, "latent": True}
    assert up("lightning_modules.VLAE", today) == today  # options of today stay as they are


def test_an_old_checkpoint_loaded_in_python_names_the_commit_that_reads_it():
    ckpt = Path(__file__).parent / "fixtures" / "pixelcnn_274d61e.ckpt"
    with pytest.raises(ValueError, match="up to commit 82b1a17 .*arvae test --ckpt_path"):
        PixelCNN.load_from_checkpoint(ckpt)
