"""One description per family: every family's FamilySpec is built from the tiny checkpoints' config, processor and
tokenizer files with torch and transformers blocked from import, and the planner's image-token counts, decoder
bytes and layouts come from it and equal the exported bundles'."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from edgevlm.families.spec import ATTENTION_MODES, FamilySpec, VisionShapes
from edgevlm.layout import ImageLayout
from edgevlm.preprocess import PreprocessSpec

IMAGE_SIZES = ((100, 60), (300, 200), (32, 32))
# a meta-path finder that refuses torch and transformers: any import of either (at any depth) fails the script
BLOCKER = """
import sys
class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers"):
            raise ImportError(f"{name} is blocked: describing a family must not need it")
        return None
sys.meta_path.insert(0, Blocked())
"""
DESCRIBE = """
import json, sys
from edgevlm.families import FAMILIES, describe_checkpoint
from edgevlm.plan.bundle import PlanRequest, plan_model
from edgevlm.plan.devices import get_device
from edgevlm.plan.model import from_checkpoint

out = {}
for path in sys.argv[1:]:
    spec = describe_checkpoint(path)
    from edgevlm.decoder_arch import architecture
    if architecture(spec.decoder_architecture).export_refusal:  # BLIP-2's OPT: nothing to plan, described only
        out[path] = {"summary": spec.summary(), "images": {}}
        continue
    shapes = from_checkpoint(path)
    assert shapes.layout == spec.layout and shapes.preprocess == spec.preprocess and shapes.family == spec.family
    images = {}
    for width, height in %r:
        plan = plan_model(shapes, get_device("rtx-4060-8gb"), PlanRequest(context=512, image_size=(width, height)))
        images[f"{width}x{height}"] = {"spec": spec.image_tokens(width, height),
                                       "plan": plan["images"]["image_rows"]}
    weights = {o["decoder"]: o["memory"]["decoder_weights"] for o in plan["options"]}
    out[path] = {"summary": spec.summary(), "images": images, "decoder_weights": weights,
                 "vision_params": shapes.vision.params}
assert not any(m.split(".")[0] in ("torch", "transformers") for m in sys.modules)
print(json.dumps(out))
""" % (IMAGE_SIZES,)


@pytest.fixture(scope="module")
def qwen_ckpts(tmp_path_factory):
    import builders

    root = tmp_path_factory.mktemp("qwen-spec")
    return {**{f"qwen{v}": builders.build_qwen2_vl(root / f"qwen{v}", v) for v in ("2", "2.5")},
            "qwen3": builders.build_qwen3_vl(root / "qwen3")}


@pytest.fixture(scope="module")
def gemma_ckpt(tmp_path_factory):
    import builders_gemma3

    return builders_gemma3.build_gemma3(tmp_path_factory.mktemp("gemma-spec") / "gemma3", pan_and_scan=True)


@pytest.fixture(scope="module")
def tiny_reference(tmp_path_factory):
    """The reference model's checkpoint (LLaVA family, trained here), at the tiny recipe."""
    from edgevlm.reference.train import TINY_RECIPE, build_reference

    out = tmp_path_factory.mktemp("tiny-ref-spec") / "reference"
    build_reference(out, TINY_RECIPE)
    return out


@pytest.fixture(scope="module")
def idefics2_ckpts(tmp_path_factory):
    import builders

    root = tmp_path_factory.mktemp("idefics2-spec")
    return {f"idefics2{s}": builders.build_idefics2(root / f"idefics2{s}", splitting=bool(s)) for s in ("", "-split")}


@pytest.fixture(scope="module")
def onevision_ckpt(tmp_path_factory):
    import onevision_builder

    return onevision_builder.build_onevision(tmp_path_factory.mktemp("onevision-spec") / "llava_onevision")


@pytest.fixture(scope="module")
def blip2_ckpts(tmp_path_factory):
    import builders_blip2

    root = tmp_path_factory.mktemp("blip2-spec")
    return {"instructblip": builders_blip2.build_instructblip(root / "instructblip"),
            "blip2-opt": builders_blip2.build_blip2_opt(root / "blip2-opt")}


@pytest.fixture(scope="module")
def paligemma_ckpt(tmp_path_factory):
    from builders_paligemma import build_paligemma

    return build_paligemma(tmp_path_factory.mktemp("paligemma-spec") / "paligemma", seed=3)


@pytest.fixture(scope="module")
def described(ckpts, qwen_ckpts, gemma_ckpt, idefics2_ckpts, onevision_ckpt, blip2_ckpts, paligemma_ckpt,
              tiny_reference) -> dict:
    paths = {**{name: str(path) for name, path in ckpts.items()}, **{k: str(v) for k, v in qwen_ckpts.items()},
             "gemma3": str(gemma_ckpt), **{k: str(v) for k, v in idefics2_ckpts.items()},
             "llava_onevision": str(onevision_ckpt), **{k: str(v) for k, v in blip2_ckpts.items()},
             "paligemma": str(paligemma_ckpt), "reference": str(tiny_reference)}
    run = subprocess.run([sys.executable, "-c", BLOCKER + DESCRIBE, *paths.values()], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    return {name: report[path] for name, path in paths.items()}


def test_every_family_is_described_without_torch_or_transformers(described):
    from edgevlm.families import FAMILIES

    assert {d["summary"]["family"] for d in described.values()} == set(FAMILIES.values())
    assert {d["summary"]["architecture"] for d in described.values()} == set(FAMILIES)
    for name, d in described.items():
        summary = d["summary"]
        assert summary["image_attention"] == {"gemma3": "bidirectional", "paligemma": "prefix"}.get(name, "causal"), name
        assert (summary["mmproj_projector"] is None) != (summary["mmproj_refusal"] is None), name
        for size, counts in d["images"].items():  # the planner's image-token rows are the description's
            assert counts["plan"] == counts["spec"] > 0, (name, size)


def test_the_description_is_what_the_exported_bundles_carry(described, bundles):
    """The manifest of each exported bundle (written from the torch loader's FamilySpec) holds the layout and the
    preprocessing the torch-free description gives; the planner's decoder bytes are the GGUF's tensor bytes."""
    from edgevlm.manifest import Manifest
    from edgevlm.plan import budget

    for name, bundle in bundles.items():
        manifest = Manifest.load(bundle)
        summary = described[name]["summary"]
        assert manifest.family == summary["family"]
        assert manifest.image_layout.to_dict() == summary["image_layout"], name
        assert manifest.preprocess.to_dict() == PreprocessSpec.from_dict(summary["preprocess"]).to_dict(), name
        assert manifest.decoder.architecture == summary["decoder_architecture"], name
        for precision in ("f32", "q8_0"):
            gguf = bundle / manifest.find("decoder", f"gguf:{precision}").path
            assert described[name]["decoder_weights"][f"gguf:{precision}"] == sum(
                t.n_bytes for t in budget.read_gguf_tensors(gguf)), (name, precision)


def test_the_torch_loader_carries_the_description(ckpts, qwen_ckpts, gemma_ckpt, tiny_reference, described):
    """load() describes through the same describe(), from the HF tokenizer's table: the same spec as the files'."""
    from edgevlm.families import load_checkpoint

    paths = {**ckpts, **qwen_ckpts, "gemma3": gemma_ckpt, "reference": tiny_reference}
    for name in ("llava-clip", "internvl", "smolvlm2", "qwen2.5", "qwen3", "gemma3", "reference"):
        ckpt = load_checkpoint(paths[name])
        assert json.loads(json.dumps(ckpt.spec.summary())) == described[name]["summary"], name
        assert described[name]["vision_params"] == sum(p.numel() for p in ckpt.vision.parameters()), name


def _spec(**changes) -> FamilySpec:
    layout = ImageLayout("repeat", "<image>", "<image>", 5, 4)
    vision = VisionShapes(32, 16, 8, 1, 1, 16, 4, 4, ("multi_modal_projector.",))
    values = dict(family="llava", architecture="LlavaForConditionalGeneration",
                  preprocess=PreprocessSpec("fixed", (32, 32)), layout=layout, vision=vision,
                  decoder_architecture="llama", mmproj_projector="mlp", mmproj_refusal=None)
    return FamilySpec(**{**values, **changes})


def test_family_spec_is_validated_at_construction():
    from edgevlm.errors import CheckpointError

    assert _spec().image_tokens(640, 480) == 4 and _spec().position_scheme == "1d"
    assert ATTENTION_MODES == ("causal", "bidirectional", "prefix")
    with pytest.raises(ValueError, match="image attention"):
        _spec(image_attention="sideways")
    with pytest.raises(ValueError, match="either its mmproj projector type or why"):
        _spec(mmproj_refusal="no writer")
    with pytest.raises(ValueError, match="either its mmproj projector type or why"):
        _spec(mmproj_projector=None)
    with pytest.raises(CheckpointError, match="decoder_arch"):
        _spec(decoder_architecture="gemma9")
    with pytest.raises(CheckpointError, match="tokens per tile"):
        _spec(layout=ImageLayout("repeat", "<image>", "<image>", 5, 3))
    with pytest.raises(CheckpointError, match="positive integers"):
        VisionShapes(32, 0, 8, 1, 1, 16, 4, 4, ("p.",))


def test_inspect_reads_the_description(ckpts, described, capsys):
    from edgevlm.cli import main

    assert main(["inspect", str(ckpts["internvl"]), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    expected = described["internvl"]["summary"]
    assert summary["image_layout"] == expected["image_layout"] and summary["vision"] == expected["vision"]
    assert summary["image_attention"] == "causal" and summary["mmproj"] == expected["mmproj_projector"] == "internvl"
    assert summary["decoder"]["architecture"] == expected["decoder_architecture"] == "qwen2"


def test_support_table_covers_every_family_and_names_real_decoder_rows(capsys):
    """`inspect --supported` lists every family FAMILIES routes to, with its bridge, decoder rows that exist in
    decoder_arch, its llama.cpp projector (or why none) and what it refuses; the README names every family."""
    import json
    from pathlib import Path

    from edgevlm.cli import main
    from edgevlm.decoder_arch import ARCHITECTURES
    from edgevlm.families import FAMILIES
    from edgevlm.families.support import FamilySupport, support_rows

    rows = support_rows()
    assert set(rows) == set(FAMILIES.values())
    assert all(set(r.decoder_rows) <= set(ARCHITECTURES) for r in rows.values()), rows
    with pytest.raises(ValueError, match="leaves a field empty"):
        FamilySupport("x", "x", "", ("llama",), "mlp", "-")
    assert main(["inspect", "--supported", "--json"]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {r["family"] for r in info["support"]} == set(FAMILIES.values())
    assert main(["inspect", "--supported"]) == 0
    assert "Perceiver" in capsys.readouterr().out
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert all(f"family `{name}`" in readme for name in rows), "a family is missing from the README's status table"
