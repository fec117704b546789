"""What `edgevlm verify`'s outcome says was checked: exit 0 only when every artifact and pair was checked and passed;
a backend absent here makes the outcome incomplete (exit 3, listed) unless --allow-skips; an unknown precision is
refused, never judged by a neighbour's gate; encoders are judged at their worst tile."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from edgevlm.cli import main
from edgevlm.export.exporter import ArtifactRequest, export_checkpoint
from edgevlm.manifest import Manifest

# verify run in a fresh interpreter where MLX cannot be imported, as on a machine without it: a sys.meta_path finder
# answers for `mlx` and `mlx_lm` with empty packages, so `import mlx.core` fails (ModuleNotFoundError) while other
# libraries' availability probes (importlib.util.find_spec) still get an answer instead of an exception
HIDDEN_MLX = """
import importlib.abc, importlib.machinery, sys
class Empty(importlib.abc.Loader):
    def create_module(self, spec):
        return None
    def exec_module(self, module):
        pass
class HideMLX(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name in ("mlx", "mlx_lm"):
            return importlib.machinery.ModuleSpec(name, Empty(), is_package=True)
        return None
sys.meta_path.insert(0, HideMLX())
from edgevlm.cli import main
sys.exit(main(["verify", *sys.argv[1:]]))
"""


@pytest.fixture(scope="module")
def exact_bundle(ckpts, tmp_path_factory):
    """Exact artifacts only, so that every row is judged on random weights: ONNX fp32, F32 GGUF, fp32 MLX."""
    pytest.importorskip("mlx.core", reason="MLX is not installed here")  # CI: fails (conftest)
    return export_checkpoint(ckpts["llava-clip"], tmp_path_factory.mktemp("exact") / "bundle",
                             [ArtifactRequest("onnx", "fp32")], [ArtifactRequest("gguf", "f32"), ArtifactRequest("mlx", "fp32")],
                             max_tiles=4)


def _json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def test_every_row_checked_and_passed_is_exit_0(exact_bundle, capsys):
    code = main(["verify", str(exact_bundle), "--threads", "1", "--json"])
    out = _json(capsys.readouterr().out)
    assert code == 0 and out["status"] == "pass" and out["not_checked"] == [], out
    assert {r["artifact"] for r in out["rows"]} == {
        "tokenizer", "onnx:fp32", "gguf:f32", "mlx:fp32", "onnx:fp32 + gguf:f32", "onnx:fp32 + mlx:fp32"}


def test_a_hidden_backend_is_exit_3_listing_it_and_allow_skips_accepts_it(exact_bundle):
    run = [sys.executable, "-c", HIDDEN_MLX, str(exact_bundle), "--threads", "1", "--json"]
    result = subprocess.run(run, capture_output=True, text=True, timeout=300)
    out = _json(result.stdout)
    assert result.returncode == 3 and out["status"] == "incomplete", result.stderr
    skipped = {n["artifact"]: n["why"] for n in out["not_checked"]}
    assert set(skipped) == {"mlx:fp32", "onnx:fp32 + mlx:fp32"} and "MLX is not available" in skipped["mlx:fp32"]
    assert {r["artifact"]: r["status"] for r in out["rows"]}["gguf:f32"] == "pass"
    # --allow-skips: exit 0, and the skips are still listed (here in the table form people read)
    table = subprocess.run(run[:-1] + ["--allow-skips"], capture_output=True, text=True, timeout=300)
    assert table.returncode == 0, table.stderr
    assert "SKIPPED mlx:fp32: MLX is not available" in table.stderr
    assert "SKIPPED onnx:fp32 + mlx:fp32: MLX is not available" in table.stderr


def test_an_unknown_encoder_precision_is_refused(exact_bundle, tmp_path, capsys):
    bundle = shutil.copytree(exact_bundle, tmp_path / "b")
    manifest = Manifest.load(bundle)
    artifact = manifest.find("encoder", "onnx:fp32")
    artifact.name, artifact.precision = "onnx:fp8", "fp8"  # a precision a newer exporter might write
    (bundle / "manifest.json").write_text(manifest.to_json())
    code = main(["verify", str(bundle), "--threads", "1", "--json"])
    rows = {r["artifact"]: r for r in _json(capsys.readouterr().out)["rows"]}
    assert code == 1 and rows["onnx:fp8"]["status"] == "FAIL" and "no parity gate for onnx:fp8" in rows["onnx:fp8"]["note"]
    assert "cosine" not in rows["onnx:fp8"]  # not judged by the int8 gate (or any other)


def test_the_worst_tile_is_judged_not_the_average():
    """One tile 5% off among four exact ones: flattened over the tiles the cosine still clears an fp16 gate."""
    from edgevlm.metrics import ENCODER_GATES, cosine, worst_tile

    rng = np.random.default_rng(0)
    ref = rng.normal(size=(5, 16, 32)).astype(np.float32)
    ours = ref.copy()
    ours[3] += 0.05 * rng.normal(size=ours[3].shape).astype(np.float32) * np.abs(ref[3]).mean()
    assert cosine(ours, ref) > 0.9995
    values = worst_tile(ours, ref)
    assert values["worst_tile"] == 3 and values["cosine"] < 0.9995 and values["tiles"] == 5
    scaled = ref * np.float32(1.02)  # a scale error: cosine 1.0, norm 2% off
    assert worst_tile(scaled, ref)["cosine"] > 0.999999 and abs(worst_tile(scaled, ref)["norm_err"] - 0.02) < 1e-6
    assert not ENCODER_GATES["fp16"].passes(worst_tile(scaled, ref))
