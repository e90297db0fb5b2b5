"""`sinktrace check`: every supported family's route against eager attention on this machine (here the CPU)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline import check
from pipeline.replay import attention, eager

README = Path(__file__).resolve().parents[1] / "README.md"


def table_rows(out: str) -> dict[str, list[str]]:
    """family -> its cells, from the printed table."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("family"))
    rows = {}
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        cells = line.split()
        rows[cells[0]] = cells
    return rows


def test_families_are_the_readmes_supported_architectures():
    section = README.read_text().split("| family (`model_type`) | route |", 1)[1].split("\n\n", 1)[0]
    listed = {t for row in section.splitlines()[2:] for t in re.findall(r"`(\w+)`", row.split("|")[1])}
    assert listed == set(check.FAMILIES) == set(check._configs())


def test_check_on_the_cpu_passes_for_every_family(capsys):
    assert check.run(["replay.device=cpu"]) == 0
    out = capsys.readouterr().out
    assert "on cpu in float32" in out
    rows = table_rows(out)
    assert list(rows) == list(check.FAMILIES)
    header = next(line for line in out.splitlines() if line.startswith("family")).split()
    assert header == ["family", "route", *check.COLUMNS, "tolerance", "time", "result"]
    for family, cells in rows.items():
        assert cells[1] == (
            "eager" if family in ("stablelm", "falcon", "bloom", "gpt_neo", "mpt", "biogpt", "xglm") else "sinkstats"
        ), family
        assert cells[-1] == "ok" and cells[-3] == "1e-05", cells
        differences = [float(c) for c in cells[2:-3] if c != "-"]
        assert len(differences) == (7 if family == "gpt_oss" else 6), cells  # learned sinks: GPT-OSS only
        assert max(differences) < 1e-5, cells
        assert re.fullmatch(r"\d+\.\d\dx", cells[-2]), cells
    assert "all 18 families within 1e-05 of eager attention" in out


def test_a_broken_route_fails_naming_its_family(monkeypatch, capsys):
    """The sink mass of the fused sinkstats kernel perturbed by 1e-4: llama fails, falcon (eager route) passes."""
    fused = attention.fused_attention

    def perturbed(*args, **kwargs):
        result = fused(*args, **kwargs)
        if result is not None and result[1] is not None:
            result[1].a0.add_(1e-4)
        return result

    monkeypatch.setattr(attention, "fused_attention", perturbed)
    assert check.run(["replay.device=cpu"], families=("llama", "falcon")) == 1
    captured = capsys.readouterr()
    rows = table_rows(captured.out)
    assert rows["llama"][-1] == "FAIL" and float(rows["llama"][2]) > 1e-5  # the sink_mass column
    assert rows["falcon"][-1] == "ok"
    assert "1 of 2 families outside the tolerance or failing: llama" in captured.err


def test_a_family_that_raises_is_reported_not_crashed(monkeypatch, capsys):
    def broken(p, key_positions):
        raise RuntimeError("no probabilities today")

    monkeypatch.setattr(eager, "row_stats", broken)
    assert check.run(["replay.device=cpu"], families=("bloom",)) == 1
    out = capsys.readouterr().out
    assert table_rows(out)["bloom"][-1] == "error"
    assert "bloom: RuntimeError: no probabilities today" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["replay.dtype=int8"], "replay.dtype=int8: choose from auto, float32, bfloat16, float16"),
        (["replay.devise=cpu"], "replay.devise"),
        (["replay.key_positions=64"], "replay.key_positions=64: the check's probe has 64 tokens"),
        (["--fast"], "--fast: no such option"),
    ],
)
def test_bad_settings_are_one_line_usage_errors(args, message, capsys):
    assert check.run(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("sinktrace check: error: ") and message in err and err.count("\n") == 1, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_sinktrace_check_without_cuda_is_a_usage_error():
    """Through the command's own entry point (`sinktrace check`), before any model is built."""
    res = subprocess.run(
        [sys.executable, "-m", "pipeline", "check", "replay.device=cuda"], capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith("sinktrace check: error: replay.device=cuda: this torch") and res.stdout == ""
    assert res.stderr.count("\n") == 1, res.stderr


def test_tolerances_cover_every_dtype_setting():
    from pipeline.choices import DTYPES

    assert set(DTYPES) - {"auto"} == set(check.TOLERANCES)
    assert check.tolerance_for(torch.float32) == 1e-5 and check.tolerance_for(torch.bfloat16) > 1e-5
