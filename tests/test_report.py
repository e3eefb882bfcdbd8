"""`arvae report`: test_metrics.json files -> one Markdown table."""

import json

from arvae.cli import main


def write_run(path, layers: int, nelbo: float) -> None:
    path.mkdir(parents=True)
    report = {
        "model": "PixelVAE",
        "hparams": {"n_pixelcnn_layers": layers},
        "iwae_k": 5000,
        "n_test_examples": 10000,
        "metrics": {
            "test/nelbo": nelbo,
            "test/recon": nelbo - 2.0,
            "test/kl/z": 2.0,
            "test/nll_iwae": nelbo - 1.0,
        },
    }
    (path / "test_metrics.json").write_text(json.dumps(report))


def test_report_tabulates_every_run_sorted_by_column(tmp_path, capsys):
    write_run(tmp_path / "runs" / "version_1", 10, 80.5)
    write_run(tmp_path / "runs" / "version_0", 2, 84.25)
    out = tmp_path / "table.md"
    main(["report", str(tmp_path / "runs"), "--columns", "n_pixelcnn_layers", "--out", str(out)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == (
        "| run | model | n_pixelcnn_layers | nelbo | recon | kl | nll_iwae | k | n_test |"
    )
    assert "| PixelVAE | 2 | 84.25 | 82.25 | 2.00 | 83.25 | 5000 | 10000 |" in lines[2]
    assert "| PixelVAE | 10 | 80.50 | 78.50 | 2.00 | 79.50 | 5000 | 10000 |" in lines[3]
    assert out.read_text().strip() == "\n".join(lines)


def test_report_says_when_nothing_was_found(tmp_path, capsys):
    main(["report", str(tmp_path)])
    assert "no test_metrics.json found" in capsys.readouterr().out
