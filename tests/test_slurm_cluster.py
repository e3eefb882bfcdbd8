"""The sbatch templates of experiments/slurm/ on a real SLURM cluster: Debian's slurm-wlm and
munge, one node on this machine (scripts/local_slurm.sh; CI installs and starts it). SLURM's
own `--signal` pre-empts the job, Lightning requeues it, and the requeued job continues the
same run. Skipped where SLURM is not installed; tests/test_slurm.py simulates the same steps."""

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_cli import REPO, cli_env, read_report
from test_resume import RUN, metric_steps

CLUSTER = REPO / "scripts" / "local_slurm.sh"
TEMPLATE = REPO / "experiments" / "slurm" / "single_node.sbatch"
ACTIVE = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING")  # job states before its end


def cluster_is_up() -> bool:
    states = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True)
    return states.returncode == 0 and "idle" in states.stdout.split()


@pytest.fixture(scope="module")
def slurm():
    """A running one-node cluster: the one this machine has, or one started here (as root)."""
    if shutil.which("sbatch") is None:
        pytest.skip("SLURM is not installed (scripts/local_slurm.sh install, as root)")
    if not cluster_is_up():
        if os.geteuid() != 0:
            pytest.skip("no SLURM cluster is up, and starting one needs root")
        started = subprocess.run(["bash", str(CLUSTER), "start"], capture_output=True, text=True)
        assert started.returncode == 0, started.stdout + started.stderr


def job(job_id: str) -> dict[str, str]:
    """`scontrol show job`'s fields (JobState, Restarts, ExitCode, ...) of one job."""
    shown = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, check=True
    )
    return dict(re.findall(r"(\w+)=(\S*)", shown.stdout))


def wait_for(job_id: str, done, timeout: float, log: Path) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while not done(fields := job(job_id)):
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job_id])
            output = log.read_text() if log.exists() else "(no output yet)"
            pytest.fail(f"job {job_id} stuck at {fields}:\n{output[-5000:]}")
        time.sleep(1)
    return fields


def test_slurm_signal_preempts_lightning_requeues_and_the_requeued_job_finishes_the_run(
    slurm, tmp_path
):
    """A 2-minute job with --signal=USR1@60 gets SIGUSR1 30-60 s in, mid-training (its first
    launch sleeps 0.5 s a step): Lightning saves hpc_ckpt_1.ckpt and runs `scontrol requeue`.
    The requeued job (same id, released at once instead of after SLURM's delay, with a
    longer limit) continues the same run directory to the last step and tests."""
    env = cli_env(ARVAE_ACCELERATOR="cpu")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env["PATH"]])
    log = tmp_path / "job.out"
    submitted = subprocess.run(
        [
            "sbatch", "--parsable", "--time=2", "--signal=USR1@60", "--nodes=1",
            "--ntasks-per-node=1", "--cpus-per-task=1", "--gpus-per-node=0",
            f"--output={log}", str(TEMPLATE),
            *RUN, "--trainer.max_steps", "200",
            "--trainer.callbacks+=tests.fault_injection.SlowUntilRequeued",
            "--trainer.callbacks.init_args.seconds", "0.5",
        ],
        cwd=tmp_path, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().split(";")[0]

    requeued = wait_for(
        job_id, lambda j: int(j["Restarts"]) >= 1 and j["JobState"] == "PENDING", 150, log
    )
    assert requeued["JobState"] == "PENDING", requeued
    subprocess.run(
        ["scontrol", "update", f"JobId={job_id}", "StartTime=now", "TimeLimit=10"], check=True
    )
    final = wait_for(job_id, lambda j: j["JobState"] not in ACTIVE, 240, log)
    output = log.read_text()
    assert final["JobState"] == "COMPLETED" and final["ExitCode"] == "0:0", (final, output[-5000:])
    assert int(final["Restarts"]) == 1, final

    run = tmp_path / "runs" / "run" / f"slurm-{job_id}"
    # the newest of hpc_ckpt_1.ckpt and the last.ckpt that SLURM's SIGTERM after the requeue saved
    assert re.search(rf"resuming runs/run/slurm-{job_id} from runs/run/slurm-{job_id}/\S+", output)
    assert sorted(p.name for p in run.parent.iterdir()) == [f"slurm-{job_id}"]
    signalled_at = torch.load(run / "hpc_ckpt_1.ckpt", map_location="cpu", weights_only=False)
    assert 0 < signalled_at["global_step"] < 200, signalled_at["global_step"]
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 200
    assert read_report(run)["n_test_examples"] == 37
    steps = metric_steps(run)  # both launches' rows, in order: the second one did not start over
    assert steps == sorted(steps) and min(steps) < signalled_at["global_step"] and max(steps) >= 199
