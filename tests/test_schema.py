"""The cube's schema (pipeline/store/schema.py) and docs/data.md, the users' contract, name the same statistics."""

import re
from pathlib import Path

import numpy as np

from pipeline.store import schema

DATA_MD = Path(__file__).resolve().parent.parent / "docs" / "data.md"


def documented_dims() -> dict[str, tuple[str, ...]]:
    """name -> dims, from the variable table of docs/data.md's Layout section."""
    found = {}
    for line in DATA_MD.read_text().splitlines():
        cells = [c.strip() for c in line.strip().removeprefix("|").split("|", 2)]  # a meaning may hold a "|"
        if len(cells) == 3 and cells[1].startswith("step"):
            for name in re.findall(r"`(\w+)`", cells[0]):
                found[name] = tuple(d.strip() for d in cells[1].split(","))
    return found


def test_every_statistic_is_documented_with_its_dims():
    documented = documented_dims()
    for name, dims in schema.DIMS.items():
        assert documented.get(name) == ("step", *dims), name


def test_the_measure_groups_add_optional_statistics_and_loss_adds_a_step_coordinate():
    assert schema.MEASURE_GROUPS == ("outputs", "similarity", "mixing", "loss")
    added = [name for names in schema.MEASURED.values() for name in names]
    assert len(added) == len(set(added)) == 8
    assert set(added) <= set(schema.DIMS) and set(added) <= schema.OPTIONAL
    assert schema.OPTIONAL - set(added) == {"learned_sink_mass"}
    assert {d for name in schema.MEASURED["mixing"] for d in schema.DIMS[name]} == {"layer", "sink"}
    assert "loss" in schema.NUMERIC_STEP_COORDS and "loss" not in schema.DIMS


def test_step_coordinates_are_numbers_that_start_nan_or_strings_that_start_pending_or_empty():
    assert schema.NUMERIC_STEP_COORDS == ("tokens_seen", "loss")
    for name, (dtype, fill) in schema.STEP_COORDS.items():
        if name in schema.NUMERIC_STEP_COORDS:
            assert dtype == np.float64 and np.isnan(fill), name
        else:
            assert dtype == schema.STRING and fill == ("pending" if name == "status" else ""), name
