"""Every shipped experiment config and sweep command parses into the model it promises."""

from pathlib import Path

import pytest
import yaml
from test_cli import REPO, arvae, ok

from lightning_modules import HierarchicalPixelVAE

PIXELVAE = REPO / "experiments" / "pixelvae"
ROWS = {  # Table 1 row config -> (model class, options that define the row)
    "gated_pixelcnn": ("PixelCNN", {"kind": "gated"}),
    "conv_vae": ("PixelVAE", {"n_pixelcnn_layers": 0}),
    "pixelvae": ("PixelVAE", {"pixelcnn": "plain", "conditioning": "upsample"}),
    "gated_pixelvae": ("PixelVAE", {"pixelcnn": "gated", "conditioning": "upsample"}),
    "gated_pixelvae_no_upsampling": ("PixelVAE", {"pixelcnn": "gated", "conditioning": "vector"}),
}


@pytest.mark.parametrize("row", sorted(ROWS))
def test_table1_configs_parse(row, tmp_path):
    common = PIXELVAE / "_mnist_common.yaml"
    result = ok(arvae("fit", "-c", str(common), "-c", str(PIXELVAE / f"{row}.yaml"),
                      "--print_config", cwd=tmp_path))  # fmt: skip
    config = yaml.safe_load(result.stdout)
    model, options = ROWS[row]
    assert config["model"]["class_path"] == f"lightning_modules.{model}"
    assert options.items() <= config["model"]["init_args"].items()
    assert config["data"]["init_args"]["batch_size"] == 100
    assert config["trainer"]["max_steps"] == 200_000


def sweep_command(path: Path) -> tuple[list[str], str, object]:
    """The sweep's command line for the first grid value, as a wandb agent would build it."""
    sweep = yaml.safe_load(path.read_text())
    (param, spec), *_ = sweep["parameters"].items()
    value = spec["values"][0]
    command = [c for c in sweep["command"] if c != "${env}"]
    assert command[0] == "arvae" and sweep["program"] == "arvae"
    args = [f"--{param}={value}" if c == "${args}" else c for c in command[1:]]
    return args, param, value


@pytest.mark.parametrize("name", ["pixelvae_layers", "pixelcnn_layers"])
def test_sweep_commands_parse_with_their_parameter(name, tmp_path):
    args, param, value = sweep_command(REPO / "experiments" / "sweeps" / f"{name}.yaml")
    # the sweep's relative config paths are relative to the repository root
    result = ok(arvae(*args, "--print_config", cwd=REPO))
    config = yaml.safe_load(result.stdout)
    section, _, key = param.partition(".init_args.")
    assert config[section]["init_args"][key] == value
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
    config = yaml.safe_load(ok(arvae("fit", *args, "--print_config", cwd=tmp_path)).stdout)
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
    config = yaml.safe_load(ok(arvae("fit", "-c", smoke, "--print_config", cwd=tmp_path)).stdout)
    assert config["data"]["init_args"]["sample"] is True
    assert config["model"]["class_path"] == "lightning_modules.HierarchicalPixelVAE"
