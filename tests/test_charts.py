"""``blip2_internlm.tools.charts``: the bench's scaling chart is a self-contained SVG that draws what it is given.

The SVG is parsed, not compared to a stored file: each series is one polyline through its points, in x
order, higher values drawn higher, every series named in the legend.
"""

import xml.etree.ElementTree as ET

from blip2_internlm.tools.charts import line_chart, panels

SVG = "{http://www.w3.org/2000/svg}"


def _polylines(svg: str) -> list[list[tuple[float, float]]]:
    root = ET.fromstring(svg)
    return [
        [tuple(map(float, pair.split(","))) for pair in line.get("points").split()]
        for line in root.iter(f"{SVG}polyline")
    ]


def test_each_series_is_one_polyline_through_its_points_in_x_order():
    svg = line_chart({"a": [(4, 1.0), (1, 3.0), (2, 2.0)], "b": [(1, 0.5), (4, 0.5)]}, "t", "x", "y")
    a, b = _polylines(svg)
    assert len(a) == 3 and len(b) == 2
    assert [x for x, _ in a] == sorted(x for x, _ in a)
    # SVG's y grows downwards: the largest value is the highest point
    assert min(a, key=lambda p: p[1]) == a[0]  # x=1 has y=3.0
    assert a[-1][1] > a[1][1] > a[0][1]


def test_a_log_x_axis_spaces_doublings_evenly():
    [line] = _polylines(line_chart({"s": [(1, 1), (2, 1), (4, 1), (8, 1)]}, "t", "x", "y", log_x=True))
    gaps = [b[0] - a[0] for a, b in zip(line, line[1:], strict=False)]
    assert gaps[0] > 0 and max(gaps) - min(gaps) <= 0.2  # coordinates are written to 0.1 px
    [linear] = _polylines(line_chart({"s": [(1, 1), (2, 1), (4, 1), (8, 1)]}, "t", "x", "y"))
    assert linear[1][0] - linear[0][0] < linear[3][0] - linear[2][0]


def test_series_names_and_titles_are_escaped_text_in_the_legend():
    svg = line_chart({"ours <fp32> & co": [(1, 2.0)], "LAVIS": [(1, 1.0)]}, "VQA, beam 5", "batch", "images/s")
    texts = [node.text for node in ET.fromstring(svg).iter(f"{SVG}text")]
    assert "ours <fp32> & co" in texts and "LAVIS" in texts and "VQA, beam 5" in texts


def test_a_chart_without_points_says_so():
    svg = line_chart({"a": [], "b": []}, "empty", "x", "y")
    assert _polylines(svg) == []
    assert "no data" in [node.text for node in ET.fromstring(svg).iter(f"{SVG}text")]


def test_panels_place_charts_side_by_side_in_one_document():
    charts = [line_chart({"s": [(1, float(i)), (2, 1.0)]}, f"c{i}", "x", "y", width=300) for i in range(3)]
    root = ET.fromstring(panels(charts, "all", width=300))
    assert root.get("width") == "900"
    offsets = [g.get("transform") for g in root.findall(f"{SVG}g")]
    assert offsets == ["translate(0 24)", "translate(300 24)", "translate(600 24)"]


def test_few_points_are_marked_with_their_values_a_dense_curve_is_a_line_alone():
    few = ET.fromstring(line_chart({"s": [(1, 2.0), (2, 3.0), (4, 5.0)]}, "t", "x", "y"))
    assert [c.find(f"{SVG}title").text for c in few.iter(f"{SVG}circle")] == ["s: 1, 2", "s: 2, 3", "s: 4, 5"]
    dense = ET.fromstring(line_chart({"loss": [(i / 100, 1 / (i + 1)) for i in range(100)]}, "t", "x", "y"))
    assert list(dense.iter(f"{SVG}circle")) == [] and len(_polylines(ET.tostring(dense, encoding="unicode"))[0]) == 100
