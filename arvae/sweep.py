"""`arvae sweep SWEEP.yaml`: run a wandb sweep file's runs, one or several at a time, without
a server.

wandb's `sweep` / `agent` need a W&B server to hand out each run's parameters; this runner
makes them itself for methods ``grid`` and ``random`` and builds each run's command line
from the file's ``command`` as a wandb agent does (its ``${...}`` macros below), then runs
the runs as subprocesses in the current directory (so relative paths in the sweep are
relative to where it is started, as with ``wandb agent``): one after another, or ``--parallel
N`` at a time, each on one entry of ``--gpus`` (see :class:`Runner`); runs that share a logger
name get distinct versions (``arvae.loggers.CSVLogger`` claims its directory). It sets no
sweep or run id, so a run's WandbLogger works with ``WANDB_MODE=offline`` or ``disabled``.

Macros (each a whole element of ``command``), as a wandb agent expands them:
``${env}`` -> ``/usr/bin/env`` (nothing on Windows); ``${program}`` -> ``program``;
``${args}`` -> ``--name=value`` per parameter (value as Python prints it: ``True``, ``[1, 2]``);
``${args_no_equals}`` -> ``--name value``; ``${args_no_hyphens}`` -> ``name=value``;
``${args_no_boolean_flags}`` -> like ``${args}`` but ``--name`` for True and nothing for False;
``${args_json}`` -> one JSON object; ``${args_json_file}`` -> a file holding it
(``wandb/sweep-<file stem>/config-<run>.json`` under ``$WANDB_DIR``);
``${args_append_hydra}`` / ``${args_override_hydra}`` -> ``+name=value`` / ``++name=value``;
``${envvar:NAME}`` inside any element -> the environment variable.
Deliberate differences from a wandb agent: ``${interpreter}`` is this Python
(``sys.executable``; wandb writes ``python``) and an executable ``arvae`` runs as
``sys.executable -m arvae.cli``, so that a run uses this very Python and package even in a
virtual environment whose ``bin`` is not on PATH; an unknown macro or an unset variable is an
error before anything runs (wandb drops the one and passes the other's name on).

Grid order: the cartesian product of the parameters in file order, the last one varying
fastest (as nested loops written in that order); ``--count N`` keeps the first N runs.
Random: ``--count`` draws (or the file's ``run_cap``) from ``random.Random(--seed)``,
reproducible for a given seed, from ``values`` (with ``probabilities``), ``value`` or a
``distribution`` in :data:`SAMPLERS` (without one, integer min/max mean int_uniform, others
uniform, as in wandb). Method bayes and other distributions need the W&B server.
"""

import argparse
import itertools
import json
import math
import os
import random
import re
import shlex
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

ENV = "/usr/bin/env"
MACRO = re.compile(r"\$\{([^}]*)\}")
ENVVAR = re.compile(r"\$\{envvar:([A-Z0-9_]*)\}")
MACROS = (
    "env",
    "interpreter",
    "program",
    "args",
    "args_no_equals",
    "args_no_hyphens",
    "args_no_boolean_flags",
    "args_json",
    "args_json_file",
    "args_append_hydra",
    "args_override_hydra",
)
SERVER = "run it with `wandb sweep` and `wandb agent` (they need a W&B server)"


class SweepError(ValueError):
    """A sweep this runner cannot run; the message names the offending key."""


def load(path: Path) -> dict[str, Any]:
    """The sweep in ``path``, checked before anything runs."""
    sweep = yaml.safe_load(path.read_text())
    if not isinstance(sweep, dict):
        raise SweepError("not a mapping of sweep keys")
    if not sweep.get("command") or not isinstance(sweep["command"], list):
        raise SweepError(
            "`command` is missing or not a list (wandb's default command runs a "
            "Python script: write the command out)"
        )
    parameters = sweep.get("parameters")
    if not parameters or not isinstance(parameters, dict):
        raise SweepError("`parameters` is missing or not a mapping")
    for name, spec in parameters.items():
        if not isinstance(spec, dict):
            raise SweepError(f"`parameters.{name}` is not a mapping (e.g. `values: [...]`)")
        if "parameters" in spec:
            raise SweepError(f"`parameters.{name}`: nested parameters are not supported")
    check_method(sweep.get("method"))
    check_command(sweep)
    return sweep


def check_method(method: Any) -> None:
    if method == "bayes":
        raise SweepError(
            f"`method: bayes` models past results on the server: {SERVER}, "
            "or use method grid or random here"
        )
    if method not in ("grid", "random"):
        raise SweepError(f"`method` must be grid or random here (got {method!r})")


def check_command(sweep: dict[str, Any]) -> None:
    """Every ``${...}`` in ``command`` is a macro this runner expands."""
    for i, element in enumerate(sweep["command"]):
        whole = MACRO.fullmatch(str(element))
        if whole and whole[1] in MACROS:
            if whole[1] == "program" and "program" not in sweep:
                raise SweepError(f"`command[{i}]` is ${{program}} but `program` is missing")
            continue
        for name in ENVVAR.findall(str(element)):
            if name not in os.environ:
                raise SweepError(f"`command[{i}]`: environment variable {name} is not set")
        left = MACRO.search(ENVVAR.sub("", str(element)))
        if left:
            known = ", ".join(f"${{{m}}}" for m in MACROS)
            raise SweepError(
                f"`command[{i}]`: unknown macro {left[0]} (known: {known}, ${{envvar:NAME}})"
            )


def plan(sweep: dict[str, Any], count: int | None, seed: int) -> list[dict[str, Any]]:
    """Each run's parameters: the grid (its first ``count``) or ``count`` random draws."""
    count = count if count is not None else sweep.get("run_cap")
    if sweep["method"] == "grid":
        return grid(sweep["parameters"])[:count]
    if count is None:
        raise SweepError("method random draws without end: give --count N (or `run_cap`)")
    rng = random.Random(seed)
    return [
        {name: draw(rng, name, spec) for name, spec in sweep["parameters"].items()}
        for _ in range(count)
    ]


def grid(parameters: dict[str, dict]) -> list[dict[str, Any]]:
    """The cartesian product of every parameter's ``values`` (or single ``value``)."""
    axes = []
    for name, spec in parameters.items():
        if "values" in spec:
            axes.append(spec["values"])
        elif "value" in spec:
            axes.append([spec["value"]])
        else:
            raise SweepError(
                f"`parameters.{name}`: method grid needs `values` or `value`; "
                "sample distributions with method random"
            )
    return [dict(zip(parameters, combo, strict=True)) for combo in itertools.product(*axes)]


def quantize(x: float, q: float) -> float | int:
    """``x`` rounded to a multiple of ``q`` (an int for an integer ``q``)."""
    steps = round(x / q)
    return steps * q if isinstance(q, int) else round(steps * q, 12)


def log_uniform_values(rng: random.Random, spec: dict) -> float:
    low, high = spec["min"], spec["max"]
    return min(max(math.exp(rng.uniform(math.log(low), math.log(high))), low), high)


Sampler = Callable[[random.Random, dict], Any]
SAMPLERS: dict[str, Sampler] = {
    "constant": lambda rng, s: s["value"],
    "categorical": lambda rng, s: rng.choices(s["values"], weights=s.get("probabilities"))[0],
    "int_uniform": lambda rng, s: rng.randint(s["min"], s["max"]),
    "uniform": lambda rng, s: rng.uniform(s["min"], s["max"]),
    "q_uniform": lambda rng, s: quantize(rng.uniform(s["min"], s["max"]), s.get("q", 1)),
    "log_uniform": lambda rng, s: math.exp(rng.uniform(s["min"], s["max"])),
    "log_uniform_values": log_uniform_values,
    "q_log_uniform_values": lambda rng, s: quantize(log_uniform_values(rng, s), s.get("q", 1)),
    "normal": lambda rng, s: rng.gauss(s.get("mu", 0), s.get("sigma", 1)),
    "log_normal": lambda rng, s: math.exp(rng.gauss(s.get("mu", 0), s.get("sigma", 1))),
}


def distribution(name: str, spec: dict) -> str:
    """The spec's distribution, or the one wandb infers from its keys."""
    if "distribution" in spec:
        return spec["distribution"]
    if "values" in spec:
        return "categorical"
    if "value" in spec:
        return "constant"
    if "min" in spec and "max" in spec:
        ints = all(type(spec[k]) is int for k in ("min", "max"))
        return "int_uniform" if ints else "uniform"
    raise SweepError(f"`parameters.{name}` needs `values`, `value`, `distribution` or min/max")


def draw(rng: random.Random, name: str, spec: dict) -> Any:
    """One random value of parameter ``name``."""
    kind = distribution(name, spec)
    if kind not in SAMPLERS:
        raise SweepError(
            f"`parameters.{name}`: distribution {kind!r} is not supported here "
            f"(supported: {', '.join(SAMPLERS)}); {SERVER}"
        )
    try:
        return SAMPLERS[kind](rng, spec)
    except KeyError as missing:
        raise SweepError(f"`parameters.{name}`: {kind} needs `{missing.args[0]}`") from None
    except (TypeError, ValueError) as bad:
        raise SweepError(f"`parameters.{name}`: bad {kind} settings ({bad})") from None


def arg_formats(params: dict[str, Any]) -> dict[str, list[str]]:
    """A run's parameters in every format of wandb's ``${args*}`` macros."""
    flags = [f"{name}={value}" for name, value in params.items()]
    no_booleans = [  # True: a bare flag; False: nothing
        f"--{name}" if isinstance(value, bool) else f"--{name}={value}"
        for name, value in params.items()
        if value is not False
    ]
    return {
        "args": [f"--{flag}" for flag in flags],
        "args_no_equals": [a for n, v in params.items() for a in (f"--{n}", str(v))],
        "args_no_hyphens": flags,
        "args_no_boolean_flags": no_booleans,
        "args_json": [json.dumps(params)],
        "args_append_hydra": [f"+{flag}" for flag in flags],
        "args_override_hydra": [f"++{flag}" for flag in flags],
    }


def expand(command: list, values: dict[str, list[str]]) -> list[str]:
    """wandb's expansion: an element that is a whole ``${name}`` becomes ``values[name]``
    (any number of arguments), ``${envvar:NAME}`` in an element the variable's value."""
    out = []
    for element in map(str, command):
        whole = MACRO.fullmatch(element)
        if whole and whole[1] in values:
            out += values[whole[1]]
        else:
            out.append(ENVVAR.sub(lambda m: os.environ[m[1]], element))
    return out


def localize(cmd: list[str]) -> list[str]:
    """An executable ``arvae`` becomes ``sys.executable -m arvae.cli``: the same Python and
    package as this runner, wherever the venv's ``bin`` is."""
    i = 1 if cmd[:1] == [ENV] else 0
    if cmd[i : i + 1] == ["arvae"]:
        return [*cmd[:i], sys.executable, "-m", "arvae.cli", *cmd[i + 1 :]]
    return cmd


def args_json_file(sweep_path: Path, run: int) -> Path:
    """Where ``${args_json_file}`` puts run ``run``'s parameters (wandb's layout)."""
    sweep_dir = Path(os.environ.get("WANDB_DIR", "")) / "wandb" / f"sweep-{sweep_path.stem}"
    return sweep_dir / f"config-{run}.json"


def command_line(sweep: dict[str, Any], params: dict[str, Any], json_file: Path) -> list[str]:
    """Run ``params``'s command line, as a wandb agent builds it (then localized)."""
    values = {
        **arg_formats(params),
        "env": [] if os.name == "nt" else [ENV],
        "interpreter": [sys.executable],
        "program": [str(sweep.get("program"))],
        "args_json_file": [str(json_file)],
    }
    return localize(expand(sweep["command"], values))


class Runner:
    """Runs a sweep's command lines, ``parallel`` at a time, and says how each ended.

    Runs that overlap write their output to ``logs/run-<i>.log`` instead of the terminal and
    split the CPU cores: each gets ``OMP_NUM_THREADS`` = cores // ``parallel`` (unless it is
    set), since N runs each using every core slow each other down far more than N times.
    ``gpus`` are ``CUDA_VISIBLE_DEVICES`` values (``"0"``, or ``"0,1"`` for a two-GPU run);
    each run gets the one with the fewest runs on it at its start, so with more runs at once
    than entries they share the GPUs evenly (a small model leaves a GPU idle between its
    kernel launches, time that another run can use).
    """

    def __init__(self, parallel: int = 1, gpus: list[str] | None = None, logs: Path | None = None):
        self.parallel, self.gpus, self.logs = parallel, gpus or [], logs
        self.on_gpu = dict.fromkeys(self.gpus, 0)
        self.lock = threading.Lock()

    def say(self, message: str) -> None:
        with self.lock:
            print(f"[sweep] {message}", flush=True)

    def take_gpu(self) -> str | None:
        with self.lock:
            if not self.gpus:
                return None
            gpu = min(self.gpus, key=self.on_gpu.__getitem__)
            self.on_gpu[gpu] += 1
            return gpu

    def give_back(self, gpu: str | None) -> None:
        with self.lock:
            if gpu is not None:
                self.on_gpu[gpu] -= 1

    def run(self, i: int, n: int, cmd: list[str]) -> int:
        """Run ``cmd`` (run ``i`` of ``n``) to its end; its exit code (127: did not start)."""
        gpu = self.take_gpu()
        env = dict(os.environ)
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        if self.parallel > 1:
            env.setdefault(
                "OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // self.parallel))
            )
        log = None if self.parallel == 1 else self.logs / f"run-{i}.log"
        where = "".join([f" on GPU {gpu}" if gpu else "", f" (log: {log})" if log else ""])
        self.say(f"run {i}/{n}{where}: {shlex.join(cmd)}")
        try:
            if log is None:
                code = subprocess.run(cmd, env=env).returncode
            else:
                with log.open("w") as out:
                    code = subprocess.run(
                        cmd, env=env, stdout=out, stderr=subprocess.STDOUT
                    ).returncode
        except OSError as error:  # e.g. the program does not exist
            self.say(f"cannot start run {i}: {error}")
            code = 127
        finally:
            self.give_back(gpu)
        if not code:
            if log is not None:
                self.say(f"run {i}/{n} finished")
            return 0
        tail = (
            "".join(f"\n    {line}" for line in log.read_text().splitlines()[-15:]) if log else ""
        )
        self.say(f"run {i}/{n} failed (exit code {code}){tail}")
        return code

    def run_all(self, path: Path, commands: list[list[str]]) -> list[int]:
        """Run every command, whatever the others did; the failed runs' numbers."""
        if self.parallel > 1:
            self.logs.mkdir(parents=True, exist_ok=True)
        n = len(commands)
        with ThreadPoolExecutor(self.parallel) as pool:
            codes = list(pool.map(self.run, range(1, n + 1), [n] * n, commands))
        failed = [i for i, code in enumerate(codes, 1) if code]
        listed = f"; failed: {', '.join(map(str, failed))}" if failed else ""
        self.say(f"{path}: {n - len(failed)} of {n} runs succeeded{listed}")
        return failed


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="arvae sweep",
        usage="%(prog)s SWEEP.yaml [--dry-run] [--count N] [--seed S] [--parallel N] "
        "[--gpus G [G ...]] [--logs DIR] [-- ARG ...]",
        description="Run a wandb sweep file's runs, one or several at a time, without a server.",
        epilog="Arguments after `--` are appended to every run's command line (later options "
        "win in LightningCLI), e.g. `-- --trainer.max_steps 2`.",
    )
    parser.add_argument("sweep", type=Path, help="a wandb sweep YAML (method grid or random)")
    parser.add_argument("--dry-run", action="store_true", help="print the command lines only")
    parser.add_argument("--count", type=int, help="at most this many runs (random: required)")
    parser.add_argument("--seed", type=int, default=0, help="seed of method random's draws")
    parser.add_argument(
        "--parallel",
        type=int,
        help="run up to N runs at once, each writing its output to a log file "
        "(default: one per --gpus entry, else 1)",
    )
    parser.add_argument(
        "--gpus",
        nargs="+",
        metavar="G",
        help="CUDA_VISIBLE_DEVICES of the runs, one entry per run slot: `--gpus 0 1 2 3` runs "
        "on four GPUs, `--gpus 0,1 2,3` gives each run two; a run takes the entry with the "
        "fewest runs on it, so --parallel above the number of entries shares them",
    )
    parser.add_argument(
        "--logs",
        type=Path,
        help="where overlapping runs write run-<i>.log (default: runs/sweep-logs/<sweep name>)",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    """Run (or with --dry-run print) the sweep's runs; exit status 1 if any run failed."""
    argv = sys.argv[1:] if argv is None else argv
    cut = argv.index("--") if "--" in argv else len(argv)
    parser = build_parser()
    args, extra = parser.parse_args(argv[:cut]), argv[cut + 1 :]
    if args.parallel is not None and args.parallel < 1:
        parser.error(f"--parallel must be at least 1 (got {args.parallel})")
    parallel = args.parallel or len(args.gpus or []) or 1
    try:
        sweep = load(args.sweep)
        runs = plan(sweep, args.count, args.seed)
    except (OSError, yaml.YAMLError, SweepError) as error:
        parser.error(f"{args.sweep}: {error}")
    files = [args_json_file(args.sweep, i) for i in range(1, len(runs) + 1)]
    commands = [command_line(sweep, p, f) + extra for p, f in zip(runs, files, strict=True)]
    if args.dry_run:
        print("\n".join(map(shlex.join, commands)))
        return
    if "${args_json_file}" in map(str, sweep["command"]):
        for params, file in zip(runs, files, strict=True):
            file.parent.mkdir(parents=True, exist_ok=True)
            file.write_text(json.dumps(params))
    if "early_terminate" in sweep:
        print("[sweep] `early_terminate` is ignored: every run runs to its end", file=sys.stderr)
    logs = args.logs or Path("runs", "sweep-logs", args.sweep.stem)
    if Runner(parallel, args.gpus, logs).run_all(args.sweep, commands):
        raise SystemExit(1)
