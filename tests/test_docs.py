"""The README is a front page and the docs hold no stale numbers: docs/benchmarks.md and the README's headline block
are exactly what benchmarks/render_docs.py makes of the committed results, and every relative link resolves.
Pure Python: no model, no backend."""
from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _render_docs():
    """benchmarks/ is not a package: load the script as a module (registered first, as dataclasses need)."""
    if "render_docs" not in sys.modules:
        spec = importlib.util.spec_from_file_location("render_docs", ROOT / "benchmarks" / "render_docs.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["render_docs"] = module
        spec.loader.exec_module(module)
    return sys.modules["render_docs"]


def _markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) < 300, f"README.md has {len(lines)} lines; move detail into docs/"


def test_benchmarks_doc_is_what_the_results_give():
    render = _render_docs()
    assert (ROOT / "docs" / "benchmarks.md").read_text() == render.render_benchmarks(ROOT), \
        "docs/benchmarks.md is not what benchmarks/results gives: run python benchmarks/render_docs.py"


def test_readme_headline_is_what_the_results_give():
    render = _render_docs()
    readme = (ROOT / "README.md").read_text()
    assert render.readme_with_headline(readme, render.render_headline(ROOT)) == readme, \
        "the README's headline block is not what benchmarks/results/w1 gives: run python benchmarks/render_docs.py"


def test_readme_fuzz_table_is_what_the_results_give():
    render = _render_docs()
    readme = (ROOT / "README.md").read_text()
    assert render.readme_with_fuzz(readme, render.render_fuzz(ROOT)) == readme, \
        "the README's fuzz block is not what benchmarks/results/fuzz gives: run python benchmarks/render_docs.py"
    assert readme.count(render.FUZZ_START) == 1 and "seeded fuzzers" not in readme  # one table, no older one beside it


def test_readme_peers_table_is_what_the_results_give():
    render = _render_docs()
    readme = (ROOT / "README.md").read_text()
    assert render.readme_with_peers(readme, render.render_peers(ROOT)) == readme, \
        "the README's peers block is not what benchmarks/results/w1-peers gives: run python benchmarks/render_docs.py"
    block = readme[readme.index(render.PEERS_START):readme.index(render.PEERS_END)]
    # every peer of the run is in it: the ones with numbers and the ones with the reason they have none
    assert "peer: mlx-vlm" in block and "peer: onnxruntime-genai" in block and "skipped: its model builder" in block


def test_every_results_file_is_shown_or_retired_by_a_newer_one():
    render = _render_docs()
    render.check_entries(ROOT)  # raises naming the file
    shown = {entry.path for entry in render.SHOWN}
    assert shown and not shown & {entry.path for entry in render.RETIRED}


def _results_copy(tmp_path: Path) -> Path:
    import shutil

    shutil.copytree(ROOT / "benchmarks" / "results", tmp_path / "benchmarks" / "results")
    return tmp_path


def test_a_results_file_nobody_listed_stops_the_render(tmp_path):
    render = _render_docs()
    root = _results_copy(tmp_path)
    (root / "benchmarks" / "results" / "w9").mkdir()
    (root / "benchmarks" / "results" / "w9" / "bench.json").write_text('{"date": "2026-12-02T00:00:00+00:00"}')
    with pytest.raises(ValueError, match="w9/bench.json is in neither"):
        render.render_benchmarks(root)


def test_a_retired_result_newer_than_its_replacement_stops_the_render(tmp_path):
    """`make bench` rewrites w1-split and w2: once newer than what retired them, they must be shown again."""
    render = _render_docs()
    root = _results_copy(tmp_path)
    bench = root / "benchmarks" / "results" / "w2" / "bench.json"
    bench.write_text(bench.read_text().replace('"date": "2026-11-22T10:24:16+00:00"',
                                               '"date": "2026-12-05T10:24:16+00:00"'))
    with pytest.raises(ValueError, match="w2 .* is not older than"):
        render.render_benchmarks(root)


def test_recorded_commit_and_flags_appear_in_the_header(tmp_path):
    render = _render_docs()
    root = _results_copy(tmp_path)
    bench = root / "benchmarks" / "results" / "w1" / "bench.json"
    bench.write_text(bench.read_text().replace('"cpu": "AMD EPYC",', '"cpu": "AMD EPYC", "commit": "abc1234", '
                                               '"cpu_flags": "fpu sse4_2 avx avx2 fma f16c",', 1))
    line = render.header(root, render.SHOWN[0])
    assert "**Commit:** abc1234" in line and "**CPU flags:** sse4_2 avx avx2 fma f16c" in line


def _anchors(md: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"```.*?```", "", md.read_text(), flags=re.S)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
            for heading in re.findall(r"^#+ (.+)$", text, flags=re.M)}


def test_every_relative_link_points_to_an_existing_file():
    broken = []
    for md in _markdown_files():
        text = re.sub(r"```.*?```", "", md.read_text(), flags=re.S)  # links inside code blocks are not links
        for target in LINK.findall(text):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):
                continue  # http:, mailto:
            file, _, anchor = target.partition("#")
            path = (md.parent / file).resolve() if file else md
            if not path.exists():
                broken.append(f"{md.relative_to(ROOT)}: {target}")
            elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
                broken.append(f"{md.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, broken


# docs/parity-ladder.md margin table: (artifact, metric) -> the row of benchmarks/results/gates/reference-correct.json
MARGIN_ROWS = {
    ("encoder fp32", "max_rel_err"): ("onnx:fp32", "max_rel_err"),
    ("encoder fp16", "norm_err"): ("onnx:fp16", "norm_err"),
    ("encoder int8", "norm_err"): ("onnx:int8", "norm_err"),
    **{(a, "nmse"): (a, "nmse") for a in ("gguf:q8_0", "gguf:q6_k", "gguf:q5_k_m", "gguf:q4_k_m", "gguf:q4_0",
                                          "mlx:8bit", "mlx:4bit")},
    ("pair int8 + gguf:f32", "nmse"): ("onnx:int8 + gguf:f32", "nmse"),
    ("pair int8 + gguf:q4_0", "nmse"): ("onnx:int8 + gguf:q4_0", "nmse"),
    ("pair int8 + mlx:4bit", "nmse"): ("onnx:int8 + mlx:4bit", "nmse"),
}


def _printed_matches(printed: str, value: float) -> bool:
    """`printed` is `value` written to its printed digits (within half a unit of the last digit, 1% slack)."""
    from decimal import Decimal

    unit = 10.0 ** Decimal(printed).as_tuple().exponent  # 5.7e-7 -> 1e-8; 0.013 -> 1e-3
    return abs(float(printed) - value) <= 0.505 * unit


def test_parity_ladder_margin_table_is_what_gate_margins_measured():
    """The 'correct' column of the margin table is what benchmarks/gate_margins.py wrote (the gates' calibration)."""
    import json

    rows = json.loads((ROOT / "benchmarks/results/gates/reference-correct.json").read_text())
    assert {"command", "date", "commit", "cpu", "cpu_flags"} <= set(rows["run"])
    measured = rows["results"]["correct"]["rows"]
    table = {}
    for line in (ROOT / "docs/parity-ladder.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and (cells[0], cells[1]) in MARGIN_ROWS and (cells[0], cells[1]) not in table:
            table[(cells[0], cells[1])] = cells[2]  # the trained model's table comes first
    assert set(table) == set(MARGIN_ROWS), set(MARGIN_ROWS) - set(table)
    for key, printed in table.items():
        artifact, metric = MARGIN_ROWS[key]
        assert _printed_matches(printed, measured[artifact][metric]), (key, printed, measured[artifact][metric])
    assert not _printed_matches("5.8e-6", 5.0e-6) and _printed_matches("0.013", 0.0131)
