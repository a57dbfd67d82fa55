"""Tests of jaxmetric.report's markdown writer (the whole run is tested in test_cli)."""

import pytest

from jaxmetric import report


def test_write_report(tmp_path):
    (tmp_path / "tsne.png").write_bytes(b"\x89PNG fake")
    metrics = {"test_vs_train": {"precision_at_1": 0.91234, "n_queries": 10},
               "clustering": {"nmi": 0.5}, "epoch": 3}
    path = report.write_report(tmp_path, metrics,
                               config={"dataset_note": "CIFAR-10 (JPEG q75 copy)", "lr": 0.1})
    text = path.read_text()
    assert path == tmp_path / "report.md"
    assert "Accuracy is measured on CIFAR-10 (JPEG q75 copy)." in text
    assert "| precision_at_1 | 0.9123 |" in text
    assert "| n_queries | 10 |" in text
    assert "| epoch | 3 |" in text
    assert "![tsne](tsne.png)" in text
    assert "curves.png" not in text and "neighbours.png" not in text
    assert '"lr": 0.1' in text

    text = report.write_report(tmp_path / "new", {"a": {"b": 1.0}}).read_text()
    assert "Accuracy is measured" not in text and "## Pictures" not in text
    with pytest.raises(TypeError, match="metrics must be a dict"):
        report.write_report(tmp_path, [1, 2])
