"""benchmarks/table.py's bookkeeping: its named configs exist and build the models the
README's commands build, and its ratios are the ones its rows give."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import table  # noqa: E402


def test_every_named_config_is_there_and_a_missing_one_is_named():
    for name, files in table.CONFIGS.items():
        assert all(f.is_file() for f in files), name
    assert set(table.DEFAULT) <= set(table.CONFIGS)
    with pytest.raises(SystemExit):
        table.parse_args(["no/such.yaml"])


def test_the_gated_config_is_matched_to_the_peer_at_its_size_and_overrides_apply(tmp_path):
    model, batch = table.build(
        table.CONFIGS["gated_pixelcnn"], 64, None, ["model.init_args.pixelcnn.init_args.kernel=3"]
    )
    assert batch == 64 and table.network_options(model)[1]["kernel"] == 3
    assert table.gated_peer_match(model) == {"n_layers": 13, "channels": 32}
    assert table.pixelcnnpp_peer_match(model) is None


def test_ratios_come_from_the_rows():
    rows = [
        {"config": "c", "impl": "arvae PixelCNN", "train_img_s/32-true": 6.0,
         "train_img_s/bf16-mixed": 9.0, "sample_s_per_image/cached": 0.5,
         "sample_s_per_image/uncached": 20.0},
        {"config": "c", "impl": "peer", "train_img_s/32-true": 4.0,
         "train_img_s/bf16-mixed": 6.0, "sample_s_per_image/peer": 50.0},
    ]  # fmt: skip
    lines = table.ratios(rows, ["32-true", "bf16-mixed"])
    assert "c: bf16-mixed / 32-true training = 1.50x" in lines
    assert "c: cached sampling 40.0x faster than uncached" in lines
    assert "c: arvae / peer training (32-true) = 1.50x" in lines
    assert "c: peer sampling takes 100.0x as long as arvae's cached sampler" in lines
    assert "| c | arvae PixelCNN |" in table.markdown(
        [{**rows[0], "params": 1e6, "batch": 8, "flops_per_image": 1e9}], ["32-true"], 2.0
    )


def test_trainer_fit_steps_are_timed_and_the_model_stays_on_its_device(tmp_path):
    from decoders import gated

    from lightning_modules import PixelCNN

    model = PixelCNN(pixelcnn=gated(n_layers=1, channels=4))
    x = torch.bernoulli(torch.full((4, 1, 28, 28), 0.5))
    before = [p.detach().clone() for p in model.parameters()]
    rate = table.fit_steps_per_s(model, x, "32-true", steps=3, warmup=1)
    assert 0 < rate < float("inf") and model.trainer.global_step == 4
    assert all(p.device == x.device for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    row = {
        "config": "c",
        "impl": "arvae PixelCNN",
        "train_img_s/32-true": 8.0,
        "fit_img_s/32-true": 6.0,
    }
    assert "c: Trainer.fit / the bare training step (32-true) = 0.75x" in table.ratios(
        [row], ["32-true"]
    )
