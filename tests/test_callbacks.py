"""The shared callbacks in short in-process Trainer runs (CPU), and the grid helper."""

import csv
import json
import math
import warnings

import lightning as L
import numpy as np
import pytest
import torch
from decoders import gated
from lightning.pytorch.loggers import CSVLogger
from PIL import Image
from tiny_data import TinyBinary, TinyColour

from callbacks import CollapseAlarm, KLBreakdown, LatentMap, NoiseVariation, SampleGrid, TestReport
from callbacks.images import image_grid
from callbacks.latent_map import knn_error
from callbacks.test_report import summary
from datamodules.base import eval_order
from datamodules.binarized_mnist import load_sample
from lightning_modules import HierarchicalPixelVAE, PixelVAE

SCALE = 4  # saved grids draw a 28 x 28 digit 4x, with a 4-pixel gap
CELL = 28 * SCALE + SCALE


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: extra threads only add overhead (and the setting is process-wide)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_vae(cls: type[PixelVAE] = PixelVAE) -> PixelVAE:
    torch.manual_seed(0)
    return cls(latent_dim=4, pixelcnn=gated(n_layers=1, channels=8), iwae_k=3)


class InvertingVAE(PixelVAE):
    """`reconstruct` returns the negative image, so the grid layout can be checked exactly."""

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return 1 - x


def trainer(tmp_path, callbacks, max_epochs: int = 1, **kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        limit_train_batches=2,
        limit_val_batches=1,
        logger=CSVLogger(tmp_path, name="run"),
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        **kwargs,
    )


def cells(grid: np.ndarray, ncols: int) -> list[np.ndarray]:
    """The 28x28 images of a saved grid, row-major, without their padding and at 1x (each
    SCALE x SCALE block must be one value)."""
    rows, size = grid.shape[0] // CELL, 28 * SCALE
    blocks = [
        grid[r * CELL : r * CELL + size, c * CELL : c * CELL + size]
        for r in range(rows)
        for c in range(ncols)
    ]
    for block in blocks:
        np.testing.assert_array_equal(
            block, block[::SCALE, ::SCALE].repeat(SCALE, 0).repeat(SCALE, 1)
        )
    return [block[::SCALE, ::SCALE] for block in blocks]


def padding(grid: np.ndarray) -> np.ndarray:
    """The separator pixels: the last SCALE rows and columns of every cell."""
    rows = [grid[i::CELL] for i in range(CELL - SCALE, CELL)]
    cols = [grid[:, i::CELL] for i in range(CELL - SCALE, CELL)]
    return np.concatenate([a.ravel() for a in rows + cols])


# ------------------------------------------------------------------------------ image_grid
def test_image_grid_layout_and_values():
    images = torch.stack([torch.full((1, 2, 2), v) for v in (0.0, 0.5, 1.0)])
    images[0, 0, 0, 0] = -3.0  # clamped to 0
    images[2, 0, 1, 1] = 7.0  # clamped to 1
    grid = image_grid(images, ncols=2)
    p = 128  # padding: 0.5 * 255 rounded
    expected = np.array(
        [
            [0, 0, p, 128, 128, p],
            [0, 0, p, 128, 128, p],
            [p, p, p, p, p, p],
            [255, 255, p, 0, 0, p],  # the blank that fills the last row is black
            [255, 255, p, 0, 0, p],
            [p, p, p, p, p, p],
        ],
        dtype=np.uint8,
    )
    assert grid.dtype == np.uint8
    np.testing.assert_array_equal(grid, expected)


def test_image_grid_rgb_and_padding_width():
    images = torch.zeros(5, 3, 4, 6)
    images[:, 1] = 1.0  # green
    grid = image_grid(images, ncols=3, pad=2)
    assert grid.shape == (2 * (4 + 2), 3 * (6 + 2), 3)
    np.testing.assert_array_equal(grid[0, 0], [0, 255, 0])
    np.testing.assert_array_equal(grid[4, 0], [128, 128, 128])  # padding row
    np.testing.assert_array_equal(grid[6, 2 * 8], [0, 0, 0])  # the blank 6th cell


def test_image_grid_scale_draws_each_pixel_as_a_block():
    images = torch.rand(3, 1, 3, 5)
    grid = image_grid(images, ncols=2, pad=2, scale=3)
    assert grid.shape == (2 * (9 + 2), 2 * (15 + 2))
    one = image_grid(images, ncols=2, pad=0)
    for r, c in [(0, 0), (0, 1), (1, 0)]:
        cell = grid[r * 11 : r * 11 + 9, c * 17 : c * 17 + 15]
        np.testing.assert_array_equal(
            cell, one[r * 3 : r * 3 + 3, c * 5 : c * 5 + 5].repeat(3, 0).repeat(3, 1)
        )
    assert (grid[9:11] == 128).all() and (grid[:, 15:17] == 128).all()


# ------------------------------------------------------------------------------ SampleGrid
def first_evaluated(data: TinyBinary, split: str, n: int) -> np.ndarray:
    """The first n images that validation / test see of the datamodule's split (the
    reconstructions' originals): the split in its evaluation order."""
    images = load_sample()[split][: data.sizes[split]]
    return images[eval_order(images).indices[:n]]


def test_sample_grid_every_n_epochs_and_after_test(tmp_path):
    grid_cb = SampleGrid(every_n_epochs=2, n_samples=4, n_reconstructions=2, ncols=2)
    t = trainer(tmp_path, [grid_cb], max_epochs=4)
    model, data = tiny_vae(InvertingVAE), TinyBinary(n_test=9)
    t.fit(model, datamodule=data)
    t.test(model, datamodule=data)
    out = tmp_path / "run" / "version_0" / "samples"
    # validation epochs 1 and 3 (every 2nd), never the sanity check, and once after test
    assert sorted(p.name for p in out.iterdir()) == [
        f"{kind}_{tag}.png"
        for kind in ("reconstructions", "samples")
        for tag in ("epoch0001", "epoch0003", "test")
    ]
    for tag, split in (("epoch0003", "valid"), ("test", "test")):
        samples = np.asarray(Image.open(out / f"samples_{tag}.png"))
        assert samples.shape == (2 * CELL, 2 * CELL)  # 4 samples in 2 rows of 2
        assert set(np.unique(np.concatenate([c.ravel() for c in cells(samples, 2)]))) <= {0, 255}
        assert (padding(samples) == 128).all()

        recon = np.asarray(Image.open(out / f"reconstructions_{tag}.png"))
        assert recon.shape == (2 * CELL, 2 * CELL)  # 2 (original, reconstruction) rows
        originals = first_evaluated(data, split, 2) * 255
        images = cells(recon, 2)
        for i in range(2):
            np.testing.assert_array_equal(images[2 * i], originals[i])
            np.testing.assert_array_equal(images[2 * i + 1], 255 - originals[i])
        assert (padding(recon) == 128).all()


def test_sample_grid_real_reconstructions_and_test_only(tmp_path):
    """every_n_epochs=0: nothing during fit; after test, binary reconstructions; rows hold
    ncols // 2 (original, reconstruction) pairs."""
    grid_cb = SampleGrid(every_n_epochs=0, n_samples=3, n_reconstructions=3, ncols=4)
    t = trainer(tmp_path, [grid_cb], max_epochs=1)
    model, data = tiny_vae(), TinyBinary(n_test=9)
    t.fit(model, datamodule=data)
    out = tmp_path / "run" / "version_0" / "samples"
    assert not out.exists()
    t.test(model, datamodule=data)
    samples = np.asarray(Image.open(out / "samples_test.png"))
    assert samples.shape == (1 * CELL, 4 * CELL)  # 3 samples and a blank in one row
    recon = np.asarray(Image.open(out / "reconstructions_test.png"))
    assert recon.shape == (2 * CELL, 4 * CELL)  # 3 pairs, 2 per row
    images = cells(recon, 4)
    originals = first_evaluated(data, "test", 3) * 255
    for i in range(3):
        np.testing.assert_array_equal(images[2 * i], originals[i])
        assert set(np.unique(images[2 * i + 1])) <= {0, 255}
    assert (images[6] == 0).all() and (images[7] == 0).all()  # the empty last pair


# ----------------------------------------------------------------------------- KLBreakdown
def test_kl_breakdown_rows_per_validation_epoch_and_test(tmp_path):
    kl_cb = KLBreakdown()
    t = trainer(tmp_path, [kl_cb], max_epochs=3)
    model, data = tiny_vae(), TinyBinary(n_test=9)
    t.fit(model, datamodule=data)
    (tested,) = t.test(model, datamodule=data)
    with (tmp_path / "run" / "version_0" / "kl_breakdown.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["stage"], r["epoch"]) for r in rows[:3]] == [
        ("val", "0"),
        ("val", "1"),
        ("val", "2"),
    ]
    assert [r["stage"] for r in rows] == ["val"] * 3 + ["test"]  # no sanity-check row
    columns = {"stage", "epoch", "nelbo", "recon", "kl/z", "nll_iwae", "active_units/z"}
    assert columns == set(rows[0])
    for row in rows:
        nelbo, recon, kl = (float(row[k]) for k in ("nelbo", "recon", "kl/z"))
        assert math.isfinite(nelbo) and kl >= 0
        assert nelbo == pytest.approx(recon + kl, abs=1e-3)
    assert all(r["nll_iwae"] == "" for r in rows[:3])  # IWAE only at test time
    for key in ("nelbo", "recon", "kl/z", "nll_iwae"):
        assert float(rows[-1][key]) == pytest.approx(tested[f"test/{key}"], rel=1e-6)
    assert "| stage |" in kl_cb.table() and len(kl_cb.table().splitlines()) == 2 + 4


# ---------------------------------------------------------------------------- CollapseAlarm
def test_collapse_alarm_warns_once_after_warm_up_naming_the_knobs(tmp_path):
    """A fresh PixelVAE's encoder ignores x (KL 0, no active unit): no warning while the KL
    warms up; after it, one per stage, naming the level and the options that help."""
    model, data = tiny_vae(), TinyBinary(n_test=9)
    model.kl_warmup_steps = 100
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, [CollapseAlarm()], max_epochs=2).fit(model, datamodule=data)
    assert not [w for w in caught if "collapse" in str(w.message)]

    model.kl_warmup_steps = 0
    t = trainer(tmp_path, [CollapseAlarm()], max_epochs=2)
    with pytest.warns(UserWarning, match="Posterior collapse") as caught:
        t.fit(model, datamodule=data)
        t.test(model, datamodule=data)
    messages = [str(w.message) for w in caught if "collapse" in str(w.message)]
    assert [m.split(" step")[0] for m in messages] == [
        "Posterior collapse at val",
        "Posterior collapse at test",
    ]
    for knob in ("'z'", "kl_warmup_steps", "free_bits", "receptive field", "lambda"):
        assert knob in messages[0]


def test_collapse_alarm_is_quiet_for_a_latent_in_use():
    """A level with KL above the threshold and active units is not flagged; one with either
    at ~0 is, and a model without latents never is."""
    alarm, model = CollapseAlarm(), tiny_vae()
    run = type("Run", (), {})()
    for metrics, flagged in (
        ({"val/kl/z": 3.0, "val/active_units/z": 2.0}, {}),
        ({"val/kl/z": 0.2, "val/active_units/z": 2.0}, {"z": "KL 0.2 nats per image"}),
        ({"val/kl/z": 3.0, "val/active_units/z": 0.0}, {"z": "0 of 4 units active"}),
    ):
        run.callback_metrics = {k: torch.tensor(v) for k, v in metrics.items()}
        assert alarm.collapsed(run, model, "val") == flagged
    run.callback_metrics = {}
    assert alarm.collapsed(run, model, "val") == {}


# -------------------------------------------------------------------------------- LatentMap
def test_knn_error_leave_one_out():
    torch.manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    labels = torch.arange(3).repeat_interleave(40)
    points = centres[labels] + torch.randn(120, 2)
    assert knn_error(points, labels, k=5) == 0.0  # separated classes
    shuffled = labels[torch.randperm(120)]
    assert knn_error(points, shuffled, k=5) > 0.4  # labels unrelated to the points
    # one point of class 1 among class 0: its neighbours outvote it, and it no one else
    lone = torch.cat([points[:40], torch.tensor([[0.1, 0.1]])])
    assert knn_error(lone, torch.cat([labels[:40], torch.tensor([1])]), k=3) == 1 / 41


class LabelledBinary(TinyBinary):
    """TinyBinary with made-up class labels (index mod 3) for its test split."""

    def setup(self, stage: str) -> None:
        super().setup(stage)
        self.labels = {"test": np.arange(self.sizes["test"]) % 3}


def test_latent_map_logs_the_knn_error_and_draws_a_2d_latent(tmp_path):
    """Fig. 5: the k-NN error of the test set's posterior means (gathered over batches of 10,
    in index order) and, for a 2-D latent, the scatter; no labels, nothing."""
    torch.manual_seed(0)
    model = PixelVAE(latent_dim=2, pixelcnn=gated(n_layers=1, channels=8), iwae_k=1)
    torch.nn.init.normal_(model.encoder[-1].weight, std=0.1)  # means that depend on x
    data = LabelledBinary(n_test=37, eval_batch_size=10)
    t = trainer(tmp_path, [LatentMap(k=3)])
    (tested,) = t.test(model, datamodule=data, verbose=False)
    x = torch.stack([data.test_set[i][0] for i in range(37)])
    with torch.no_grad():
        means = model.posterior_mean(x)["z"]
    expected = knn_error(means, torch.as_tensor(data.labels["test"]), k=3)
    assert tested["test/knn_error/z"] == pytest.approx(expected)
    png = tmp_path / "run" / "version_0" / "samples" / "latent_z_test.png"
    assert len(np.unique(np.asarray(Image.open(png).convert("L")))) > 10
    (tested,) = trainer(tmp_path, [LatentMap()]).test(model, datamodule=TinyBinary(), verbose=False)
    assert "test/knn_error/z" not in tested


# ------------------------------------------------------------------------------ TestReport
def test_test_summary_names_bounds_latents_and_files(tmp_path):
    metrics = {
        "test/nelbo": 119.754, "test/nelbo_se": 0.759, "test/nll_iwae": 115.07,
        "test/nll_iwae_se": 0.74, "test/kl/z": 16.13, "test/active_units/z": 12.0,
    }  # fmt: skip
    figures = [tmp_path / "samples" / "samples_test.png"]
    text = summary(metrics, 20, {"z": 32}, tmp_path / "test_metrics.json", figures)
    assert text.splitlines() == [
        "Test: -ELBO 119.75 ± 0.76, IWAE (k=20) 115.07 ± 0.74 nats per image",
        "  latent z: KL 16.13 nats, 12 of 32 units active",
        f"Metrics: {tmp_path / 'test_metrics.json'}",
        f"Figure: {figures[0]}",
    ]


def test_test_report_json(tmp_path):
    t = trainer(tmp_path, [TestReport(filename="report.json")], max_epochs=1)
    model, data = tiny_vae(), TinyBinary(n_test=9)
    t.fit(model, datamodule=data)
    (tested,) = t.test(model, datamodule=data)
    report = json.loads((tmp_path / "run" / "version_0" / "report.json").read_text())
    assert report["model"] == "PixelVAE"
    assert report["datamodule"] == "TinyBinary"
    assert report["data"]["n_test"] == 9 and report["data"]["batch_size"] == 16
    assert report["hparams"] == json.loads(json.dumps(dict(model.hparams)))
    assert (
        report["hparams"]["latent_dim"] == 4
        and report["hparams"]["pixelcnn"]["init_args"]["channels"] == 8
    )
    assert report["iwae_k"] == 3
    assert report["n_test_examples"] == 9
    assert report["ckpt_path"] is None  # the in-memory model was tested
    assert report["global_step"] == 2
    assert set(report["metrics"]) == set(tested)
    for key, value in tested.items():
        assert report["metrics"][key] == pytest.approx(value, rel=1e-6)


def test_noise_variation_holds_every_level_but_one(tmp_path):
    """Within a row only the varied level's noise changes; the grids are written per level,
    rows x variations images each, and the per-level reconstruction grids for hierarchies."""
    torch.manual_seed(0)
    model = HierarchicalPixelVAE(
        image_shape=(3, 8, 8), latent_channels=(2, 3), latent_sizes=(4, 1), pixel_widths=(6, 8),
        latent_width=8, blocks=1, embed_dim=2,
        pixelcnn=gated(n_layers=1, channels=6, first_kernel=3, kernel=3),
        n_prior_layers=1, prior_channels=4,
    ).eval()  # fmt: skip
    callback = NoiseVariation(n_rows=2, n_variations=3, n_reconstructions=2)
    for level in ("z2", "z1", "x"):
        noise = callback.varied_noise(model, level)
        for name, value in noise.items():
            rows = value.view(2, 3, -1)
            same_in_row = all(torch.equal(r[0], r[k]) for r in rows for k in range(3))
            assert same_in_row == (name != level), (level, name)
            assert not torch.equal(rows[0, 0], rows[1, 0])  # rows differ from each other

    run = L.Trainer(
        accelerator="cpu", logger=CSVLogger(tmp_path, name="run"), callbacks=[callback],
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    run.test(model, datamodule=TinyColour(n_test=4, batch_size=4))
    samples = tmp_path / "run" / "version_0" / "samples"
    for level in ("z2", "z1", "x"):
        grid = np.asarray(Image.open(samples / f"noise_{level}_test.png"))
        assert grid.shape == (2 * 126, 3 * 126, 3)  # 2 rows x 3 variations of 8x8 at 14x (+14 px)
    for level in ("z1", "z2"):
        grid = np.asarray(Image.open(samples / f"reconstructions_{level}_test.png"))
        assert grid.shape == (2 * 126, 3 * 126, 3)  # original + 2 generations per row
