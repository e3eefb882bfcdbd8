"""The `arvae` command end to end, in subprocesses, as a user runs it (CPU, offline).

Every run writes under pytest's tmp_path (the subprocess's cwd; the CSV logger's `runs/`).
The repository root goes on PYTHONPATH so that `tests.tiny_data` is importable by class path.
"""

import contextlib
import io
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from arvae.cli import cli, main

REPO = Path(__file__).resolve().parents[1]
METRICS = ("test/nelbo", "test/recon", "test/kl/z", "test/nll_iwae")

TINY_MODEL = [
    "--model.class_path", "lightning_modules.PixelVAE",
    "--model.init_args.latent_dim", "4",
    "--model.init_args.pixelcnn.init_args.n_layers", "1",
    "--model.init_args.pixelcnn.init_args.channels", "8",
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

# a DDP run takes 5-20 s; a rank stuck in a collective must fail the test, not stall the suite
DDP_TIMEOUT = 150

# variables of an enclosing distributed job that would change how Lightning launches
FOREIGN_ENV = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE"}


ARVAE = (sys.executable, "-m", "arvae.cli")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of an `arvae` subprocess: this one's, less the variables of an
    enclosing distributed job, with the repository importable and `extra` added."""
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
    return {**env, **extra}


def spawn(
    *args: str, cwd: Path, env: dict[str, str], program: tuple[str, ...] = ARVAE
) -> subprocess.Popen:
    """Start `program *args` (`python -m arvae.cli` unless said otherwise) in cwd, in a
    process group of its own (its DDP ranks join it). Output goes to temporary files, which
    `finish` reads: no pipe can fill up while another process is being waited for."""
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(
        [*program, *args],
        cwd=cwd,
        env=env,
        stdout=out,
        stderr=err,
        text=True,
        start_new_session=True,
    )
    proc.logs = (out, err)
    return proc


def finish(procs: list[subprocess.Popen], timeout: float) -> list[subprocess.CompletedProcess]:
    """Wait for every process of `procs`. When one fails the others are killed (they would
    wait for it in a collective), and past `timeout` all of them are and the test fails: a
    deadlock fails the test instead of hanging it. Then what is left of each process group
    (a DDP rank whose launcher has exited) is killed, before the launcher is reaped: until
    then its zombie keeps the group's id from being reused."""
    deadline, hung = time.monotonic() + timeout, False
    while True:
        status = [_exit_status(p) for p in procs]
        if None not in status or any(status):
            break
        if hung := time.monotonic() > deadline:
            break
        time.sleep(0.1)
    results = []
    for p in procs:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        out, err = (_read_and_close(f) for f in p.logs)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    if hung:
        logs = "\n".join(f"{r.args}:\n{r.stdout}\n{r.stderr[-6000:]}" for r in results)
        pytest.fail(f"ran past {timeout}s (hung?)\n{logs}")
    return results


def _exit_status(proc: subprocess.Popen) -> int | None:
    """None while `proc` runs; then its exit status (or killing signal), without reaping it."""
    info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    return None if info is None else info.si_status


def _read_and_close(file) -> str:
    with file:
        file.seek(0)
        return file.read()


def arvae(*args: str, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    """`python -m arvae.cli *args` in cwd, killed with its DDP ranks past `timeout`."""
    return finish([spawn(*args, cwd=cwd, env=cli_env())], timeout)[0]


def printed_config(*args: str, cwd: Path | None = None) -> dict:
    """The config `arvae *args --print_config` prints, parsed in this process (a quarter of
    a second, where a subprocess spends ~5 s importing); ``cwd`` for relative paths."""
    out, here = io.StringIO(), os.getcwd()
    if str(REPO) not in sys.path:  # class paths such as tests.tiny_data.TinyBinary
        sys.path.insert(0, str(REPO))
    try:
        os.chdir(cwd or here)
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
            cli([*args, "--print_config"])
    finally:
        os.chdir(here)
    assert exit_.value.code in (0, None), out.getvalue()
    return yaml.safe_load(out.getvalue())


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


def test_a_run_too_short_to_validate_tests_its_last_checkpoint(tmp_path):
    """No validation ran, so there is no best checkpoint: --test_after_fit tests last.ckpt
    (the final weights) and the report names it, rather than an unnamed in-memory model."""
    short = ["--trainer.max_steps", "2", "--trainer.limit_val_batches", "0"]
    ok(
        arvae(
            "fit", *TINY_MODEL, *QUIET, *TINY_DATA, *short, "--test_after_fit", "true", cwd=tmp_path
        )
    )
    (run,) = (tmp_path / "runs").glob("*/version_0")
    assert not list(run.glob("checkpoints/best-*.ckpt"))
    report = read_report(run)
    tested = Path(tmp_path, report["ckpt_path"]).resolve()  # (relative to the run's cwd)
    assert tested == (run / "checkpoints" / "last.ckpt").resolve()
    assert report["global_step"] == 2


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


def test_options_given_with_ckpt_path_win_over_the_checkpoints(fitted, tmp_path):
    """`arvae test --ckpt_path X --model.init_args.iwae_k 2` tests with k = 2, not the k = 4
    the checkpoint was trained with (Lightning 2.6 merged the checkpoint's hyper-parameters
    over the command line), and says so; what is given nowhere, the architecture and the
    data included, comes from X, so no config is needed."""
    ckpt = str(fitted / "checkpoints" / "last.ckpt")
    for k, given in (("2", ["--model.init_args.iwae_k", "2"]), ("4", [])):
        name = f"k{k}"
        result = ok(
            arvae(
                "test", "--ckpt_path", ckpt, *given, "--trainer.limit_test_batches", "2",
                *QUIET, "--trainer.logger.init_args.name", name, cwd=tmp_path,
            )
        )  # fmt: skip
        report = read_report(tmp_path / "runs" / name / "version_0")
        assert report["iwae_k"] == int(k), report
        assert report["hparams"]["latent_dim"] == 4  # the checkpoint's, not the default 16
        assert report["datamodule"] == "BinarizedMNIST" and report["data"]["sample"] is True
        assert report["n_test_examples"] == 500  # two batches of the fit's eval batch size
        said = "set these model options, not the checkpoint's (in brackets): iwae_k = 2 (4)"
        assert (said in result.stderr) == bool(given), result.stderr[-3000:]


def test_test_of_a_checkpoint_without_a_config_logs_beside_its_run(fitted, tmp_path):
    run = tmp_path / "runs" / "fit" / "version_3"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(fitted / "checkpoints" / "last.ckpt", run / "checkpoints" / "last.ckpt")
    ckpt = str(run / "checkpoints" / "last.ckpt")
    ok(
        arvae(
            "test", "--ckpt_path", ckpt, "--trainer.limit_test_batches", "1", *QUIET, cwd=tmp_path
        )
    )
    assert read_report(run / "tests" / "version_0")["ckpt_path"] == ckpt
    assert not (tmp_path / "runs" / "lightning_logs").exists()


def test_a_checkpoint_whose_options_do_not_parse_is_named(fitted, tmp_path):
    """A checkpoint saved with an option this version does not know fails with its path."""
    import torch

    ckpt = torch.load(fitted / "checkpoints" / "last.ckpt", weights_only=False)
    ckpt["hyper_parameters"]["retired_option"] = 3
    torch.save(ckpt, tmp_path / "old.ckpt")
    result = arvae("test", "--ckpt_path", str(tmp_path / "old.ckpt"), cwd=tmp_path)
    assert result.returncode != 0
    assert "retired_option" in result.stderr
    assert f"--ckpt_path {tmp_path / 'old.ckpt'}: if the error above" in result.stderr


def test_report_tabulates_a_real_run(fitted, capsys):
    """`arvae report` reads the test_metrics.json that the pipeline really writes."""
    metrics = read_report(fitted)["metrics"]
    main(["report", str(fitted), "--columns", "latent_dim"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3  # header, rule, one run
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    nelbo = f"{metrics['test/nelbo']:.2f} ± {metrics['test/nelbo_se']:.2f}"
    assert cells[1:4] == ["PixelVAE", "4", nelbo]
    assert cells[-2:] == ["4", "1000"]  # k, n_test


def test_quickstart_config_is_valid(tmp_path):
    """`arvae quickstart` is `fit -c <embedded quickstart.yaml>`; its config parses."""
    result = ok(arvae("quickstart", "--print_config", cwd=tmp_path))
    config = yaml.safe_load(result.stdout)
    assert config["model"]["class_path"] == "lightning_modules.PixelVAE"
    assert config["data"]["init_args"]["sample"] is True
    assert config["test_after_fit"] is True


@pytest.mark.parametrize(
    "option", ["--model.init_args.n_pixelcnn_layerz", "--trainer.max_step"], ids=["typo", "prefix"]
)
def test_misspelt_or_abbreviated_option_is_named_in_a_short_error(tmp_path, option):
    """argparse would take a prefix of an option (``--trainer.max_step``) as the option; a
    misspelt key gets one line of usage, then the line that names it, not every option."""
    result = arvae("fit", *SAMPLE_DATA, *TINY_MODEL, option, "3", cwd=tmp_path)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert lines[0] == "usage: arvae fit [-h] [-c CONFIG] [options]", lines[:3]
    assert lines[1].startswith("tip: ") and lines[2].startswith("error: "), lines[:3]
    assert option.rsplit(".", 1)[1] in "\n".join(lines[2:]) and len(lines) < 15
    assert not (tmp_path / "runs").exists()  # rejected before anything ran


def test_a_run_that_fails_to_start_leaves_no_empty_run_directory(tmp_path):
    """Missing data: the error names the files; no version_0 (nor runs/) is left behind."""
    result = arvae(
        "fit", *TINY_MODEL, "--data.class_path", "datamodules.BinarizedMNIST",
        "--data.init_args.root", "absent", "--data.init_args.download", "false", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode != 0 and "binarized_mnist" in result.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "absent").exists()
    assert "Tip:" not in result.stdout + result.stderr  # Lightning's advertising, filtered


def test_help_lists_the_commands_beyond_lightnings(tmp_path):
    help_text = ok(arvae("--help", cwd=tmp_path)).stdout
    for command in ("fit", "test", "arvae quickstart", "arvae sweep", "arvae report"):
        assert command in help_text


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


def test_progress_bar_written_to_a_file_redraws_every_50_batches(tmp_path):
    """stdout is a file here, as in a SLURM or sweep log: the training bar of a 3-batch
    epoch is drawn at its end only, not after each batch; TQDM_MINITERS set by the user
    wins (1: after each batch, which also shows the test can see the difference)."""
    fit = ("fit", *TINY_MODEL, *TINY_DATA, "--trainer.max_epochs", "1",
           "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "0",
           "--samples.every_n_epochs", "0", "--noise_variation.every_n_epochs", "0")  # fmt: skip
    default_env = {k: v for k, v in cli_env().items() if k != "TQDM_MINITERS"}
    runs = []
    for name, env in (("default", default_env), ("user", cli_env(TQDM_MINITERS="1"))):
        (tmp_path / name).mkdir()
        runs.append(spawn(*fit, cwd=tmp_path / name, env=env))
    default, user = (ok(r) for r in finish(runs, timeout=240))
    assert "Epoch 0: 100%" in default.stdout and "1/3" not in default.stdout
    assert "1/3" in user.stdout and "2/3" in user.stdout
