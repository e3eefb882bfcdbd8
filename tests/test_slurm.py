"""The sbatch templates of experiments/slurm/, run on this machine under a simulated SLURM:
the job's environment variables, an `srun` that runs its command, and an `scontrol` that
records the requeue request and then kills the job, as SLURM does."""

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_cli import REPO, cli_env, finish, printed_config, read_report, spawn
from test_resume import RUN, metric_steps

TEMPLATES = REPO / "experiments" / "slurm"


def fake_slurm_tools(folder: Path) -> Path:
    """`srun` runs its command (one task here: the job's variables say which); `scontrol`
    records its arguments, then kills its caller, the training process, as a requeue does."""
    bin_dir = folder / "bin"
    bin_dir.mkdir(exist_ok=True)
    tools = {
        "srun": 'exec "$@"\n',
        "scontrol": f'echo "$@" >> {folder / "scontrol.log"}\nkill -KILL $PPID\n',
    }
    for name, body in tools.items():
        script = bin_dir / name
        script.write_text("#!/bin/sh\n" + body)
        script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return bin_dir


def job_env(folder: Path, nodes: int = 1, node: int = 0, restart: int = 0) -> dict[str, str]:
    """What SLURM tells task `node` of a batch job of one task per node (job 4242)."""
    env = cli_env(
        SLURM_JOB_ID="4242",
        SLURM_JOB_NAME="arvae",
        SLURM_SUBMIT_DIR=str(folder),
        SLURM_NNODES=str(nodes),
        SLURM_NTASKS=str(nodes),
        SLURM_NTASKS_PER_NODE="1",
        SLURM_NODELIST="localhost",
        SLURM_PROCID=str(node),
        SLURM_NODEID=str(node),
        SLURM_LOCALID="0",
        SLURM_RESTART_COUNT=str(restart),
        ARVAE_ACCELERATOR="cpu",
    )
    # the fake tools first, then the Python environment's `arvae` script
    path = [str(fake_slurm_tools(folder)), str(Path(sys.executable).parent), env["PATH"]]
    env["PATH"] = os.pathsep.join(path)
    return env


def sbatch(template: str, *args: str, cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    """Run a template as the batch script of the job described by `env` (for `finish`)."""
    return spawn(*args, cwd=cwd, env=env, program=("bash", str(TEMPLATES / template)))


def srun_command(template: str) -> list[str]:
    """The `arvae fit` arguments a template passes after the user's, variables filled in."""
    text = (TEMPLATES / template).read_text()
    line = re.search(r"srun arvae fit \"\$@\"(.*?)\n\n?$", text, re.S).group(1)
    words = line.replace("\\\n", " ").split()
    values = {"${ARVAE_ACCELERATOR:-gpu}": "cpu", "${SLURM_NTASKS_PER_NODE}": "1"}
    values["${SLURM_NNODES}"] = "1"
    return [values.get(w.strip('"'), w.strip('"')) for w in words]


@pytest.mark.parametrize("template", ["single_node.sbatch", "multi_node.sbatch"])
def test_templates_request_the_signal_and_requeue_and_parse_with_the_cli(template, tmp_path):
    text = (TEMPLATES / template).read_text()
    assert re.search(r"^#SBATCH --signal=USR1@\d+$", text, re.M)
    assert re.search(r"^#SBATCH --requeue$", text, re.M)
    args = srun_command(template)
    assert args[-2:] == ["--ckpt_path", "last"]
    config = printed_config("fit", *RUN, *args, cwd=tmp_path)
    assert config["trainer"]["strategy"] == "ddp" and config["trainer"]["accelerator"] == "cpu"
    assert config["ckpt_path"] == "last"


def test_preemption_checkpoints_requeues_and_the_requeued_job_continues_the_run(tmp_path):
    """SIGUSR1 (--signal=USR1@120) arrives at step 5: Lightning saves hpc_ckpt_1.ckpt in the
    run directory slurm-4242 and asks `scontrol requeue 4242`, which ends the job. The requeued
    job (same id, same script) continues the same run from step 5 to the end."""
    args = [
        *RUN, "--trainer.callbacks+=tests.fault_injection.SignalAtStep",
        "--trainer.callbacks.init_args.step", "5",
    ]  # fmt: skip
    first = sbatch("single_node.sbatch", *args, cwd=tmp_path, env=job_env(tmp_path))
    (result,) = finish([first], timeout=240)
    log = result.stdout + result.stderr
    assert result.returncode != 0, log[-3000:]
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"], log[-3000:]
    run = tmp_path / "runs" / "run" / "slurm-4242"
    hpc = torch.load(run / "hpc_ckpt_1.ckpt", map_location="cpu", weights_only=False)
    assert hpc["global_step"] == 5

    again = sbatch("single_node.sbatch", *args, cwd=tmp_path, env=job_env(tmp_path, restart=1))
    (result,) = finish([again], timeout=240)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-5000:]
    assert "resuming runs/run/slurm-4242 from runs/run/slurm-4242/hpc_ckpt_1.ckpt" in log, log
    assert sorted(p.name for p in run.parent.iterdir()) == ["slurm-4242"]
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 10
    assert read_report(run)["n_test_examples"] == 37
    steps = metric_steps(run)
    assert min(steps) < 5 and max(steps) >= 9


def test_multi_node_template_runs_one_ddp_job_over_two_simulated_nodes(tmp_path):
    """Two tasks of a 2-node job (SLURM_PROCID / SLURM_NODEID 0 and 1 on this machine) form
    one DDP run: one run directory, written by rank 0, world size 2, every test example once."""
    envs = [job_env(tmp_path, nodes=2, node=n) for n in (0, 1)]
    envs[1]["MASTER_PORT"] = envs[0]["MASTER_PORT"]
    args = [*RUN, "--trainer.max_steps", "4"]
    results = finish([sbatch("multi_node.sbatch", *args, cwd=tmp_path, env=e) for e in envs], 240)
    for result in results:
        assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    run = tmp_path / "runs" / "run" / "slurm-4242"
    assert sorted(p.name for p in run.parent.iterdir()) == ["slurm-4242"]
    assert json.loads((run / "run_record.json").read_text())["world_size"] == 2
    assert read_report(run)["n_test_examples"] == 37
