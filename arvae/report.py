"""`arvae report RUN_DIR ...`: the test metrics of finished runs as one Markdown table.

Reads every ``test_metrics.json`` (written by the TestReport callback) under the given
directories, one row per run: the model, chosen hyper-parameters (``--columns``), the
negative ELBO and its terms and the importance-weighted NLL, in nats per image, and on
8-bit data both bounds in bits per dimension (``bpd``, ``bpd_iwae``). This is
the data behind sweeps such as PixelVAE Fig. 4a/4b (``--columns n_pixelcnn_layers``).
"""

import argparse
import json
from pathlib import Path


def collect(paths: list[Path]) -> list[dict]:
    """Every test_metrics.json under ``paths`` (files or directories), with its run dir."""
    files = []
    for path in paths:
        files += [path] if path.is_file() else sorted(path.rglob("test_metrics.json"))
    return [{**json.loads(f.read_text()), "run": str(f.parent)} for f in files]


def row(report: dict, columns: list[str]) -> dict:
    m = report["metrics"]
    kl = [v for k, v in m.items() if k.startswith("test/kl/")]
    return {
        "run": report["run"],
        "model": report["model"],
        **{c: report["hparams"].get(c, "") for c in columns},
        "nelbo": m.get("test/nelbo"),
        "recon": m.get("test/recon"),
        "kl": sum(kl) if kl else None,
        "nll_iwae": m.get("test/nll_iwae"),
        "bpd": m.get("test/bpd"),
        "bpd_iwae": m.get("test/bpd_iwae"),
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


def markdown(rows: list[dict]) -> str:
    if not rows:
        return "(no test_metrics.json found)"
    fields = [f for f in rows[0] if any(r[f] is not None for r in rows)]
    lines = ["| " + " | ".join(fields) + " |", "|" + "---|" * len(fields)]
    for r in rows:
        cells = [cell(r[f], f) for f in fields]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(prog="arvae report", description=__doc__.split("\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, help="run directories or json files")
    parser.add_argument("--columns", nargs="*", default=[], help="hyper-parameters to show")
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    args = parser.parse_args(argv)
    rows = [row(r, args.columns) for r in collect(args.paths)]
    rows.sort(key=lambda r: [str(r["model"])] + [str(r[c]).zfill(8) for c in args.columns])
    table = markdown(rows)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")
    return table
