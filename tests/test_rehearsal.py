"""The scaled-down mixture-of-experts rehearsal (benchmarks/rehearsal.py), at its smallest: a 2-rank DCP save,
replayed whole, layer by layer and from the S3 server, every statistic and digest agreeing."""

import pytest

pytest.importorskip("moto.server")
pytest.importorskip("s3fs")

pytestmark = pytest.mark.slow


def test_the_rehearsal_agrees_at_its_smallest(tmp_path, capsys):
    from benchmarks.rehearsal import main

    status = main(["--out", str(tmp_path), "--ranks", "2", "--layers", "3", "--experts", "4", "--hidden", "64"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "everything agrees" in out
    assert out.count("steps flagged as holding identical weights: [[100, 200]]") == 3
    assert len(list((tmp_path / "run" / "checkpoint" / "step-100").glob("*.distcp"))) == 2
