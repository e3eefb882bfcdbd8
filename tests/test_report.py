"""`arvae report`: test_metrics.json files -> one Markdown table, and sweep plots."""

import json

import numpy as np
import yaml
from PIL import Image
from test_cli import REPO

from arvae.cli import main


def write_run(
    path, layers: int, nelbo: float, se: float | None = None, model: str = "PixelVAE"
) -> None:
    """A run's test_metrics.json; with ``se``, the bounds' standard errors as well (runs
    tested before arvae logged them have none)."""
    path.mkdir(parents=True)
    report = {
        "model": model,
        "hparams": {"pixelcnn": {"class_path": "x", "init_args": {"n_layers": layers}}},
        "iwae_k": 5000,
        "n_test_examples": 10000,
        "metrics": {
            "test/nelbo": nelbo,
            "test/recon": nelbo - 2.0,
            "test/kl/z": 2.0,
            "test/nll_iwae": nelbo - 1.0,
        },
    }
    if se is not None:
        report["metrics"] |= {"test/nelbo_se": se, "test/nll_iwae_se": se / 2}
    (path / "test_metrics.json").write_text(json.dumps(report))


def test_report_tabulates_every_run_sorted_by_column(tmp_path, capsys):
    write_run(tmp_path / "runs" / "version_1", 10, 80.5)
    write_run(tmp_path / "runs" / "version_0", 2, 84.25, se=0.5)
    out = tmp_path / "table.md"
    main(["report", str(tmp_path / "runs"), "--columns", "pixelcnn.n_layers", "--out", str(out)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == (
        "| run | model | pixelcnn.n_layers | nelbo | recon | kl | nll_iwae | k | n_test |"
    )
    with_se = "| PixelVAE | 2 | 84.25 ± 0.50 | 82.25 | 2.00 | 83.25 ± 0.25 | 5000 | 10000 |"
    assert with_se in lines[2]
    assert "| PixelVAE | 10 | 80.50 | 78.50 | 2.00 | 79.50 | 5000 | 10000 |" in lines[3]
    assert out.read_text().strip() == "\n".join(lines)


def test_report_says_when_nothing_was_found(tmp_path, capsys):
    main(["report", str(tmp_path)])
    assert "no test_metrics.json found" in capsys.readouterr().out


LEDGER = REPO / "experiments" / "ledger.yaml"


def test_ledger_fills_each_paper_number_from_the_newest_run_of_its_name(tmp_path, capsys):
    runs = tmp_path / "runs" / "gated_pixelvae_no_upsampling"
    for version, (nll, finished) in enumerate([(80.0, "2026-01-01"), (79.1, "2026-02-01")]):
        write_run(runs / f"version_{version}", 13, nll + 1.0, se=0.42)
        path = runs / f"version_{version}" / "test_metrics.json"
        report = json.loads(path.read_text())
        report.update(
            finished_at=finished,
            global_step=200000,
            ckpt_path=f"runs/x/version_{version}/checkpoints/last.ckpt",
            command=["arvae", "test", "-c", "a b.yaml"],
        )
        path.write_text(json.dumps(report))
    # an AF VAE ablation run keeps the dataset config's run name: its options tell it apart
    ablation = tmp_path / "runs" / "vlae_mnist_static" / "version_0"
    write_run(ablation, 0, 81.0)
    report = json.loads((ablation / "test_metrics.json").read_text())
    report["hparams"] = {"prior": "af", "posterior": "gaussian", "pixelcnn": None}
    (ablation / "test_metrics.json").write_text(json.dumps(report))
    main(["report", "--ledger", str(LEDGER), str(tmp_path / "runs")])
    header, _, *rows = capsys.readouterr().out.strip().splitlines()
    vlae, af_vae = (next(r for r in rows if f"| {m} (" in r) for m in ("VLAE", "AF VAE"))
    assert "not run" in vlae and "| 80.00 | 5000 |" in af_vae
    assert header == (
        "| paper | dataset | model (config) | paper value | ours | k | steps | command"
        " | checkpoint |"
    )
    targets = yaml.safe_load(LEDGER.read_text())
    assert len(rows) == len(targets)
    (filled,) = [r for r in rows if "not run" not in r and r != af_vae]
    assert "Gated PixelVAE w/o upsampling" in filled and "≈ 78.96 (≤ 79.58)" in filled
    assert "| 79.10 ± 0.21 | 5000 | 200000 | `arvae test -c 'a b.yaml'` |" in filled
    assert "version_1/checkpoints/last.ckpt" in filled


def test_every_ledger_target_names_a_shipped_config_and_its_run_name():
    for target in yaml.safe_load(LEDGER.read_text()):
        base, *overlays = [part.strip() for part in target["config"].split("+")]
        config = REPO / "experiments" / f"{base}.yaml"
        assert config.is_file(), target
        for overlay in overlays:
            assert (config.parent / f"{overlay}.yaml").is_file(), target
        metric = target["metric"]
        assert metric in ("test/nll_iwae", "test/bpd", "test/bpd_iwae") or metric.startswith(
            ("test/bpd/", "test/bpd_at/")  # a factor, a level of an auxiliary-variable PixelCNN
        ), target
        files = [config, *(config.parent / f"{o}.yaml" for o in overlays)]
        named = [f for f in files if f"name: {target['run']}}}" in f.read_text()]  # logger name
        assert named, target
        if overlays and named[-1] == config:  # an ablation overlay keeps its base's run name:
            # its runs are told apart by the options the overlay sets
            overlay = yaml.safe_load((config.parent / f"{overlays[0]}.yaml").read_text())
            assert target["match"] == overlay["model"]["init_args"], target


def test_report_plots_a_sweep_against_its_option(tmp_path, capsys):
    """Fig. 4a/4b from a layer sweep of two models: the IWAE NLL per model against the swept
    option (runs sorted by it, repeated values kept), the breakdown for the latent model."""
    from arvae.plots import series

    runs = tmp_path / "runs"
    for i, (layers, nelbo) in enumerate([(4, 81.0), (1, 90.0), (2, 85.0), (2, 85.5)]):
        write_run(runs / f"vae{i}", layers, nelbo)
    for i, layers in enumerate([1, 4]):
        write_run(runs / f"cnn{i}", layers, 100.0 - layers, model="PixelCNN")
    out = tmp_path / "report" / "table.md"
    main(["report", str(runs), "--plot", "pixelcnn.n_layers", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "| pixelcnn.n_layers |" in printed.splitlines()[0]  # the option joins the table
    figures = [out.parent / "nll_iwae_vs_pixelcnn_n_layers.png"]
    figures.append(out.parent / "breakdown_vs_pixelcnn_n_layers.png")
    for figure in figures:
        assert f"Figure: {figure}" in printed
        image = np.asarray(Image.open(figure).convert("L"))
        assert image.shape[0] >= 300 and len(np.unique(image)) > 10  # drawn, not blank
    from arvae.report import collect

    reports = collect([runs])
    nll = series(reports, "pixelcnn.n_layers", "nll_iwae")
    assert nll["PixelVAE"] == [(1, 89.0), (2, 84.0), (2, 84.5), (4, 80.0)]
    assert nll["PixelCNN"] == [(1, 98.0), (4, 95.0)]
    assert series(reports, "pixelcnn.n_layers", "kl")["PixelVAE"][0] == (1, 2.0)
