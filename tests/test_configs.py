"""Every shipped experiment config and sweep command parses into the model it promises."""

from pathlib import Path

import pytest
import yaml
from test_cli import REPO, printed_config

from arvae.report import hparam
from lightning_modules import VLAE, HierarchicalPixelVAE

PIXELVAE = REPO / "experiments" / "pixelvae"
BACKBONE = "lightning_modules.backbone."
GATED, PLAIN, LOCAL = (BACKBONE + n for n in ("GatedPixelCNN", "PlainPixelCNN", "LocalPixelCNN"))
ROWS = {  # Table 1 row config -> (model class, options that define the row)
    "gated_pixelcnn": ("PixelCNN", {"pixelcnn.class_path": GATED}),
    "conv_vae": ("PixelVAE", {"pixelcnn": None}),
    "pixelvae": ("PixelVAE", {"pixelcnn.class_path": PLAIN, "conditioning": "upsample"}),
    "gated_pixelvae": ("PixelVAE", {"pixelcnn.class_path": GATED, "conditioning": "upsample"}),
    "gated_pixelvae_no_upsampling": (
        "PixelVAE",
        {"pixelcnn.class_path": GATED, "conditioning": "vector"},
    ),
}


def has_options(init_args: dict, options: dict) -> bool:
    """Every option (dotted keys reach into class_path options) has the given value."""
    return all(hparam(init_args, key) == value for key, value in options.items())


@pytest.mark.parametrize("row", sorted(ROWS))
def test_table1_configs_parse(row, tmp_path):
    common = PIXELVAE / "_mnist_common.yaml"
    config = printed_config("fit", "-c", str(common), "-c", str(PIXELVAE / f"{row}.yaml"))
    model, options = ROWS[row]
    assert config["model"]["class_path"] == f"lightning_modules.{model}"
    assert has_options(config["model"]["init_args"], options)
    assert config["data"]["init_args"]["batch_size"] == 100
    assert config["trainer"]["max_steps"] == 200_000


@pytest.mark.parametrize(
    "name, options",
    [
        ("fig5_conv_vae", {"latent_dim": 2, "pixelcnn": None}),
        ("fig5_pixelvae", {"latent_dim": 2, "pixelcnn.class_path": GATED, "pixelcnn.n_layers": 13}),
    ],
)
def test_fig5_configs_parse_with_a_2d_latent_on_labelled_dynamic_mnist(name, options, tmp_path):
    common = PIXELVAE / "_mnist_common.yaml"
    config = printed_config("fit", "-c", str(common), "-c", str(PIXELVAE / f"{name}.yaml"))
    assert has_options(config["model"]["init_args"], options)
    assert config["data"]["init_args"]["binarization"] == "dynamic"
    assert config["latent_map"]["k"] == 5


def sweep_command(path: Path) -> tuple[list[str], str, object]:
    """The sweep's command line for the first grid value, as a wandb agent would build it."""
    sweep = yaml.safe_load(path.read_text())
    (param, spec), *_ = sweep["parameters"].items()
    value = spec["values"][0]
    command = [c for c in sweep["command"] if c != "${env}"]
    assert command[0] == "arvae" and sweep["program"] == "arvae"
    args = [f"--{param}={value}" if c == "${args}" else c for c in command[1:]]
    return args, param, value


@pytest.mark.parametrize("name", ["pixelvae_layers", "pixelcnn_layers", "vlae_receptive_field"])
def test_sweep_commands_parse_with_their_parameter(name, tmp_path):
    args, param, value = sweep_command(REPO / "experiments" / "sweeps" / f"{name}.yaml")
    # the sweep's relative config paths are relative to the repository root
    config = printed_config(*args, cwd=REPO)
    section, _, key = param.partition(".init_args.")
    assert hparam(config[section]["init_args"], key) == value
    assert config["test_after_fit"] is True
    loggers = [lg["class_path"].rsplit(".", 1)[1] for lg in config["trainer"]["logger"]]
    assert loggers == ["CSVLogger", "WandbLogger"]


NATURAL = {  # dataset config -> (size-specific model config, datamodule, image size)
    "cifar10_hierarchical": ("_hierarchical_32px", "CIFAR10", 32),
    "lsun32_hierarchical": ("_hierarchical_32px", "LSUNBedrooms", 32),
    "lsun64_hierarchical": ("_hierarchical_64px", "LSUNBedrooms", 64),
    "imagenet64_hierarchical": ("_hierarchical_64px", "ImageNet64", 64),
}


@pytest.mark.parametrize("name", sorted(NATURAL))
def test_natural_image_configs_parse_and_build(name, tmp_path):
    """Appendix E.2's schedule (Adam 1e-3, batch 48, 400K steps), and the full-size model the
    config describes really builds for its image size."""
    sizes, datamodule, size = NATURAL[name]
    configs = ["_natural_common", sizes, name]
    args = [a for c in configs for a in ("-c", str(PIXELVAE / f"{c}.yaml"))]
    config = printed_config("fit", *args)
    assert config["data"]["class_path"] == f"datamodules.{datamodule}"
    assert config["data"]["init_args"]["batch_size"] == 48
    assert config["trainer"]["max_steps"] == 400_000
    init = config["model"]["init_args"]
    assert (init["lr"], init["optimizer"]) == (0.001, "adam")
    init = {k: v for k, v in init.items() if k not in ("image_shape", "data_kind")}
    model = HierarchicalPixelVAE(image_shape=(3, size, size), data_kind="8bit", **init)
    assert model.levels == ["z1", "z2"] and model.latent_shapes["z2"][1:] == (1, 1)


def test_cifar10_smoke_config_uses_the_shipped_sample(tmp_path):
    smoke = str(PIXELVAE / "cifar10_smoke.yaml")
    config = printed_config("fit", "-c", smoke)
    assert config["data"]["init_args"]["sample"] is True
    assert config["model"]["class_path"] == "lightning_modules.HierarchicalPixelVAE"


VLAE_DIR = REPO / "experiments" / "vlae"
VLAE_DATASETS = {  # dataset config -> (datamodule, tied PixelCNN weights)
    "mnist_static": ("BinarizedMNIST", True),
    "mnist_dynamic": ("BinarizedMNIST", True),
    "omniglot": ("OMNIGLOT", False),
    "caltech": ("CaltechSilhouettes", False),
}
VLAE_ABLATIONS = {  # ablation overlay -> the switches it sets
    "af_vae": {"prior": "af", "posterior": "gaussian", "pixelcnn": None},
    "iaf_vae": {"prior": "gaussian", "posterior": "iaf", "pixelcnn": None},
    "iaf_posterior": {"prior": "gaussian", "posterior": "iaf", "latent": True},
    "unconditional_decoder": {"latent": False},
    "gaussian_prior": {"prior": "gaussian", "posterior": "gaussian"},
}


def vlae_config(tmp_path: Path, *names: str) -> dict:
    args = [a for n in ("_common", *names) for a in ("-c", str(VLAE_DIR / f"{n}.yaml"))]
    return printed_config("fit", *args)


@pytest.mark.parametrize("name", sorted(VLAE_DATASETS))
def test_vlae_configs_hold_appendix_a_and_build(name, tmp_path):
    """One hyper-parameter set for every dataset (appendix A), and the full-size model."""
    datamodule, tied = VLAE_DATASETS[name]
    config = vlae_config(tmp_path, name)
    assert config["data"]["class_path"] == f"datamodules.{datamodule}"
    (polyak,) = config["trainer"]["callbacks"]
    assert polyak["class_path"] == "callbacks.PolyakAveraging"
    assert polyak["init_args"]["decay"] == 0.998
    init = config["model"]["init_args"]
    paper = dict(latent_dim=64, prior="af", latent=True, optimizer="adamax", lr=0.002)
    paper |= dict(free_bits=0.01, free_bits_unit="data_dim", iwae_k=4096, flow_hidden=640)
    paper |= {"flow_steps": 4, "flow_mean_only": True, "pixelcnn.n_layers": 6}
    paper |= {"pixelcnn.channels": 12, "pixelcnn.class_path": LOCAL}
    assert has_options(init, paper) and hparam(init, "pixelcnn.tie_weights") is tied
    model = VLAE(**{k: v for k, v in init.items() if k not in ("image_shape", "data_kind")})
    assert model.pixelcnn.receptive_rows == 6
    assert len(model.prior_flow.mades) == 4


@pytest.mark.parametrize("ablation", sorted(VLAE_ABLATIONS))
def test_vlae_ablation_overlays_set_their_switches(ablation, tmp_path):
    config = vlae_config(tmp_path, "mnist_static", f"ablations/{ablation}")
    assert VLAE_ABLATIONS[ablation].items() <= config["model"]["init_args"].items()


def test_vlae_smoke_config_uses_the_shipped_sample(tmp_path):
    config = vlae_config(tmp_path, "mnist_smoke")
    assert config["data"]["init_args"]["sample"] is True
    assert config["trainer"]["max_epochs"] == 3
