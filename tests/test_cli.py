"""The `arvae` command end to end, in subprocesses, as a user runs it (CPU, offline).

Every run writes under pytest's tmp_path (the subprocess's cwd; the CSV logger's `runs/`).
The repository root goes on PYTHONPATH so that `tests.tiny_data` is importable by class path.
"""

import json
import math
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from arvae.cli import main

REPO = Path(__file__).resolve().parents[1]
METRICS = ("test/nelbo", "test/recon", "test/kl/z", "test/nll_iwae")

TINY_MODEL = [
    "--model.class_path", "lightning_modules.PixelVAE",
    "--model.init_args.latent_dim", "4",
    "--model.init_args.n_pixelcnn_layers", "1",
    "--model.init_args.pixelcnn_channels", "8",
    "--model.init_args.iwae_k", "4",
]  # fmt: skip
QUIET = [
    "--seed_everything", "0",
    "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false",
    "--samples.n_samples", "4",
    "--samples.n_reconstructions", "2",
    "--noise_variation.n_rows", "1",
    "--noise_variation.n_variations", "2",
    "--noise_variation.n_reconstructions", "1",
    "--lossy_code.n_originals", "2",
    "--lossy_code.n_decompressions", "2",
]  # fmt: skip
SAMPLE_DATA = [
    "--data.class_path", "datamodules.BinarizedMNIST",
    "--data.init_args.sample", "true",
    "--data.init_args.batch_size", "50",
    "--data.init_args.eval_batch_size", "250",
]  # fmt: skip
# 37 test examples: odd, and not a multiple of the eval batch (6) nor of 2 ranks x 6, so a
# padding sampler would count some twice; with 2 ranks (19 + 18) the ranks even run a
# different number of batches (4 and 3).
TINY_DATA = [
    "--data.class_path", "tests.tiny_data.TinyBinary",
    "--data.init_args.n_test", "37",
    "--data.init_args.eval_batch_size", "6",
]  # fmt: skip

# a DDP run takes ~20 s; a rank stuck in a collective must fail the test, not stall the suite
DDP_TIMEOUT = 150

# variables of an enclosing distributed job that would change how Lightning launches
FOREIGN_ENV = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def arvae(*args: str, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    """`python -m arvae.cli *args` in cwd; its whole process group (DDP ranks included) is
    killed if it runs past `timeout`, so a deadlock fails the test instead of hanging it."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in FOREIGN_ENV and not k.startswith(("SLURM_", "TORCHELASTIC_"))
    }
    env.update(
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
        WANDB_MODE="disabled",
        OMP_NUM_THREADS="1",  # tiny models: threads only add overhead on a busy machine
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
    )
    cmd = [sys.executable, "-m", "arvae.cli", *args]
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"`arvae {' '.join(args)}` ran past {timeout}s (hung?)\n{out}\n{err[-6000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, (
        f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-8000:]}"
    )
    return result


def read_report(run_dir: Path) -> dict:
    path = run_dir / "test_metrics.json"
    assert path.is_file(), f"no test_metrics.json in {run_dir}: {sorted(run_dir.rglob('*'))}"
    return json.loads(path.read_text())


def check_test_metrics(metrics: dict) -> None:
    """The documented test metrics exist, are finite and are consistent with each other."""
    assert set(METRICS) <= set(metrics), metrics
    assert all(math.isfinite(metrics[k]) for k in METRICS), metrics
    # -ELBO is recon + KL (one latent level), both means over the same examples
    assert metrics["test/nelbo"] == pytest.approx(
        metrics["test/recon"] + metrics["test/kl/z"], abs=1e-3
    )
    assert metrics["test/kl/z"] >= 0
    # the importance-weighted bound (k=4) is tighter than the ELBO on average; the tolerance
    # covers the two estimates using different noise draws
    assert metrics["test/nll_iwae"] <= metrics["test/nelbo"] + 0.05, metrics


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> Path:
    """One short `arvae fit --test_after_fit true` on the shipped sample: one epoch of 8
    steps, validated once, so the best checkpoint and last.ckpt hold the same weights. The
    high learning rate moves the model off its uniform start, so that examples differ by
    several nats (a test that counted one twice would show)."""
    cwd = tmp_path_factory.mktemp("fit")
    ok(
        arvae(
            "fit", *TINY_MODEL, *QUIET, *SAMPLE_DATA,
            "--trainer.max_epochs", "1",
            "--model.init_args.lr", "0.003",
            "--trainer.limit_train_batches", "8",
            "--trainer.limit_val_batches", "1",
            "--trainer.logger.init_args.name", "fit",
            "--test_after_fit", "true",
            cwd=cwd,
        )
    )  # fmt: skip
    return cwd / "runs" / "fit" / "version_0"


def test_fit_writes_checkpoints_and_tests_after_fit(fitted):
    ckpts = fitted / "checkpoints"
    assert (ckpts / "last.ckpt").is_file()
    assert len(list(ckpts.glob("best-*.ckpt"))) == 1
    assert (fitted / "config.yaml").is_file()
    # --test_after_fit: the same call tested the best checkpoint on the full sample test set
    report = read_report(fitted)
    assert Path(report["ckpt_path"]).name.startswith("best-")
    assert report["model"] == "PixelVAE"
    assert report["datamodule"] == "BinarizedMNIST" and report["data"]["sample"] is True
    assert report["n_test_examples"] == 1000
    assert report["iwae_k"] == 4
    check_test_metrics(report["metrics"])
    # the default callbacks ran too
    samples = {p.name for p in (fitted / "samples").iterdir()}
    assert {"samples_epoch0000.png", "samples_test.png", "reconstructions_test.png"} <= samples
    rows = (fitted / "kl_breakdown.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["val", "test"]


def test_fit_records_versions_commit_and_command_with_the_checkpoints(fitted):
    from importlib.metadata import version

    import torch

    record = json.loads((fitted / "run_record.json").read_text())
    assert record["packages"]["torch"] == version("torch")
    assert record["packages"]["lightning"] == version("lightning") and record["packages"]["arvae"]
    assert "fit" in record["argv"] and "--test_after_fit" in record["argv"]
    if (REPO / ".git").exists():  # running from a git checkout: its commit is recorded
        assert len(record["git"]["commit"]) == 40 and isinstance(record["git"]["dirty"], bool)
    ckpt = torch.load(fitted / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["arvae_run"] == record


def test_test_from_checkpoint_round_trip(fitted, tmp_path):
    """`arvae test -c <the fit's config.yaml> --ckpt_path last.ckpt` reproduces the numbers
    of the test after fit (same weights; per-example evaluation noise, so also with another
    eval batch size)."""
    ok(
        arvae(
            "test", "-c", str(fitted / "config.yaml"),
            "--ckpt_path", str(fitted / "checkpoints" / "last.ckpt"),
            "--data.init_args.eval_batch_size", "100",
            "--trainer.logger.init_args.name", "test",
            cwd=tmp_path,
        )
    )  # fmt: skip
    report = read_report(tmp_path / "runs" / "test" / "version_0")
    assert Path(report["ckpt_path"]).name == "last.ckpt"
    assert report["n_test_examples"] == 1000
    check_test_metrics(report["metrics"])
    after_fit = read_report(fitted)["metrics"]
    for key in METRICS:
        assert report["metrics"][key] == pytest.approx(after_fit[key], rel=1e-5), key


def test_report_tabulates_a_real_run(fitted, capsys):
    """`arvae report` reads the test_metrics.json that the pipeline really writes."""
    metrics = read_report(fitted)["metrics"]
    main(["report", str(fitted), "--columns", "latent_dim"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3  # header, rule, one run
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert cells[1:4] == ["PixelVAE", "4", f"{metrics['test/nelbo']:.2f}"]
    assert cells[-2:] == ["4", "1000"]  # k, n_test


def test_ddp_test_matches_single_process(fitted, tmp_path):
    """Testing on 2 CPU ranks (gloo) gives the single-process numbers: every example is
    counted exactly once and its evaluation noise does not depend on the rank. The model's
    options come from the checkpoint (only its class is given)."""
    ckpt = str(fitted / "checkpoints" / "last.ckpt")
    model = ["--model", "lightning_modules.PixelVAE"]
    common = ["test", *model, *QUIET, *TINY_DATA, "--ckpt_path", ckpt]
    ok(arvae(*common, "--trainer.logger.init_args.name", "one", cwd=tmp_path))
    ok(
        arvae(
            *common,
            "--trainer.logger.init_args.name", "ddp",
            "--trainer.accelerator", "cpu",
            "--trainer.devices", "2",
            "--trainer.strategy", "ddp",
            cwd=tmp_path,
            timeout=DDP_TIMEOUT,
        )
    )  # fmt: skip
    one = read_report(tmp_path / "runs" / "one" / "version_0")
    ddp = read_report(tmp_path / "runs" / "ddp" / "version_0")
    assert one["n_test_examples"] == ddp["n_test_examples"] == 37
    assert one["hparams"]["latent_dim"] == 4 and one["hparams"]["pixelcnn_channels"] == 8
    assert set(METRICS) <= set(one["metrics"]) and set(one["metrics"]) == set(ddp["metrics"])
    # rel 1e-6: float noise is ~1e-7 here, while counting one example twice moves the mean by
    # (x_dup - mean) / 38, a few 1e-5 for this model: 1e-5 would let that through narrowly
    for key, value in one["metrics"].items():
        assert ddp["metrics"][key] == pytest.approx(value, rel=1e-6), key


def test_ddp_fit_validates_checkpoints_and_tests(tmp_path):
    """`fit` on 2 CPU ranks with the default callbacks: every parameter of the (gated,
    conditioned) model gets a gradient on every rank, and the callbacks that write files on
    rank zero do not leave the other rank behind in a collective."""
    ok(
        arvae(
            "fit", *TINY_MODEL, *QUIET, *TINY_DATA,
            "--trainer.max_epochs", "1",
            "--trainer.limit_val_batches", "1",
            "--trainer.accelerator", "cpu",
            "--trainer.devices", "2",
            "--trainer.strategy", "ddp",
            "--trainer.logger.init_args.name", "ddp",
            "--test_after_fit", "true",
            cwd=tmp_path,
            timeout=DDP_TIMEOUT,
        )
    )  # fmt: skip
    run = tmp_path / "runs" / "ddp" / "version_0"
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / "samples" / "samples_epoch0000.png").is_file()
    rows = (run / "kl_breakdown.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["val", "test"]
    report = read_report(run)
    assert report["n_test_examples"] == 37
    assert set(METRICS) <= set(report["metrics"])


HIERARCHICAL = [
    "--model.class_path", "lightning_modules.HierarchicalPixelVAE",
    "--model.init_args.latent_channels", "[2, 3]",
    "--model.init_args.latent_sizes", "[4, 1]",
    "--model.init_args.pixel_widths", "[6, 8]",
    "--model.init_args.latent_width", "8",
    "--model.init_args.blocks", "1",
    "--model.init_args.embed_dim", "2",
    "--model.init_args.n_pixelcnn_layers", "2",
    "--model.init_args.pixelcnn_channels", "6",
    "--model.init_args.n_prior_layers", "2",
    "--model.init_args.prior_channels", "4",
    "--model.init_args.iwae_k", "4",
    "--data.class_path", "tests.tiny_data.TinyColour",
]  # fmt: skip


def test_hierarchical_fit_test_and_ddp_on_8bit_images(tmp_path):
    """The 8-bit path end to end: fit and test the two-level PixelVAE on real colour crops;
    bits/dim agree with nats; the per-level noise and reconstruction grids are written; and
    testing on 2 gloo ranks gives the single-process numbers."""
    ok(
        arvae(
            "fit", *HIERARCHICAL, *QUIET,
            "--trainer.max_epochs", "1",
            "--trainer.limit_val_batches", "1",
            "--trainer.logger.init_args.name", "fit",
            "--test_after_fit", "true",
            cwd=tmp_path,
        )
    )  # fmt: skip
    run = tmp_path / "runs" / "fit" / "version_0"
    report = read_report(run)
    assert report["hparams"]["data_kind"] == "8bit" and report["n_test_examples"] == 13
    m = report["metrics"]
    dims_ln2 = 3 * 8 * 8 * math.log(2)
    assert m["test/bpd"] == pytest.approx(m["test/nelbo"] / dims_ln2, rel=1e-5)
    assert m["test/bpd_iwae"] == pytest.approx(m["test/nll_iwae"] / dims_ln2, rel=1e-5)
    assert m["test/nelbo"] == pytest.approx(
        m["test/recon"] + m["test/kl/z1"] + m["test/kl/z2"], abs=1e-3
    )
    samples = {p.name for p in (run / "samples").iterdir()}
    assert {f"noise_{level}_test.png" for level in ("z2", "z1", "x")} <= samples
    assert {"reconstructions_z1_test.png", "reconstructions_z2_test.png"} <= samples

    ckpt = str(run / "checkpoints" / "last.ckpt")
    common = ["test", "--model", "lightning_modules.HierarchicalPixelVAE", *QUIET]
    common += ["--data", "tests.tiny_data.TinyColour", "--data.init_args.eval_batch_size", "3"]
    common += ["--ckpt_path", ckpt]
    ok(arvae(*common, "--trainer.logger.init_args.name", "one", cwd=tmp_path))
    ok(
        arvae(
            *common,
            "--trainer.logger.init_args.name", "ddp",
            "--trainer.accelerator", "cpu",
            "--trainer.devices", "2",
            "--trainer.strategy", "ddp",
            cwd=tmp_path,
            timeout=DDP_TIMEOUT,
        )
    )  # fmt: skip
    one = read_report(tmp_path / "runs" / "one" / "version_0")["metrics"]
    ddp = read_report(tmp_path / "runs" / "ddp" / "version_0")["metrics"]
    assert set(one) == set(ddp) and "test/bpd_iwae" in one
    for key, value in one.items():
        assert ddp[key] == pytest.approx(value, rel=1e-6), key


def test_quickstart_config_is_valid(tmp_path):
    """`arvae quickstart` is `fit -c <embedded quickstart.yaml>`; its config parses."""
    result = ok(arvae("quickstart", "--print_config", cwd=tmp_path))
    config = yaml.safe_load(result.stdout)
    assert config["model"]["class_path"] == "lightning_modules.PixelVAE"
    assert config["data"]["init_args"]["sample"] is True
    assert config["test_after_fit"] is True


def test_misspelt_option_on_the_command_line_is_named(tmp_path):
    result = arvae(
        "fit", *SAMPLE_DATA, *TINY_MODEL, "--model.init_args.n_pixelcnn_layerz", "3", cwd=tmp_path
    )
    assert result.returncode != 0
    assert "n_pixelcnn_layerz" in result.stderr
    assert not (tmp_path / "runs").exists()  # rejected before anything ran


@pytest.mark.parametrize(
    "config, bad_key",
    [
        (
            {
                "model": {
                    "class_path": "lightning_modules.PixelVAE",
                    "init_args": {"latent_dim": 4, "n_pixelcnn_layerz": 1},
                },
                "data": {"class_path": "tests.tiny_data.TinyBinary"},
            },
            "n_pixelcnn_layerz",
        ),
        (
            {
                "trainer": {"max_epoch": 1},
                "model": {"class_path": "lightning_modules.PixelVAE"},
                "data": {"class_path": "tests.tiny_data.TinyBinary"},
            },
            "max_epoch",
        ),
    ],
    ids=["model-init-arg", "trainer-option"],
)
def test_misspelt_key_in_a_config_file_is_named(tmp_path, config, bad_key):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    result = arvae("fit", "-c", str(path), cwd=tmp_path)
    assert result.returncode != 0
    assert bad_key in result.stderr
    assert not (tmp_path / "runs").exists()


def test_data_that_disagrees_with_its_declared_shape_fails_clearly(tmp_path):
    """The CLI links data.data_shape into the model; a datamodule that declares (2, 28, 28)
    but yields (1, 28, 28) images is stopped by the model's input check, not broadcast."""
    result = arvae(
        "fit", *TINY_MODEL, *QUIET,
        "--data.class_path", "tests.tiny_data.MisdeclaredBinary",
        "--trainer.max_steps", "1",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode != 0
    assert "ValueError: PixelVAE expects images shaped (B, 2, 28, 28)" in result.stderr
    assert "got (16, 1, 28, 28)" in result.stderr


def test_vlae_fit_and_test_with_the_paper_config(tmp_path):
    """VLAE through the paper's config (Polyak averaging, free bits per data dim, Adamax),
    shrunk to a tiny model and tiny data: metrics, samples and the lossy-code figure."""
    common = str(REPO / "experiments" / "vlae" / "_common.yaml")
    ok(
        arvae(
            "fit", "-c", common, *QUIET, *TINY_DATA,
            "--model.init_args.width", "8",
            "--model.init_args.blocks", "1",
            "--model.init_args.flow_hidden", "80",
            "--model.init_args.iwae_k", "4",
            "--trainer.max_steps", "6",
            "--trainer.check_val_every_n_epoch", "1",
            "--trainer.limit_val_batches", "1",
            "--trainer.logger.init_args.name", "vlae",
            "--samples.every_n_epochs", "0",
            "--lossy_code.every_n_epochs", "0",
            cwd=tmp_path,
        )
    )  # fmt: skip
    run = tmp_path / "runs" / "vlae" / "version_0"
    report = read_report(run)
    assert report["n_test_examples"] == 37
    m = report["metrics"]
    check_test_metrics(m)
    assert m["test/kl_bits/z"] == pytest.approx(m["test/kl/z"] / math.log(2), rel=1e-5)
    samples = {p.name for p in (run / "samples").iterdir()}
    assert {"samples_test.png", "decompressions_test.png"} <= samples
