"""Runs that are never lost: exact resume after kill -9, atomic checkpoints, and clear errors
for damaged ones. (SLURM pre-emption and requeue: test_slurm.py.)"""

import csv
import json
import os
import signal
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from jsonargparse import Namespace
from test_cli import QUIET, REPO, TINY_MODEL, arvae, cli_env, finish, ok, read_report, spawn
from tiny_data import TinyBinary
from torch.utils.data import TensorDataset

from arvae.checkpoint_io import AtomicCheckpointIO, CheckpointError, save_atomically
from arvae.resume import continue_run
from callbacks import RunCheckpoint
from datamodules.base import EpochSampler, ResumableLoader
from lightning_modules import PixelVAE

# 64 training images in batches of 16: 4 steps an epoch; 10 steps cross two epoch ends. No
# validation before step 20, so every checkpoint comes from every_n_train_steps.
RUN = [
    *TINY_MODEL, *QUIET,
    "--data.class_path", "tests.tiny_data.TinyBinary",
    "--data.init_args.n_test", "37",
    "--data.init_args.eval_batch_size", "37",
    "--trainer.max_steps", "10",
    "--trainer.logger.init_args.name", "run",
    "--checkpoint.every_n_train_steps", "3",
    "--trainer.check_val_every_n_epoch", "5",
    "--trainer.log_every_n_steps", "1",
    "--samples.every_n_epochs", "0",
    "--test_after_fit", "true",
]  # fmt: skip


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def metric_steps(run: Path) -> list[int]:
    with open(run / "metrics.csv", newline="") as f:
        return [int(row["step"]) for row in csv.DictReader(f)]


# ----------------------------------------------------------------- the loader's state
def test_resumable_loader_skips_the_consumed_batches_of_the_saved_epoch():
    data = TensorDataset(torch.arange(12))
    done = {"n": 0}

    def loader():
        sampler = EpochSampler(data, num_replicas=1, rank=0, shuffle=True, seed=3)
        return ResumableLoader(data, batch_size=3, sampler=sampler, batches_done=lambda: done["n"])

    full = loader()
    full.sampler.set_epoch(2)
    epoch2 = [b[0].tolist() for b in full]
    done["n"] = 1
    state = {**full.state_dict(), "epoch": 2}
    assert state == {"epoch": 2, "batches_done": 1}

    resumed = loader()
    resumed.load_state_dict(state)
    assert [b[0].tolist() for b in resumed] == epoch2[1:]
    assert [b[0].tolist() for b in resumed] == epoch2  # the skip applies once

    # saved at the end of epoch 2: the resumed loader starts epoch 3, whole
    at_end = loader()
    at_end.load_state_dict({"epoch": 2, "batches_done": 4})
    assert at_end.sampler.epoch == 3
    full.sampler.set_epoch(3)
    assert [b[0].tolist() for b in at_end] == [b[0].tolist() for b in full]


# -------------------------------------------------------------- kill -9, then resume
@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("uninterrupted")
    ok(arvae("fit", *RUN, cwd=cwd))
    return cwd / "runs" / "run" / "version_0"


def test_kill_9_mid_epoch_then_ckpt_path_last_gives_the_uninterrupted_result(
    uninterrupted, tmp_path
):
    """Killed at step 8 (last checkpoint: step 6, mid-epoch), restarted with the same command
    and --ckpt_path last: the run continues in the same directory and ends with the weights
    and test metrics of the run that was never stopped, to the last bit."""
    killed = arvae(
        "fit", *RUN, "--trainer.callbacks+=tests.fault_injection.KillAtStep",
        "--trainer.callbacks.init_args.step", "8", cwd=tmp_path,
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    run = tmp_path / "runs" / "run" / "version_0"
    # the periodic step-6 save, mid-epoch 1, though validation has not run yet
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert (
        last["global_step"] == 6
        and last["loops"]["fit_loop"]["epoch_progress"]["current"]["completed"] == 1
    )
    assert not (run / "test_metrics.json").exists()

    resumed = ok(arvae("fit", *RUN, "--ckpt_path", "last", cwd=tmp_path))
    assert "resuming" in resumed.stderr + resumed.stdout
    assert sorted(p.name for p in (tmp_path / "runs" / "run").iterdir()) == ["version_0"]

    a, b = (
        weights(uninterrupted / "checkpoints" / "last.ckpt"),
        weights(run / "checkpoints" / "last.ckpt"),
    )
    # last.ckpt holds the final weights (step 10), not those of the step-9 periodic save
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 10
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    expected, got = read_report(uninterrupted)["metrics"], read_report(run)["metrics"]
    assert got == expected
    # one metrics file holds the whole run: steps logged before the kill, then after
    steps = metric_steps(run)
    assert min(steps) < 6 and max(steps) >= 9
    # the run record keeps the first attempt's command beside the resumed one's
    record = json.loads((run / "run_record.json").read_text())
    assert "--ckpt_path" in record["argv"]
    (first,) = record["earlier_attempts"]
    assert "--ckpt_path" not in first["argv"]


class LastCheckpointSteps(L.Callback):
    """Before each training step: the step last.ckpt holds, if any."""

    def __init__(self, path: Path) -> None:
        self.path, self.seen = path, []

    def on_train_batch_start(self, trainer, *args) -> None:
        if self.path.is_file():
            saved = torch.load(self.path, map_location="cpu", weights_only=False)["global_step"]
            self.seen.append((trainer.global_step, saved))


@pytest.mark.parametrize(
    "every, schedule",
    [
        (4, dict(check_val_every_n_epoch=1)),  # at each epoch end (4 steps an epoch)
        (2, dict(val_check_interval=2)),  # mid-epoch, every 2 steps
        (8, dict(check_val_every_n_epoch=2)),  # at every other epoch end
    ],
)
def test_last_checkpoint_follows_every_validation_on_a_plateau(tmp_path, every, schedule):
    """With lr 0 the validation -ELBO never improves after the first validation, so upstream
    (which copies last.ckpt only beside a new best) would leave last.ckpt at that first step
    and a crash would lose every step since. It must move to each validation's step."""
    torch.manual_seed(0)
    model = PixelVAE(latent_dim=4, pixelcnn=None, lr=0.0)
    ckpts = tmp_path / "checkpoints"
    checkpoint = RunCheckpoint(dirpath=ckpts, monitor="val/nelbo", save_last=True)
    probe = LastCheckpointSteps(ckpts / "last.ckpt")
    trainer = L.Trainer(
        accelerator="cpu", max_steps=3 * every, logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path,
        callbacks=[checkpoint, probe], **schedule,
    )  # fmt: skip
    trainer.fit(model, datamodule=TinyBinary(n_train=64, n_val=16, batch_size=16))
    assert len(list(ckpts.glob("epoch=*.ckpt"))) == 1  # one best: no later one improved on it
    # from the first validation on, before each step: last.ckpt holds the latest validation's
    assert probe.seen == [(step, step // every * every) for step in range(every, 3 * every)]
    final = torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=False)
    assert final["global_step"] == 3 * every  # and the end of training


def test_last_checkpoint_as_a_link_is_refused(tmp_path):
    """save_last: link would make last.ckpt point at an older best-* file on a plateau."""
    trainer = L.Trainer(
        accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False,
        callbacks=[RunCheckpoint(dirpath=tmp_path, save_last="link")], default_root_dir=tmp_path,
    )  # fmt: skip
    with pytest.raises(ValueError, match="save_last: link .* use save_last: true"):
        trainer.fit(PixelVAE(latent_dim=4, pixelcnn=None), datamodule=TinyBinary())
    assert not list(tmp_path.glob("*.ckpt"))


def test_ckpt_path_last_without_a_checkpoint_starts_the_run(tmp_path):
    """A job script can always pass --ckpt_path last: the first launch simply starts."""
    result = ok(arvae("fit", *RUN, "--trainer.max_steps", "2", "--ckpt_path", "last", cwd=tmp_path))
    assert "no checkpoint" in result.stderr + result.stdout
    assert (tmp_path / "runs" / "run" / "version_0" / "checkpoints" / "last.ckpt").is_file()


# --------------------------------------------------------- which run a fit continues
def fit_config(save_dir: Path, ckpt_path: str | None, wandb: bool = False) -> Namespace:
    csv_logger = Namespace(
        class_path="arvae.loggers.CSVLogger",
        init_args=Namespace(save_dir=str(save_dir), name="run", version=None),
    )
    loggers = [csv_logger]
    if wandb:
        loggers.append(
            Namespace(class_path="lightning.pytorch.loggers.WandbLogger", init_args=Namespace())
        )
    return Namespace(trainer=Namespace(logger=loggers, default_root_dir=None), ckpt_path=ckpt_path)


def touch_checkpoint(path: Path, age: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    os.utime(path, (path.stat().st_atime, path.stat().st_mtime - age))
    return path


def test_ckpt_path_last_picks_the_newest_run_and_its_newest_checkpoint(tmp_path, monkeypatch):
    for name in ("SLURM_NTASKS", "SLURM_JOB_ID", "SLURM_JOB_NAME"):
        monkeypatch.delenv(name, raising=False)
    root = tmp_path / "run"
    touch_checkpoint(root / "version_0" / "checkpoints" / "last.ckpt", age=100)
    newest = touch_checkpoint(root / "version_1" / "hpc_ckpt_2.ckpt", age=5)
    touch_checkpoint(root / "version_1" / "checkpoints" / "last.ckpt", age=50)
    touch_checkpoint(root / "version_1" / "checkpoints" / "best-0001-9.ckpt", age=1)  # not resumed
    (root / "version_2").mkdir()  # started, no checkpoint yet
    (root / "version_1" / "run_record.json").write_text(json.dumps({"wandb_id": "abc123"}))
    config = fit_config(tmp_path, "last", wandb=True)
    continue_run(config)
    assert config.ckpt_path == str(newest)
    csv_logger, wandb_logger = config.trainer.logger
    assert csv_logger.init_args.version == 1
    assert wandb_logger.init_args.id == "abc123" and wandb_logger.init_args.resume == "allow"
    assert config.trainer.default_root_dir is None  # not a SLURM job


def test_a_slurm_job_runs_in_a_directory_named_by_its_job_id(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_JOB_NAME", "arvae")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    config = fit_config(tmp_path, None)
    continue_run(config)
    assert config.trainer.logger[0].init_args.version == "slurm-77"
    assert config.trainer.default_root_dir == str(tmp_path / "run" / "slurm-77")  # hpc_ckpt_*
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "70")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    config = fit_config(tmp_path, "last")
    continue_run(config)  # no checkpoint yet: starts
    assert config.trainer.logger[0].init_args.version == "slurm-70_3"
    assert config.ckpt_path is None
    monkeypatch.setenv("SLURM_JOB_NAME", "bash")  # an interactive allocation is not a job
    config = fit_config(tmp_path, None)
    continue_run(config)
    assert config.trainer.logger[0].init_args.version is None


# ------------------------------------------------------------------ atomic checkpoints
def test_an_interrupted_save_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    save_atomically({"step": 1}, path)

    def crash(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_atomically({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=False) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no partial file left


def test_a_crash_mid_write_leaves_only_a_hidden_partial_file(tmp_path):
    """Even a SIGKILL during the write (no cleanup runs) leaves the target alone: the bytes
    went to a hidden sibling that no checkpoint search matches."""
    path = tmp_path / "last.ckpt"
    save_atomically({"step": 1}, path)
    pid = os.fork()
    if pid == 0:  # child: die in the middle of torch.save

        def die(obj, f):
            f.write(b"half")
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)

        torch.save = die
        save_atomically({"step": 2}, path)
        os._exit(0)
    os.waitpid(pid, 0)
    assert torch.load(path, weights_only=False) == {"step": 1}
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    assert leftovers[0].startswith(".last.ckpt.") and leftovers[1:] == ["last.ckpt"]
    assert not list(tmp_path.glob("*.ckpt"))[0].name.startswith(".")


def flip_a_byte(content: bytes) -> bytes:
    flipped = bytearray(content)
    flipped[len(content) // 2] ^= 0xFF  # inside the tensor data
    return bytes(flipped)


DAMAGE = {
    "truncated": lambda content: content[: len(content) // 2],
    "empty": lambda content: b"",
    "not_a_checkpoint": lambda content: b"x" * 99,
    "one_byte_flipped": flip_a_byte,
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_checkpoint_gives_a_clear_error_naming_it_and_the_alternatives(tmp_path, damage):
    good, bad = tmp_path / "best.ckpt", tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.randn(1000)}}, good)
    bad.write_bytes(DAMAGE[damage](good.read_bytes()))
    with pytest.raises(CheckpointError) as error:
        AtomicCheckpointIO().load_checkpoint(bad)
    message = str(error.value)
    assert str(bad) in message and "truncated or damaged" in message
    assert str(good) in message and "--ckpt_path" in message
    with pytest.raises(FileNotFoundError):
        AtomicCheckpointIO().load_checkpoint(tmp_path / "missing.ckpt")


def test_the_cli_reports_a_truncated_checkpoint(uninterrupted, tmp_path):
    last = uninterrupted / "checkpoints" / "last.ckpt"
    bad = tmp_path / "truncated.ckpt"
    bad.write_bytes(last.read_bytes()[:5000])
    result = arvae("test", *RUN, "--ckpt_path", str(bad), cwd=tmp_path)
    assert result.returncode != 0
    assert "truncated or damaged" in result.stderr and str(bad) in result.stderr


def test_wandb_offline_logs_from_yaml_and_a_resumed_run_continues_the_same_wandb_run(tmp_path):
    """experiments/pixelvae/wandb.yaml adds a WandbLogger beside the CSV one; it works offline,
    its run id is recorded, and `--ckpt_path last` continues that wandb run (same id)."""
    env = cli_env(WANDB_MODE="offline", WANDB_CONFIG_DIR=str(tmp_path / "wandb_config"))
    cmd = [
        "fit", *RUN, "-c", str(REPO / "experiments" / "pixelvae" / "wandb.yaml"),
        "--test_after_fit", "false",
    ]  # fmt: skip
    ok(finish([spawn(*cmd, "--trainer.max_steps", "4", cwd=tmp_path, env=env)], 240)[0])
    run = tmp_path / "runs" / "sweeps" / "version_0"  # wandb.yaml names the CSV run "sweeps"
    wandb_id = json.loads((run / "run_record.json").read_text())["wandb_id"]
    (first,) = (tmp_path / "runs" / "wandb").glob("offline-run-*")
    assert first.name.endswith(wandb_id)

    resume = ["--trainer.max_steps", "6", "--ckpt_path", "last"]
    ok(finish([spawn(*cmd, *resume, cwd=tmp_path, env=env)], timeout=240)[0])
    runs = sorted(p.name for p in (tmp_path / "runs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(name.endswith(wandb_id) for name in runs)
    assert json.loads((run / "run_record.json").read_text())["wandb_id"] == wandb_id


def test_a_sigterm_inside_a_long_test_batch_stops_the_run_within_seconds(tmp_path):
    """A SIGTERM as the one test batch starts, whose bound has k = 100000 importance samples
    in chunks of 37 (~20 minutes on a CPU): the IWAE loop checks for it between chunks, so the
    run stops within seconds through Lightning's stop (exit code 0: SIGTERMException is
    SystemExit), with no test_metrics.json for the unfinished test."""
    ok(arvae("fit", *RUN, "--test_after_fit", "false", cwd=tmp_path))
    (ckpt,) = (tmp_path / "runs" / "run" / "version_0" / "checkpoints").glob("last*.ckpt")
    started = time.monotonic()
    result = arvae(
        "test", "--ckpt_path", str(ckpt), *QUIET,
        "--model.init_args.iwae_k", "100000", "--model.init_args.iwae_batch", "37",
        "--trainer.callbacks+=tests.fault_injection.SigtermAtTestBatch",
        "--trainer.logger.init_args.name", "stopped",
        cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert time.monotonic() - started < 60, "the test batch ran on after the SIGTERM"
    assert "Received SIGTERM" in result.stderr + result.stdout
    assert not list((tmp_path / "runs").rglob("stopped/**/test_metrics.json"))
