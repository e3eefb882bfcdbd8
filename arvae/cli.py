"""The `arvae` command: LightningCLI over every model and datamodule, plus a quick start.

arvae fit  -c experiments/pixelvae/gated_pixelvae.yaml
arvae test -c experiments/pixelvae/gated_pixelvae.yaml --ckpt_path runs/.../best.ckpt
arvae fit  -c ... --ckpt_path last   # continue the newest run of that name where it stopped
arvae quickstart            # the embedded default: small PixelVAE on the shipped sample
arvae sweep experiments/sweeps/pixelvae_layers.yaml   # a wandb sweep's runs, without a server
arvae report runs/          # every tested run as one Markdown table
"""

import logging
import os
import sys
import warnings
from argparse import RawDescriptionHelpFormatter
from importlib.resources import files
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from arvae import report, resume, sweep
from arvae.checkpoint_io import AtomicCheckpointIO, check_readable
from callbacks import (
    CollapseAlarm,
    Colourizations,
    GuidedSamples,
    KLBreakdown,
    LatentMap,
    LossyCode,
    MultiScaleSamples,
    NoiseVariation,
    RunCheckpoint,
    RunRecord,
    SampleGrid,
    TestReport,
)
from callbacks.test_report import json_safe
from datamodules import ImageDataModule
from lightning_modules import ImageModel, legacy_options

QUICKSTART_CONFIG = files("arvae") / "configs" / "quickstart.yaml"
MORE_COMMANDS = """more commands:
  arvae quickstart [options]   fit and test the embedded default (a small PixelVAE on the
                               binarized-MNIST sample shipped in the package); options as fit's
  arvae sweep SWEEP.yaml       run a wandb sweep's grid of runs without a server (--help)
  arvae report RUNS_DIR        every tested run as one Markdown table, and plots (--help)"""
LINKED = ("image_shape", "data_kind")  # model options the CLI links from the datamodule
LOG_FILE_REFRESH_BATCHES = 50  # progress-bar redraws when stdout is not a terminal


class ArvaeParser(LightningArgumentParser):
    """LightningCLI's parser, stricter and shorter: an abbreviated option (``--trainer.max_step``)
    is an error as a misspelt one is, and an error shows one line of usage, not every option."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def print_usage(self, file=None) -> None:
        prog = self.prog.replace(" [options]", "")
        (file or sys.stdout).write(f"usage: {prog} [-h] [-c CONFIG] [options]\n")


class ArvaeCLI(LightningCLI):
    """LightningCLI with the callbacks every run has (configurable by key) and the image
    shape linked from the datamodule to the model."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=False,
            help="After `fit`, test the best checkpoint, or the last one if no validation ran "
            "(sweeps and the quick start do).",
        )
        parser.link_arguments(
            "data.data_shape", "model.init_args.image_shape", apply_on="instantiate"
        )
        parser.link_arguments("data.data_kind", "model.init_args.data_kind", apply_on="instantiate")
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/nelbo",
                "checkpoint.mode": "min",
                "checkpoint.save_last": True,
                "checkpoint.filename": "best-{epoch:04d}-{step}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        parser.add_lightning_class_args(SampleGrid, "samples")
        parser.add_lightning_class_args(KLBreakdown, "kl_breakdown")
        parser.add_lightning_class_args(CollapseAlarm, "collapse_alarm")
        parser.add_lightning_class_args(LatentMap, "latent_map")
        parser.add_lightning_class_args(NoiseVariation, "noise_variation")
        parser.add_lightning_class_args(LossyCode, "lossy_code")
        parser.add_lightning_class_args(Colourizations, "colourizations")
        parser.add_lightning_class_args(MultiScaleSamples, "multiscale")
        parser.add_lightning_class_args(GuidedSamples, "guided_samples")
        parser.add_lightning_class_args(TestReport, "test_report")
        parser.add_lightning_class_args(RunRecord, "run_record")

    def parse_arguments(self, parser, args) -> None:
        """Parse with the model and data saved in a ``--ckpt_path`` on the command line as
        defaults (see :meth:`_parse_ckpt_path`), so ``arvae test --ckpt_path X`` needs no
        config; a damaged checkpoint is rejected with a clear error before it is read."""
        self._args, self._defaults_from = args, None
        argv = sys.argv[1:] if args is None else args
        path = option_value(argv, "--ckpt_path") if isinstance(argv, list) else None
        if path and argv[0] in self._subcommand_parsers and Path(path).is_file():
            self._use_checkpoint_defaults(argv[0], path)
        self._parse(parser, args)

    def _parse_ckpt_path(self) -> None:
        """The model and data hyper-parameters of ``--ckpt_path`` are defaults under the
        config files and the command line. Lightning 2.6 merges them over both (its issue
        #20801), so ``arvae test --ckpt_path X --model.init_args.iwae_k 5000`` silently used
        X's ``iwae_k``. A ckpt_path given in a config file is known only now: parse again."""
        subcommand, ckpt_path = self._ckpt_path()
        if not (ckpt_path and Path(ckpt_path).is_file()):
            return  # none, or `last` (resolved later, by resume.continue_run)
        if ckpt_path != self._defaults_from:
            self._use_checkpoint_defaults(subcommand, ckpt_path)
            self._parse(self.parser, self._args)
        if subcommand == "test":
            log_beside_the_run(self.config.test.trainer, Path(ckpt_path))
        saved = self._saved.get("model")
        changed = overridden(self.config[subcommand].model, saved) if saved else []
        if changed:  # wanted for evaluation options; for the architecture, loading will fail
            rank_zero_warn(
                f"--ckpt_path {ckpt_path}: the command line or config files set these model"
                f" options, not the checkpoint's (in brackets): {', '.join(changed)}"
            )

    def _use_checkpoint_defaults(self, subcommand: str, ckpt_path: str) -> None:
        """The model and data saved in ``ckpt_path`` become the subcommand's defaults."""
        check_readable(ckpt_path)
        self._saved, self._defaults_from = saved_classes(ckpt_path), ckpt_path
        self._subcommand_parsers[subcommand].set_defaults(self._saved)

    def _parse(self, parser, args) -> None:
        """LightningCLI's parse, naming the checkpoint whose defaults may have failed it, then
        the damaged-checkpoint check of the ckpt_path it resolved."""
        try:
            super().parse_arguments(parser, args)
        except SystemExit:
            if self._defaults_from:
                sys.stderr.write(
                    f"--ckpt_path {self._defaults_from}: if the error above is about options"
                    " saved in this checkpoint, they do not parse with this version of arvae:"
                    " use the version that trained it (the git commit in its run record).\n"
                )
            raise
        ckpt_path = self._ckpt_path()[1]
        if ckpt_path:
            check_readable(ckpt_path)

    def _ckpt_path(self) -> tuple[str | None, str | None]:
        """The parsed subcommand and its ``ckpt_path`` (None for either if not given)."""
        subcommand = self.config.get("subcommand")
        return subcommand, self.config[subcommand].get("ckpt_path") if subcommand else None

    def before_instantiate_classes(self) -> None:
        if self.subcommand == "fit":
            resume.continue_run(self.config.fit)

    def instantiate_trainer(self, **kwargs) -> L.Trainer:
        """The configured trainer, writing its checkpoints atomically unless the config
        chose its own checkpoint IO."""
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer

    def after_fit(self) -> None:
        """``test_after_fit``: test the best checkpoint, or the last one when no validation
        ran to pick a best (a short run), so that the report names the weights it tested."""
        if self.config[self.subcommand].get("test_after_fit"):
            saved = self.trainer.checkpoint_callback
            ckpt = (saved.best_model_path or saved.last_model_path) if saved else None
            self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt or None)


def log_beside_the_run(trainer, ckpt_path: Path) -> None:
    """``arvae test --ckpt_path runs/NAME/version_N/checkpoints/X.ckpt`` with the default
    logger logs to ``runs/NAME/version_N/tests/version_M/``, beside the run it tests, not to
    ``runs/lightning_logs/``; a logger the user configured is left alone."""
    logger = trainer.get("logger")
    run = ckpt_path.resolve().parent
    if run.name != "checkpoints" or not hasattr(logger, "init_args"):
        return
    args = logger.init_args
    default = (logger.class_path, args.get("save_dir"), args.get("name"), args.get("version"))
    if default == ("arvae.loggers.CSVLogger", "runs", "lightning_logs", None):
        args.save_dir, args.name = str(run.parent), "tests"


def option_value(argv: list[str], option: str) -> str | None:
    """The value of ``--option value`` or ``--option=value`` in a command line, if given."""
    for i, arg in enumerate(argv):
        if arg == option and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(option + "="):
            return arg[len(option) + 1 :]
    return None


def saved_classes(ckpt_path: str) -> dict:
    """``{"model": ..., "data": ...}`` as class_path + init_args, from the hyper-parameters
    LightningCLI saved in a checkpoint (either is missing if it was not saved that way)."""
    ckpt = torch.load(ckpt_path, weights_only=True, map_location="cpu")
    found = {}
    for key, hparams in (("model", "hyper_parameters"), ("data", "datamodule_hyper_parameters")):
        init_args = dict(ckpt.get(hparams) or {})
        init_args.pop("_instantiator", None)
        class_path = init_args.pop("_class_path", None)
        if class_path is not None:
            if key == "model":
                init_args = legacy_options.upgrade(class_path, init_args)
            found[key] = {"class_path": class_path, "init_args": init_args}
    return found


def overridden(model, saved: dict) -> list[str]:
    """``key = value (saved)`` for each model option (and the class) that differs from the
    checkpoint's, compared as JSON (YAML gives lists where the checkpoint has tuples); the
    data-linked ``image_shape`` and ``data_kind`` are set later, so skipped."""
    given = {"class_path": model.class_path, **vars(model.get("init_args") or {})}
    saved = {"class_path": saved["class_path"], **saved["init_args"]}
    return [
        f"{key} = {given[key]} ({value})"
        for key, value in saved.items()
        if key in given and key not in LINKED and json_safe(given[key]) != json_safe(value)
    ]


def cli(args: list[str] | None = None) -> ArvaeCLI:
    """Build and run the CLI (args default to sys.argv[1:]); returns it for inspection."""
    with warnings.catch_warnings():  # passing args is how main() routes subcommands
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        return ArvaeCLI(
            ImageModel,
            ImageDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            parser_class=ArvaeParser,
            parser_kwargs={
                "prog": "arvae",
                "epilog": MORE_COMMANDS,
                "formatter_class": RawDescriptionHelpFormatter,
            },
            trainer_defaults={
                "logger": {
                    "class_path": "arvae.loggers.CSVLogger",
                    "init_args": {"save_dir": "runs"},
                }
            },
            args=args,
        )


def quiet_lightning() -> None:
    """Silence what every run would print that the user cannot act on: Lightning's
    advertising tips, a deprecation inside Lightning's own code, and, outside a SLURM job,
    the hint to launch with srun (shown because srun is installed)."""

    class NoTips(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not str(record.msg).startswith("💡 Tip")

    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(NoTips())
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    if "SLURM_JOB_ID" not in os.environ:
        warnings.filterwarnings("ignore", message="The `srun` command is available on your system")


def main(argv: list[str] | None = None) -> None:
    quiet_lightning()
    # Denormal floats make CPU training several times slower once gradients get tiny; their
    # contribution to the results is nil.
    torch.set_flush_denormal(True)
    # Written to a file (a SLURM log, a sweep's run log, nohup), Lightning's progress bar
    # (on stdout) redrawn on every batch adds a line per step: ~50 MB over 200k steps. It
    # then redraws every TQDM_MINITERS batches instead; a value set by the user wins.
    if not sys.stdout.isatty():
        os.environ.setdefault("TQDM_MINITERS", str(LOG_FILE_REFRESH_BATCHES))
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["report"]:
        report.main(argv[1:])
        return
    if argv[:1] == ["sweep"]:
        sweep.main(argv[1:])
        return
    if argv[:1] == ["quickstart"]:
        argv = ["fit", "-c", str(QUICKSTART_CONFIG), *argv[1:]]
    cli(argv)
    # Lightning destroys only NCCL process groups at exit; a gloo group left to the
    # interpreter's shutdown can abort the process (SIGABRT) after a successful run
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
