"""`arvae sweep`: wandb sweep files run locally. Command lines as a wandb agent builds them,
grid order and seeded random draws, clear errors, every shipped sweep, a real sweep end to
end (single process and DDP), and the DDP ranks' configuration check."""

import itertools
import json
import math
import os
import shlex
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from test_cli import DDP_TIMEOUT, QUIET, REPO, TINY_DATA, TINY_MODEL, arvae, ok, read_report

from arvae import cli, sweep
from arvae.loggers import CSVLogger
from arvae.report import hparam
from callbacks.run_record import check_same_config

ARVAE = [sweep.ENV, sys.executable, "-m", "arvae.cli"]
SHIPPED = {
    "pixelvae_layers": 8,
    "pixelcnn_layers": 10,
    "vlae_receptive_field": 5,
    "pixelvae_table1": 5,
    "agave_lambda": 5,
    "agave_auxiliary_image": 18,  # 6 colour levels x 3 resolutions
}


def write(tmp_path: Path, config: dict, name: str = "sweep.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def dry_run(path: Path, capsys, *args: str) -> list[list[str]]:
    sweep.main([str(path), "--dry-run", *args])
    return [shlex.split(line) for line in capsys.readouterr().out.splitlines()]


def test_grid_is_the_product_in_file_order_last_fastest(tmp_path, capsys):
    path = write(
        tmp_path,
        {
            "program": "arvae",
            "method": "grid",
            "parameters": {
                "a": {"values": [1, 2]},
                "b": {"values": ["x", "y"]},
                "c": {"value": 0.5},
            },
            "command": ["${env}", "arvae", "fit", "-c", "base.yaml", "${args}"],
        },
    )
    lines = dry_run(path, capsys, "--", "--trainer.max_steps", "2")
    combos = [("1", "x"), ("1", "y"), ("2", "x"), ("2", "y")]
    assert lines == [
        [*ARVAE, "fit", "-c", "base.yaml", f"--a={a}", f"--b={b}", "--c=0.5"]
        + ["--trainer.max_steps", "2"]
        for a, b in combos
    ]
    assert dry_run(path, capsys, "--count", "3") == [line[:-2] for line in lines[:3]]


def expand(element: str, params: dict, program: str = "train.py") -> list[str]:
    config = {"program": program, "command": [element]}
    return sweep.command_line(config, params, Path("wandb/sweep-s/config-1.json"))


def test_macros_expand_as_a_wandb_agent_does(monkeypatch):
    monkeypatch.setenv("DATA_ROOT", "/data")
    params = {"lr": 0.001, "on": True, "off": False, "sizes": [1, 2]}
    assert expand("${env}", params) == ["/usr/bin/env"]
    assert expand("${interpreter}", params) == [sys.executable]  # wandb: `python`
    assert expand("${program}", params) == ["train.py"]
    assert expand("${program}", params, program="arvae") == [sys.executable, "-m", "arvae.cli"]
    assert expand("--root=${envvar:DATA_ROOT}/mnist", params) == ["--root=/data/mnist"]
    assert expand("${args}", params) == ["--lr=0.001", "--on=True", "--off=False", "--sizes=[1, 2]"]
    assert expand("${args_no_equals}", params) == [
        "--lr", "0.001", "--on", "True", "--off", "False", "--sizes", "[1, 2]"
    ]  # fmt: skip
    assert expand("${args_no_hyphens}", params) == [
        "lr=0.001",
        "on=True",
        "off=False",
        "sizes=[1, 2]",
    ]
    # booleans: True a bare flag, False nothing
    assert expand("${args_no_boolean_flags}", params) == ["--lr=0.001", "--on", "--sizes=[1, 2]"]
    (as_json,) = expand("${args_json}", params)
    assert json.loads(as_json) == params
    assert expand("${args_json_file}", params) == ["wandb/sweep-s/config-1.json"]
    assert expand("${args_append_hydra}", {"lr": 0.1}) == ["+lr=0.1"]
    assert expand("${args_override_hydra}", {"lr": 0.1}) == ["++lr=0.1"]
    assert expand("fit", params) == ["fit"]  # a plain element stays


def test_random_is_reproducible_within_bounds_and_inferred_like_wandb(tmp_path, capsys):
    parameters = {
        "lr": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-2},
        "width": {"min": 8, "max": 12},  # ints: int_uniform
        "drop": {"min": 0.0, "max": 0.5},  # floats: uniform
        "step": {"distribution": "q_uniform", "min": 0, "max": 10, "q": 2},
        "kind": {"values": ["a", "b"], "probabilities": [0.9, 0.1]},
        "fixed": {"value": 3},
    }
    config = {"method": "random", "parameters": parameters, "command": ["${args_json}"]}
    first = sweep.plan(config, 200, seed=1)
    assert first == sweep.plan(config, 200, seed=1) != sweep.plan(config, 200, seed=2)
    assert all(1e-4 <= run["lr"] <= 1e-2 for run in first)
    assert {run["width"] for run in first} == {8, 9, 10, 11, 12}
    assert all(0 <= run["drop"] <= 0.5 and run["fixed"] == 3 for run in first)
    assert {run["step"] for run in first} == {0, 2, 4, 6, 8, 10}
    assert 150 < sum(run["kind"] == "a" for run in first) < 200
    lrs = [math.log10(run["lr"]) for run in first]  # log-uniform: each decade about half
    assert 70 < sum(lr < -3 for lr in lrs) < 130
    # through the command: `--count` draws, `--seed` picks them
    lines = dry_run(write(tmp_path, config), capsys, "--count", "3", "--seed", "1")
    assert [json.loads(line[0]) for line in lines] == first[:3]


@pytest.mark.parametrize(
    "change, words",
    [
        ({"command": None}, ["`command`", "missing"]),
        ({"parameters": {}}, ["`parameters`", "missing"]),
        ({"command": ["arvae", "${argz}"]}, ["`command[1]`", "unknown macro ${argz}"]),
        ({"command": ["--x=${envvar:ARVAE_UNSET_VAR}"]}, ["`command[0]`", "ARVAE_UNSET_VAR"]),
        ({"method": "bayes"}, ["bayes", "wandb agent", "grid or random"]),
        ({"parameters": {"lr": {"min": 0.1, "max": 1.0}}}, ["`parameters.lr`", "grid needs"]),
        ({"parameters": {"a": {"parameters": {}}}}, ["`parameters.a`", "nested"]),
        ({"method": "random"}, ["random", "--count"]),
        (
            {"method": "random", "run_cap": 2, "parameters": {"lr": {"distribution": "beta"}}},
            ["`parameters.lr`", "'beta' is not supported", "wandb agent"],
        ),
        (
            {"method": "random", "run_cap": 2, "parameters": {"lr": {"distribution": "uniform"}}},
            ["`parameters.lr`", "uniform needs `min`"],
        ),
    ],
    ids=[
        "no-command",
        "no-parameters",
        "unknown-macro",
        "unset-envvar",
        "bayes",
        "grid-distribution",
        "nested",
        "random-no-count",
        "unsupported-distribution",
        "missing-bound",
    ],
)
def test_a_bad_sweep_is_named_with_its_key(tmp_path, capsys, change, words):
    config = {
        "program": "arvae",
        "method": "grid",
        "parameters": {"a": {"values": [1]}},
        "command": ["${env}", "arvae", "fit", "${args}"],
    }
    path = write(tmp_path, {**config, **change}, "bad_sweep.yaml")
    with pytest.raises(SystemExit) as exit_:
        sweep.main([str(path)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert str(path) in err and all(w in err for w in words), err


def job_sweep(tmp_path: Path, monkeypatch, body: str) -> Path:
    """A grid of 3 runs (x = a, bad, c) of a tiny script, run in ``tmp_path``: each reads x
    from its ${args_json_file}, runs ``body`` and fails if x is "bad"."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WANDB_DIR", raising=False)  # the JSON files go to ./wandb/
    (tmp_path / "job.py").write_text(
        "import json, os, pathlib, sys, time\n"
        "x = json.loads(pathlib.Path(sys.argv[1]).read_text())['x']\n"
        f"{body}sys.exit(x == 'bad')\n"
    )
    config = {
        "program": "job.py",
        "method": "grid",
        "parameters": {"x": {"values": ["a", "bad", "c"]}},
        "command": ["${env}", "${interpreter}", "${program}", "${args_json_file}"],
    }
    return write(tmp_path, config, "job.yaml")


def test_a_failed_run_is_reported_and_the_others_still_run(tmp_path, capfd, monkeypatch):
    """The runs are plain subprocesses (here a tiny script reading its ${args_json_file}):
    run 2 fails, run 3 runs anyway, the summary names run 2 and the exit status is 1."""
    path = job_sweep(tmp_path, monkeypatch, "pathlib.Path(f'ran-{x}').touch()\n")
    with pytest.raises(SystemExit) as exit_:
        sweep.main([str(path)])
    assert exit_.value.code == 1
    assert {p.name for p in tmp_path.glob("ran-*")} == {"ran-a", "ran-bad", "ran-c"}
    assert (tmp_path / "wandb" / "sweep-job" / "config-2.json").read_text() == '{"x": "bad"}'
    out = capfd.readouterr().out
    assert "run 2/3 failed (exit code 1)" in out
    assert out.rstrip().endswith("2 of 3 runs succeeded; failed: 2")


def test_parallel_runs_overlap_share_the_gpus_and_write_logs(tmp_path, capfd, monkeypatch):
    """--parallel 3 --gpus 0 1,2: the three runs run at the same time (each waits until all
    have started), the first two entries are taken once and the third run goes to the entry
    with fewer runs, the CPU cores are split between the runs, each run's output is in its
    log, and a failed run's summary quotes it."""
    wait_for_all = (
        "pathlib.Path(f'started-{x}').touch()\n"
        "deadline = time.time() + 60\n"
        "while len(list(pathlib.Path().glob('started-*'))) < 3:\n"
        "    if time.time() > deadline:\n"
        "        sys.exit('the runs did not overlap')\n"
        "    time.sleep(0.02)\n"
        "print(f'{x} on GPU', os.environ['CUDA_VISIBLE_DEVICES'])\n"
        "pathlib.Path(f'threads-{x}').write_text(os.environ['OMP_NUM_THREADS'])\n"
    )
    path = job_sweep(tmp_path, monkeypatch, wait_for_all)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    with pytest.raises(SystemExit) as exit_:
        sweep.main([str(path), "--parallel", "3", "--gpus", "0", "1,2"])
    assert exit_.value.code == 1
    logs = {
        i: (tmp_path / "runs" / "sweep-logs" / "job" / f"run-{i}.log").read_text()
        for i in (1, 2, 3)
    }
    gpus = sorted(log.split("on GPU ")[1].strip() for log in logs.values())
    assert gpus == ["0", "0", "1,2"], logs
    assert logs[2].startswith("bad on GPU")
    threads = str(max(1, len(os.sched_getaffinity(0)) // 3))  # the cores, split 3 ways
    assert {(tmp_path / f"threads-{x}").read_text() for x in ("a", "bad", "c")} == {threads}
    out = capfd.readouterr().out
    assert "run 2/3 failed (exit code 1)\n    bad on GPU" in out
    assert out.count(" finished") == 2
    assert out.rstrip().endswith("2 of 3 runs succeeded; failed: 2")


def test_runs_started_together_claim_distinct_versions(tmp_path, monkeypatch):
    """Lightning lists the existing version directories, so two runs starting at once both
    see version_0 as free (simulated here); ours claims it by creating it, and the second
    run moves on. Non-zero DDP ranks claim nothing (they use rank 0's directory)."""
    monkeypatch.setattr(LightningCSVLogger, "_get_next_version", lambda self: 0)
    first, second = (CSVLogger(tmp_path, name="sweeps") for _ in range(2))
    assert (first.version, second.version) == (0, 1)
    assert sorted(p.name for p in (tmp_path / "sweeps").iterdir()) == ["version_0", "version_1"]
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    assert CSVLogger(tmp_path, name="other").version == 0
    assert not (tmp_path / "other").exists()


def test_every_shipped_sweep_expands_to_runs_that_parse(capsys, monkeypatch):
    """Each shipped sweep's dry run has one command line per point of its grid (the last
    parameter varying fastest), and each parses (in process, `--print_config`) with its
    parameters set to that point's values."""
    assert {p.stem for p in (REPO / "experiments" / "sweeps").glob("*.yaml")} == set(SHIPPED)
    monkeypatch.chdir(REPO)  # the sweeps' config paths are relative to the repository root
    for name, n_runs in SHIPPED.items():
        path = REPO / "experiments" / "sweeps" / f"{name}.yaml"
        params = yaml.safe_load(path.read_text())["parameters"]
        grid = list(itertools.product(*(spec["values"] for spec in params.values())))
        lines = dry_run(path, capsys)
        assert len(lines) == n_runs == len(grid), name
        for line, point in zip(lines, grid, strict=True):
            assert line[: len(ARVAE)] == ARVAE
            assert line[-len(point) :] == [f"--{k}={v}" for k, v in zip(params, point, strict=True)]
            with pytest.raises(SystemExit) as exit_:
                cli.cli([*line[len(ARVAE) :], "--print_config"])
            assert exit_.value.code == 0
            config = yaml.safe_load(capsys.readouterr().out)
            for param, value in zip(params, point, strict=True):
                section, _, key = param.partition(".init_args.")
                if param == "config":  # a config file per run, whose runs are named after it
                    assert config["trainer"]["logger"]["init_args"]["name"] == Path(value).stem
                else:
                    assert hparam(config[section]["init_args"], key) == value, (name, value)


def test_the_table1_sweep_runs_every_table1_row_of_the_ledger():
    """`pixelvae_table1.yaml` runs exactly the ledger's PixelVAE Table 1 configs, so that
    `arvae report --ledger` fills every row from the sweep's runs."""
    ledger = yaml.safe_load((REPO / "experiments" / "ledger.yaml").read_text())
    rows = {t["config"] for t in ledger if t["paper"] == "PixelVAE Table 1"}
    table1 = yaml.safe_load((REPO / "experiments" / "sweeps" / "pixelvae_table1.yaml").read_text())
    files = table1["parameters"]["config"]["values"]
    assert {str(Path(f).relative_to("experiments").with_suffix("")) for f in files} == rows
    assert {t["run"] for t in ledger if t["config"] in rows} == {Path(f).stem for f in files}


def flags(args: list[str]) -> list[str]:
    """`--name value` pairs as the `--name=value` elements of a sweep's command."""
    return [f"{k}={v}" for k, v in zip(args[::2], args[1::2], strict=True)]


def test_sweep_runs_end_to_end_and_its_parameters_reach_every_ddp_rank(tmp_path):
    """A grid over the PixelCNN's n_layers through `arvae sweep --parallel 2`: the two runs share a
    logger name and start together, yet each gets its own version directory, saves its own
    value in config.yaml and tests after fit. Then one run on 2 CPU ranks (DDP flags given after
    `--`): it fits, so the ranks' configuration check passed, and it records world_size 2."""
    config = {
        "program": "arvae",
        "method": "grid",
        "parameters": {"model.init_args.pixelcnn.init_args.n_layers": {"values": [2, 1]}},
        "command": [
            "${env}", "arvae", "fit", *flags(TINY_MODEL), *flags(QUIET), *flags(TINY_DATA),
            "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=1", "--test_after_fit=true", "${args}",
        ],
    }  # fmt: skip
    path = str(write(tmp_path, config))
    name = ["--trainer.logger.init_args.name", "grid"]
    result = ok(arvae("sweep", path, "--parallel", "2", "--", *name, cwd=tmp_path))
    assert "2 of 2 runs succeeded" in result.stdout
    runs = sorted((tmp_path / "runs" / "grid").iterdir())
    assert [run.name for run in runs] == ["version_0", "version_1"]
    layers = set()
    for run in runs:
        saved = yaml.safe_load((run / "config.yaml").read_text())["model"]["init_args"]
        n_layers = saved["pixelcnn"]["init_args"]["n_layers"]
        assert read_report(run)["hparams"]["pixelcnn"]["init_args"]["n_layers"] == n_layers
        layers.add(n_layers)
    assert layers == {1, 2}
    assert len(list((tmp_path / "runs" / "sweep-logs" / "sweep").glob("run-*.log"))) == 2

    ddp = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]
    ddp += ["--trainer.logger.init_args.name", "ddp"]
    ok(arvae("sweep", path, "--count", "1", "--", *ddp, cwd=tmp_path, timeout=DDP_TIMEOUT))
    run = tmp_path / "runs" / "ddp" / "version_0"
    assert json.loads((run / "run_record.json").read_text())["world_size"] == 2
    assert read_report(run)["hparams"]["pixelcnn"]["init_args"]["n_layers"] == 2


class Tiny(L.LightningModule):
    def __init__(self, width: int = 3) -> None:
        super().__init__()
        self.save_hyperparameters()


def fake_ddp(offset: int) -> SimpleNamespace:
    """A 2-rank trainer whose other rank's configuration hash is ours plus ``offset``."""
    gather = SimpleNamespace(all_gather=lambda h: torch.stack([h, h + offset]))
    return SimpleNamespace(world_size=2, datamodule=None, strategy=gather)


def test_rank_configuration_check_raises_only_on_a_mismatch():
    check_same_config(fake_ddp(0), Tiny())
    with pytest.raises(RuntimeError, match=r"DDP ranks \[1\] resolved other"):
        check_same_config(fake_ddp(1), Tiny())


SKEWED = '''
import os

from tests.tiny_data import TinyBinary
from arvae.report import hparam


class RankSkewed(TinyBinary):
    """Its default seed is the process's local rank: the ranks' configurations differ."""

    def __init__(self, seed: int = int(os.environ.get("LOCAL_RANK", 0))) -> None:
        super().__init__(seed=seed)
'''


def test_ddp_ranks_with_different_configurations_stop_at_fit_start(tmp_path):
    """A real 2-rank run whose ranks resolve different data hyper-parameters fails clearly
    (and promptly: both ranks raise after the same all-gather, neither waits)."""
    (tmp_path / "skewed.py").write_text(SKEWED)  # importable: the subprocess's cwd
    result = arvae(
        "fit", *TINY_MODEL, *QUIET,
        "--data", "skewed.RankSkewed",
        "--trainer.max_epochs", "1",
        "--trainer.limit_train_batches", "2",
        "--trainer.accelerator", "cpu",
        "--trainer.devices", "2",
        "--trainer.strategy", "ddp",
        cwd=tmp_path,
        timeout=DDP_TIMEOUT,
    )  # fmt: skip
    assert result.returncode != 0
    assert "RuntimeError: DDP ranks [1] resolved other model or data" in result.stderr
