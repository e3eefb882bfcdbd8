"""DDP on CPU (gloo ranks, subprocesses), and seeded deterministic runs.

Every model is fitted once on 2 ranks with every callback drawing at every validation epoch
(module fixture `fits`); the best checkpoint of that fit is then tested in one process, on 2
ranks, and (PixelVAE) on two one-rank "nodes" started apart from each other. DDP must give
the numbers of one process: each test example is evaluated once, on one rank, with noise
seeded by its index. A rank stuck in a collective fails the test after DDP_TIMEOUT.
"""

import csv
import math
from pathlib import Path
from typing import NamedTuple

import lightning as L
import pytest
import torch
from decoders import gated
from lightning.pytorch.loggers import CSVLogger
from test_cli import (
    DDP_TIMEOUT,
    QUIET,
    REPO,
    TINY_DATA,
    TINY_MODEL,
    arvae,
    cli_env,
    finish,
    free_port,
    ok,
    read_report,
    spawn,
)
from tiny_data import TinyBinary

from callbacks import NoiseVariation, SampleGrid
from lightning_modules import PixelVAE

DDP = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]
RUN = Path("runs", "ddp", "version_0")  # the DDP fit's run directory, in its cwd


class Model(NamedTuple):
    fit: list[str]  # the model's options for `fit`, data included
    data: list[str]  # the data options (for `test`, which takes the model from the checkpoint)
    figures: list[str]  # the grids the callbacks draw for it, at each validation epoch and test


# 13 test examples (7 + 6 on 2 ranks, in batches of 3): as TINY_DATA, a padding sampler or
# a rank-dependent noise would show
COLOUR_DATA = ["--data.class_path", "tests.tiny_data.TinyColour"]
COLOUR_DATA += ["--data.init_args.eval_batch_size", "3"]
MODELS = {
    "PixelCNN": Model(
        [
            "--model.class_path", "lightning_modules.PixelCNN",
            "--model.init_args.pixelcnn.init_args.n_layers", "2",
            "--model.init_args.pixelcnn.init_args.channels", "8",
            *TINY_DATA,
        ],
        TINY_DATA,
        ["samples", "noise_x"],
    ),
    # PixelCNN++: its data-dependent init on the first batch (broadcast by DDP), the
    # logistic mixture, bits/dim
    "PixelCNNpp": Model(
        [
            "--model.class_path", "lightning_modules.PixelCNNpp",
            "--model.init_args.pixelcnn.init_args.nr_resnet", "1",
            "--model.init_args.pixelcnn.init_args.channels", "8",
            "--model.init_args.pixelcnn.init_args.dropout", "0.0",
            "--model.init_args.likelihood", "DiscretizedLogisticMixture",
            "--model.init_args.likelihood.n_mix", "2",
            *COLOUR_DATA,
        ],
        COLOUR_DATA,
        ["samples", "noise_x"],
    ),
    # a latent size that is no multiple of 16 and chunks of 1 to 10 importance samples, so
    # that the samples' noise would follow the batch size if it were drawn chunk by chunk
    "PixelVAE": Model(
        [
            *TINY_MODEL,
            "--model.init_args.latent_dim", "5",
            "--model.init_args.iwae_k", "7",
            "--model.init_args.iwae_batch", "10",
            *TINY_DATA,
        ],
        TINY_DATA,
        ["samples", "reconstructions", "noise_z", "noise_x"],
    ),
    "HierarchicalPixelVAE": Model(
        [
            "--model.class_path", "lightning_modules.HierarchicalPixelVAE",
            "--model.init_args.latent_channels", "[2, 3]",
            "--model.init_args.latent_sizes", "[4, 1]",
            "--model.init_args.pixel_widths", "[6, 8]",
            "--model.init_args.latent_width", "8",
            "--model.init_args.blocks", "1",
            "--model.init_args.embed_dim", "2",
            "--model.init_args.pixelcnn.init_args.n_layers", "2",
            "--model.init_args.pixelcnn.init_args.channels", "6",
            "--model.init_args.pixelcnn.init_args.first_kernel", "3",
            "--model.init_args.pixelcnn.init_args.kernel", "3",
            "--model.init_args.n_prior_layers", "2",
            "--model.init_args.prior_channels", "4",
            "--model.init_args.iwae_k", "4",
            *COLOUR_DATA,
        ],
        COLOUR_DATA,
        ["samples", "reconstructions", "noise_z2", "noise_z1", "noise_x"]
        + ["reconstructions_z1", "reconstructions_z2"],
    ),
    # the paper's config (data-dependent init on the first batch, which DDP broadcasts;
    # Polyak averaging; free bits) shrunk: the checkpoint must come from a fit
    "VLAE": Model(
        [
            "-c", str(REPO / "experiments" / "vlae" / "_common.yaml"),
            "--model.init_args.width", "8",
            "--model.init_args.blocks", "1",
            "--model.init_args.flow_hidden", "80",
            "--model.init_args.iwae_k", "4",
            "--trainer.check_val_every_n_epoch", "1",
            *TINY_DATA,
        ],
        TINY_DATA,
        ["samples", "reconstructions", "noise_z", "noise_x", "decompressions"],
    ),
}  # fmt: skip
EVERY_EPOCH = [
    "--samples.every_n_epochs", "1",
    "--noise_variation.every_n_epochs", "1",
    "--lossy_code.every_n_epochs", "1",
]  # fmt: skip
EPOCHS = 2  # of 2 steps each on 2 ranks (the tiny datamodules' default sizes)


class Lazy(dict):
    """A dict that makes a missing value with `make(key)` on first use, and keeps it."""

    def __init__(self, make) -> None:
        super().__init__()
        self.make = make

    def __missing__(self, key):
        self[key] = value = self.make(key)
        return value


@pytest.fixture(scope="module")
def fits(tmp_path_factory) -> Lazy:
    """Model name -> the cwd of its `fit --test_after_fit true` on 2 ranks, with every
    callback drawing at every validation epoch; its run directory is cwd / RUN."""

    def fit(name: str) -> Path:
        cwd = tmp_path_factory.mktemp(name)
        ok(
            arvae(
                # the high learning rate moves the model off its start: examples differ by
                # several nats, so an example counted twice would show
                "fit", *MODELS[name].fit, *QUIET, *EVERY_EPOCH, *DDP,
                "--model.init_args.lr", "0.003",
                "--trainer.max_epochs", str(EPOCHS),
                "--trainer.logger.init_args.name", "ddp",
                "--test_after_fit", "true",
                cwd=cwd,
                timeout=DDP_TIMEOUT,
            )
        )  # fmt: skip
        return cwd

    return Lazy(fit)


def ckpt_test_command(fits: Lazy, name: str) -> list[str]:
    """`arvae test` of the best checkpoint of the DDP fit; the model's options come from the
    checkpoint (only its class is given)."""
    ckpt = fits[name] / read_report(fits[name] / RUN)["ckpt_path"]
    model = ["--model", f"lightning_modules.{name}"]
    return ["test", *model, *QUIET, *MODELS[name].data, "--ckpt_path", str(ckpt)]


@pytest.fixture(scope="module")
def one_process(fits, tmp_path_factory) -> Lazy:
    """Model name -> the report of `ckpt_test_command` run in one process."""

    def test(name: str) -> dict:
        cwd = tmp_path_factory.mktemp(f"{name}-test")
        ok(arvae(*ckpt_test_command(fits, name), "--trainer.logger.init_args.name", "one", cwd=cwd))
        return read_report(cwd / "runs" / "one" / "version_0")

    return Lazy(test)


def assert_same_test(report: dict, reference: dict) -> None:
    """The same model tested on the same examples, each counted once, with the same metrics:
    rel 1e-6, as float noise is ~1e-7 here (an example counted twice would move a mean by
    (x_dup - mean) / (n + 1), and show in n_test_examples)."""
    assert report["n_test_examples"] == reference["n_test_examples"]
    assert report["hparams"] == reference["hparams"]
    assert set(report["metrics"]) == set(reference["metrics"])
    for key, value in reference["metrics"].items():
        assert report["metrics"][key] == pytest.approx(value, rel=1e-6), key


def check_one_process_and_ddp_tests(model: str, ckpt: Path, options: list[str],
                                              cwd: Path) -> dict:  # fmt: skip
    """`arvae test` of a checkpoint of ``model`` (class path) with ``options`` in one process
    and on 2 gloo ranks: the same numbers, each test example once (:func:`assert_same_test`);
    returns the one-process report."""
    command = ["test", "--model", model, *QUIET, *options, "--ckpt_path", str(ckpt)]
    for name, extra in (("one", []), ("ddp", DDP)):
        ok(arvae(*command, *extra, "--trainer.logger.init_args.name", name, cwd=cwd,
                 timeout=DDP_TIMEOUT))  # fmt: skip
    one, ddp = (read_report(cwd / "runs" / n / "version_0") for n in ("one", "ddp"))
    assert_same_test(ddp, one)
    return one


@pytest.mark.parametrize("name", MODELS)
def test_ddp_test_matches_one_process(fits, one_process, name, tmp_path):
    """`arvae test` of one checkpoint on 2 ranks, and the test after the fit on 2 ranks, give
    the numbers of one process: IWAE NLL, every -ELBO term and, on 8-bit data, bits/dim."""
    ok(
        arvae(
            *ckpt_test_command(fits, name), *DDP,
            "--trainer.logger.init_args.name", "ddp",
            cwd=tmp_path,
            timeout=DDP_TIMEOUT,
        )
    )  # fmt: skip
    one = one_process[name]
    colour = name in ("HierarchicalPixelVAE", "PixelCNNpp")  # TinyColour: 13 test images
    assert one["n_test_examples"] == (13 if colour else 37)
    assert "test/nll_iwae" in one["metrics"] and "test/recon" in one["metrics"]
    assert_same_test(read_report(tmp_path / "runs" / "ddp" / "version_0"), one)
    assert_same_test(read_report(fits[name] / RUN), one)


def test_three_ranks_with_another_batch_size_match_one_process(fits, one_process, tmp_path):
    """An odd rank count (37 test examples: 13 + 12 + 12) and test batches of 5 instead of
    6, so that no rank's share nor the batches divide evenly: the numbers of one process."""
    name = "PixelVAE"
    args = [*ckpt_test_command(fits, name), *DDP, "--trainer.devices", "3"]
    args += ["--data.init_args.eval_batch_size", "5", "--trainer.logger.init_args.name", "three"]
    ok(arvae(*args, cwd=tmp_path, timeout=DDP_TIMEOUT))
    report = read_report(tmp_path / "runs" / "three" / "version_0")
    assert report["world_size"] == 3 and one_process[name]["world_size"] == 1
    assert_same_test(report, one_process[name])


def test_two_nodes_match_one_process(fits, one_process, tmp_path):
    """`--trainer.num_nodes 2 --trainer.devices 1`: one process per "node", started apart as
    a cluster's launcher would. Lightning's default environment then reads MASTER_ADDR,
    MASTER_PORT, NODE_RANK and LOCAL_RANK (whose presence says that the processes are started
    externally) and makes the ranks from them. The numbers are those of one process, and
    only node 0 writes files: each node runs in a directory of its own (no shared disk)."""
    name = "PixelVAE"
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    port = str(free_port())
    procs = []
    for node_rank, cwd in enumerate(nodes):
        cwd.mkdir()
        env = cli_env(MASTER_PORT=port, NODE_RANK=str(node_rank), LOCAL_RANK="0", WORLD_SIZE="2")
        args = [*ckpt_test_command(fits, name), "--trainer.logger.init_args.name", "nodes"]
        args += ["--trainer.num_nodes", "2", "--trainer.devices", "1"]
        args += ["--trainer.strategy", "ddp", "--trainer.accelerator", "cpu"]
        procs.append(spawn(*args, cwd=cwd, env=env))
    for result in finish(procs, DDP_TIMEOUT):
        ok(result)
    assert_same_test(read_report(nodes[0] / "runs" / "nodes" / "version_0"), one_process[name])
    assert list(nodes[1].iterdir()) == []


@pytest.mark.parametrize("name", MODELS)
def test_ddp_fit_writes_every_file_once(fits, one_process, name):
    """A 2-rank fit with every callback on writes one run directory (no version_1 from rank
    1), holding each expected file; the KL breakdown has one row per validation epoch and
    one for the test, equal to the metrics logged for them, all reduced over the ranks (the
    test row is the one-process test)."""
    folder = fits[name]
    for part in RUN.parts:  # nothing beside runs/ddp/version_0 on the way down
        assert [p.name for p in folder.iterdir()] == [part]
        folder = folder / part
    run = fits[name] / RUN
    files = {p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file()}
    ckpts = {f for f in files if f.startswith("checkpoints/")}
    assert "checkpoints/last.ckpt" in ckpts and len(ckpts) == 2  # and the best one
    tags = [f"epoch{epoch:04d}" for epoch in range(EPOCHS)] + ["test"]
    figures = {f"samples/{fig}_{tag}.png" for fig in MODELS[name].figures for tag in tags}
    logs = {"config.yaml", "hparams.yaml", "metrics.csv", "run_record.json"}
    assert files - ckpts == figures | logs | {"kl_breakdown.csv", "test_metrics.json"}

    with (run / "kl_breakdown.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["stage"], int(r["epoch"])) for r in rows] == [
        *(("val", epoch) for epoch in range(EPOCHS)),
        ("test", EPOCHS),
    ]
    with (run / "metrics.csv").open() as f:
        logged = list(csv.DictReader(f))
    for stage in ("val", "test"):
        stage_rows = [r for r in rows if r["stage"] == stage]
        stage_logged = [m for m in logged if m[f"{stage}/nelbo"]]
        assert len(stage_rows) == len(stage_logged)
        for row, metrics in zip(stage_rows, stage_logged, strict=True):
            terms = {k: v for k, v in row.items() if k not in ("stage", "epoch") and v}
            assert {"nelbo", "recon"} <= set(terms)
            for key, value in terms.items():
                assert float(value) == float(metrics[f"{stage}/{key}"]), (stage, key)
    reference = one_process[name]["metrics"]
    for key, value in rows[-1].items():
        if key not in ("stage", "epoch"):
            assert float(value) == pytest.approx(reference[f"test/{key}"], rel=1e-6), key


def test_ddp_fit_on_8bit_images_reports_bits_per_dim(fits):
    """The 8-bit path end to end: bits/dim agree with nats, and the -ELBO adds up over the
    hierarchy's levels."""
    report = read_report(fits["HierarchicalPixelVAE"] / RUN)
    assert report["hparams"]["data_kind"] == "8bit"
    m = report["metrics"]
    dims_ln2 = 3 * 8 * 8 * math.log(2)
    assert m["test/bpd"] == pytest.approx(m["test/nelbo"] / dims_ln2, rel=1e-5)
    assert m["test/bpd_iwae"] == pytest.approx(m["test/nll_iwae"] / dims_ln2, rel=1e-5)
    assert m["test/nelbo"] == pytest.approx(
        m["test/recon"] + m["test/kl/z1"] + m["test/kl/z2"], abs=1e-3
    )


# ------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("name", ["HierarchicalPixelVAE", "VLAE"])
def test_seeded_deterministic_fits_repeat_bit_for_bit(name, tmp_path):
    """Two `fit --seed_everything 0 --trainer.deterministic true` runs of the same command
    (at the same time) give bit-identical test metrics and checkpoint weights."""
    fit = ["fit", *MODELS[name].fit, *QUIET, "--trainer.deterministic", "true"]
    fit += ["--trainer.max_steps", "3", "--trainer.limit_val_batches", "1"]
    fit += ["--test_after_fit", "true"]
    runs = ["a", "b"]
    procs = [
        spawn(*fit, "--trainer.logger.init_args.name", run, cwd=tmp_path, env=cli_env())
        for run in runs
    ]
    for result in finish(procs, timeout=240):
        ok(result)
    a, b = (tmp_path / "runs" / run / "version_0" for run in runs)
    assert read_report(a)["metrics"] == read_report(b)["metrics"]
    weights = [
        torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
        for run in (a, b)
    ]
    assert weights[0].keys() == weights[1].keys()
    for key, value in weights[0].items():
        assert torch.equal(value, weights[1][key]), key


@pytest.fixture
def one_thread():
    """Tiny models in this process: a second thread only adds overhead, and on a busy machine
    a waiting thread slows every operation down many times."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
def test_figures_do_not_change_the_training(tmp_path):
    """Sample grids drawn between epochs (under DDP by rank zero only) leave the training's
    random numbers alone: the weights after two epochs are the same without them."""
    grids = [SampleGrid(n_samples=2, n_reconstructions=1)]
    grids += [NoiseVariation(every_n_epochs=1, n_rows=1, n_variations=2)]
    weights = []
    for figures in ([], grids):
        L.seed_everything(0, verbose=False)
        model = PixelVAE(latent_dim=4, pixelcnn=gated(n_layers=1, channels=8), iwae_k=2)
        trainer = L.Trainer(
            accelerator="cpu",
            max_epochs=2,
            limit_train_batches=2,
            limit_val_batches=1,
            callbacks=figures,
            logger=CSVLogger(tmp_path),
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(model, datamodule=TinyBinary())
        weights.append(model.state_dict())
    for key, value in weights[0].items():
        assert torch.equal(value, weights[1][key]), key
