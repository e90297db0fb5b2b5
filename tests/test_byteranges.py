"""Byte ranges read at once: merged where close, returned in the order asked, short reads refused."""

import pytest

from pipeline.checkpoints.byteranges import ONE_AT_A_TIME, ReadPlan, coalesce, read_ranges


def test_close_neighbours_merge_up_to_the_request_limit():
    plan = ReadPlan(concurrency=4, gap=10, max_request=100)
    assert coalesce([(50, 60), (0, 20), (25, 40), (200, 250)], plan) == [(0, 60), (200, 250)]
    assert coalesce([(0, 60), (65, 120)], plan) == [(0, 60), (65, 120)]  # merged, it would exceed 100 bytes
    assert coalesce([(0, 20), (25, 40)], ONE_AT_A_TIME) == [(0, 20), (25, 40)]


@pytest.mark.parametrize("plan", [ONE_AT_A_TIME, ReadPlan(concurrency=3, gap=8, max_request=64)])
def test_every_range_comes_back_in_the_order_asked(tmp_path, plan):
    data = bytes(range(256)) * 4
    path = tmp_path / "blob"
    path.write_bytes(data)
    ranges = [(700, 720), (0, 5), (10, 30), (8, 12), (1000, 1024), (300, 300)]
    assert read_ranges(str(path), ranges, plan) == [data[a:b] for a, b in ranges]


def test_a_range_past_the_end_names_the_file(tmp_path):
    path = tmp_path / "short"
    path.write_bytes(b"x" * 100)
    with pytest.raises(OSError, match="short.*shorter"):
        read_ranges(str(path), [(90, 120)])


def test_ranges_of_several_files_come_back_per_file(tmp_path):
    from pipeline.checkpoints.byteranges import read_files

    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(bytes(range(200)))
    b.write_bytes(bytes(range(255, 55, -1)))
    got = read_files({str(a): [(10, 20), (0, 3)], str(b): [(5, 9)], str(tmp_path / "c"): []}, ReadPlan(concurrency=3))
    assert got == {
        str(a): [bytes(range(10, 20)), bytes(range(3))],
        str(b): [bytes([250, 249, 248, 247])],
        str(tmp_path / "c"): [],
    }
    with pytest.raises(OSError, match="b.*shorter"):
        read_files({str(a): [(0, 1)], str(b): [(150, 260)]})
