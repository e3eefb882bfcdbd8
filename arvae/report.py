"""`arvae report RUN_DIR ...`: the test metrics of finished runs as one Markdown table.

Reads every ``test_metrics.json`` (written by the TestReport callback) under the given
directories, one row per run: the model, chosen hyper-parameters (``--columns``), the
negative ELBO and its terms and the importance-weighted NLL, in nats per image, and on
8-bit data both bounds in bits per dimension (``bpd``, ``bpd_iwae``); each bound with the
standard error of its mean over the test examples ("79.12 ± 0.21"). This is
the data behind sweeps such as PixelVAE Fig. 4a/4b (``--columns pixelcnn.n_layers``).

With ``--ledger experiments/ledger.yaml`` it is the reproduction ledger instead: one row per
paper number (paper, dataset, model and config, the paper's value), filled from the newest
tested run of the target's run name and model options (ours, k, training steps, command,
checkpoint), and "not run" where there is none.

With ``--plot OPTION`` (a dotted model option, e.g. ``pixelcnn.n_layers``) it also draws the
sweep as PNGs beside the table (``--out``'s folder, else the first path): the ``--metric``
(one or several) against the option, one line per model and metric (PixelVAE Fig. 4a; AGAVE
Fig. 4 with ``--plot lam --metric bpd bpd_vae bpd/kl bpd/recon bpd/recon_y``), and the
reconstruction / KL breakdown of the latent models (PixelVAE Fig. 4b); see :mod:`arvae.plots`.
"""

import argparse
import json
import shlex
from pathlib import Path

import yaml


def collect(paths: list[Path]) -> list[dict]:
    """Every test_metrics.json under ``paths`` (files or directories), with its run dir."""
    files = []
    for path in paths:
        files += [path] if path.is_file() else sorted(path.rglob("test_metrics.json"))
    return [{**json.loads(f.read_text()), "run": str(f.parent)} for f in files]


MISSING = object()


def hparam(hparams: dict, key: str, default=MISSING):
    """A model option by dotted key, through class_path / init_args nesting:
    ``pixelcnn.n_layers`` is ``hparams["pixelcnn"]["init_args"]["n_layers"]`` and
    ``pixelcnn.class_path`` the network's class."""
    value = hparams
    for part in key.split("."):
        if isinstance(value, dict) and part not in value:
            value = value.get("init_args")
        if not isinstance(value, dict) or part not in value:
            return default
        value = value[part]
    return value


def row(report: dict, columns: list[str]) -> dict:
    m = report["metrics"]
    kl = [v for k, v in m.items() if k.startswith("test/kl/")]
    return {
        "run": report["run"],
        "model": report["model"],
        **{c: hparam(report["hparams"], c, "") for c in columns},
        "nelbo": estimate(m, "test/nelbo"),
        "recon": m.get("test/recon"),
        "kl": sum(kl) if kl else None,
        "nll_iwae": estimate(m, "test/nll_iwae"),
        "bpd": estimate(m, "test/bpd"),
        "bpd_iwae": estimate(m, "test/bpd_iwae"),
        "recon_y": m.get("test/recon_y"),  # AGAVE: the VAE's reconstruction of y and its bound
        "bpd_vae": estimate(m, "test/bpd_vae"),
        "k": report.get("iwae_k"),
        "n_test": report.get("n_test_examples"),
    }


def cell(value, field: str) -> str:
    """Nats with 2 decimals, bits per dimension with 3, nothing for a missing value."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3f}" if field.startswith("bpd") else f"{value:.2f}"
    return str(value)


def estimate(metrics: dict, key: str) -> str | None:
    """A test bound as text, with its standard error (``<key>_se``) when the run logged it:
    "79.12 ± 0.21"."""
    value = metrics.get(key)
    if value is None:
        return None
    field = key.removeprefix("test/")
    se = metrics.get(f"{key}_se")
    return cell(value, field) + (f" ± {cell(se, field)}" if se is not None else "")


def markdown(rows: list[dict]) -> str:
    if not rows:
        return "(no test_metrics.json found)"
    fields = [f for f in rows[0] if any(r[f] is not None for r in rows)]
    lines = ["| " + " | ".join(fields) + " |", "|" + "---|" * len(fields)]
    for r in rows:
        cells = [cell(r[f], f) for f in fields]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_name(report: dict) -> str:
    """The logger name of a run: ``<save_dir>/<name>/<version>/test_metrics.json``."""
    return Path(report["run"]).parent.name


def ours(report: dict, metric: str) -> str:
    value = estimate(report["metrics"], metric)
    if value is None:
        return f"{metric} not reported"
    return value + (" bits/dim" if "bpd" in metric else "")


def ledger_row(target: dict, reports: list[dict]) -> dict:
    """The target's row, from the newest report of its run name whose hyper-parameters
    include the target's ``match`` (if any)."""
    want = target.get("match", {})
    matches = [
        r
        for r in reports
        if run_name(r) == target["run"]
        and all(hparam(r["hparams"], k) == v for k, v in want.items())
    ]
    base = {
        "paper": target["paper"],
        "dataset": target["dataset"],
        "model (config)": f"{target['model']} (`{target['config']}`)",
        "paper value": target["paper_value"],
    }
    if not matches:
        return {**base, "ours": "not run", "k": "", "steps": "", "command": "", "checkpoint": ""}
    report = max(matches, key=lambda r: r.get("finished_at", ""))
    iwae = "iwae" in target["metric"]
    return {
        **base,
        "ours": ours(report, target["metric"]),
        "k": str(report.get("iwae_k")) if iwae else "ELBO",
        "steps": str(report.get("global_step", "")),
        "command": f"`{shlex.join(report['command'])}`" if report.get("command") else "",
        "checkpoint": f"`{report['ckpt_path']}`" if report.get("ckpt_path") else "not saved",
    }


def ledger(targets_file: Path, reports: list[dict]) -> str:
    targets = yaml.safe_load(targets_file.read_text())
    return markdown([ledger_row(t, reports) for t in targets])


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(prog="arvae report", description=__doc__.split("\n")[0])
    parser.add_argument("paths", nargs="*", type=Path, help="run directories or json files")
    parser.add_argument("--columns", nargs="*", default=[], help="hyper-parameters to show")
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    parser.add_argument(
        "--ledger", type=Path, help="reproduction targets (experiments/ledger.yaml)"
    )
    parser.add_argument("--plot", metavar="OPTION", help="draw the metrics against this option")
    parser.add_argument(
        "--group", metavar="OPTION", help="with --plot: one line per value of this option too"
    )
    parser.add_argument(
        "--metric",
        nargs="+",
        default=["nll_iwae"],
        help="test metrics of --plot, drawn in one figure (nll_iwae, nelbo, bpd_iwae, bpd/kl…)",
    )
    args = parser.parse_args(argv)
    reports = collect(args.paths)
    for option in (args.plot, args.group):
        if option and option not in args.columns:
            args.columns.append(option)
    if args.ledger:
        table = ledger(args.ledger, reports)
    else:
        rows = [row(r, args.columns) for r in reports]
        rows.sort(key=lambda r: [str(r["model"])] + [str(r[c]).zfill(8) for c in args.columns])
        table = markdown(rows)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n")
    if args.plot:
        from . import plots  # matplotlib: only when drawing

        folder = args.out.parent if args.out else next(iter(args.paths), Path("."))
        for path in plots.plot_sweep(reports, args.plot, args.metric, folder, args.group):
            print(f"Figure: {path}")
    return table
