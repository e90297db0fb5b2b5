"""The report stage: files, valid PNGs, the numbers on the page, and the CLI's text table."""

from __future__ import annotations

import re
import warnings

import pytest
from PIL import Image

from pipeline import analysis as an
from pipeline.report import default_out_dir, summary_table, write_report
from tests.cubes import constant_cube, realistic_cube, write_store

GROUP_FIGURES = (
    "sink_mass_heatmap.png",
    "emergence_curves.png",
    "heads_last_step.png",
    "sink_by_query.png",
    "training_overview.png",
    "massive_activations.png",
)


def assert_png(path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.width >= 400 and im.height >= 250, (path, im.size)


@pytest.fixture
def pair_store(tmp_path):
    keep = realistic_cube("keep")
    random = realistic_cube("random")
    keep.attrs["probe_name"], random.attrs["probe_name"] = "r64-keep", "r64-random"
    store = write_store(tmp_path / "run" / "sinks.zarr", {"r64-keep": keep, "r64-random": random})
    return store, keep, random


def test_report_writes_figures_and_page_with_the_numbers(pair_store):
    store, keep, random = pair_store
    page = write_report(str(store))
    assert page == default_out_dir(store) / "index.html"
    assert page.parent.name == "sinks.zarr.report"
    for group in ("r64-keep", "r64-random"):
        for fig in GROUP_FIGURES:
            assert_png(page.parent / f"{group}_{fig}")
    assert_png(page.parent / "first_token_r64-keep_vs_r64-random.png")

    text = page.read_text()
    for src in re.findall(r'<img src="([^"]+)"', text):
        assert (page.parent / src).is_file(), src
    assert text.count("<img") == 2 * len(GROUP_FIGURES) + 1

    # The cube is built so that layers 0, 1, 2 emerge at 3000, 5000, 8000 and layer 3 never.
    assert list(an.emergence_step(keep).values[:3]) == [3000, 5000, 8000]
    rows = re.findall(r"<tr><td>(\d)</td><td>([\d.]+)</td><td>([\d.]+)</td><td>([^<]+)</td><td>([^<]+)</td></tr>", text)
    assert len(rows) == 8  # four layers for each group, keep first (groups are sorted by name)
    keep_rows = rows[:4]
    mass = an.layer_sink_mass(keep)
    first, last = mass.isel(step=0).values, mass.isel(step=-1).values
    expected = [
        (str(i), f"{first[i]:.3f}", f"{last[i]:.3f}", e, e) for i, e in enumerate(["3000", "5000", "8000", "—"])
    ]
    assert keep_rows == expected
    # Scalars: the sink rate at the last step (18 of 24 heads), the convergence step, the failed step.
    assert f"{100 * float(an.sink_rate(keep).isel(step=-1)):.1f} %" == "75.0 %"
    assert "<td>75.0 %</td>" in text
    gu = float(an.sink_rate(keep, convention="gu").isel(step=-1))
    assert f"Gu et al. score (1 + (T-1)·m)/T &gt; 0.3</td><td>{100 * gu:.1f} %</td>" in text
    assert f"<td>{int(an.convergence_step(keep))}</td>" in text
    assert "19 done, 1 failed" in text and "step 7000: failed" in text
    # First-token section: the positional index at the last common step, per layer.
    index = an.positional_index({"r64-keep": keep, "r64-random": random}).isel(step=-1).values
    for value in index:
        assert f"<td>{value:.3f}</td>" in text
    assert 0.85 < index[0] <= 1.0 and index[3] < 0.3  # layer 0 positional, layer 3 not


def test_report_single_group_explicit_out_dir_and_empty_group(tmp_path):
    ok = constant_cube([[0.1, 0.5, 0.6], [0.1, 0.1, 0.1]], steps=(0, 500, 1000), name="only")
    waiting = constant_cube([[0.1, 0.5]], steps=(0, 10), status=["pending", "pending"], name="waiting")
    store = write_store(tmp_path / "s.zarr", {"only": ok, "waiting": waiting})
    page = write_report(str(store), str(tmp_path / "out"), eps=0.4)
    assert page == tmp_path / "out" / "index.html"
    text = page.read_text()
    assert "First token" not in text  # no random-first-token group: no comparison
    assert "eps = 0.4" in text and "<td>500</td>" in text
    assert "No done steps yet" in text
    pngs = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert pngs == sorted(f"only_{fig}" for fig in GROUP_FIGURES)  # none for the group still waiting


def test_summary_table_text():
    ds = constant_cube(
        [[0.1, 0.4, 0.2, 0.5], [0.05, 0.05, 0.05, 0.05]],
        steps=(0, 100, 300, 1000),
        status=["done", "done", "done", "done"],
    )
    table = summary_table(ds, eps=0.3)
    lines = table.splitlines()
    assert lines[0].split() == [
        "layer",
        "mass",
        "@",
        "0",
        "mass",
        "@",
        "1000",
        "first",
        ">",
        "0.3",
        "stays",
        ">",
        "0.3",
        "from",
    ]
    assert lines[1].split() == ["0", "0.100", "0.500", "100", "1000"]
    assert lines[2].split() == ["1", "0.050", "0.050", "—", "—"]
    assert lines[3].startswith("mass @ S: attention on token 0 at step S, mean over heads")
    assert "stays > 0.3 from: the step from which it never falls back" in lines[3]
    assert "4 done" in lines[4] and "50.0 % of heads" in lines[4]


def test_summary_table_ignores_failed_steps_and_handles_none_done():
    ds = constant_cube([[0.1, 0.9, 0.5]], steps=(0, 10, 20), status=["done", "done", "failed"])
    assert summary_table(ds).splitlines()[1].split() == ["0", "0.100", "0.900", "10", "10"]
    nothing = constant_cube([[0.1]], steps=(0,), status=["failed"])
    assert summary_table(nothing) == "no done steps yet (1 failed)"


def test_remote_store_needs_an_out_dir():
    with pytest.raises(ValueError, match="out_dir"):
        default_out_dir("s3://bucket/run.zarr")
    assert default_out_dir("/a/b/run.zarr/") == default_out_dir("/a/b/run.zarr")


def test_report_draws_the_circuit_recognition_and_mixing_figures(tmp_path):
    from tests.test_analysis import circuit_cube

    cube = circuit_cube()
    cube.attrs["probe_name"] = "circuit"
    store = write_store(tmp_path / "sinks.zarr", {"circuit": cube})
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. matplotlib's "No artists with labels" for an empty legend
        page = write_report(str(store))
    for fig in ("p0_circuit.png", "p0_recognition.png", "mixing.png"):
        assert_png(page.parent / f"circuit_{fig}")
    assert "No p0_circuit.png" not in page.read_text()


def test_report_of_a_cube_without_the_new_statistics_says_so(tmp_path):
    store = write_store(tmp_path / "sinks.zarr", {"old": realistic_cube("keep")})
    text = write_report(str(store)).read_text()
    for fig in ("p0_circuit.png", "p0_recognition.png", "mixing.png"):
        assert f"No {fig}: the cube lacks" in text
