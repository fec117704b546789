"""manifest.json validated field by field before anything reads it: types, ranges, enumerations, required keys,
artifact paths that stay inside the bundle, and the cross-field facts the runtimes rely on. Every failure is one
BundleError line naming the field, the bad value and what was expected.

Rule for unknown keys: refused in every section whose fields the runtime reads (a typo must not silently become a
default); `source` and each artifact's `details` are free-form information and may hold anything JSON."""
from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Any, Callable

from .errors import BundleError

Check = Callable[[Any], str | None]  # returns what was expected, or None when the value is fine
SHA256 = re.compile(r"^[0-9a-f]{64}$")
# artifact name prefix -> (format, the roles it may have); an MLX folder is a decoder or the vision half
ARTIFACT_FORMATS = {"onnx": ("onnx", ("encoder",)), "gguf": ("gguf", ("decoder",)), "mlx": ("mlx", ("decoder", "encoder")),
                    "tensorrt": ("tensorrt", ("engine",)), "tokenizer": ("hf-tokenizer", ("tokenizer",)),
                    "mmproj": ("gguf-mmproj", ("encoder",))}


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def integer(lo: int | None = None, hi: int | None = None) -> Check:
    def check(v):
        ok = isinstance(v, int) and not isinstance(v, bool) and (lo is None or v >= lo) and (hi is None or v <= hi)
        return None if ok else f"an integer{f' >= {lo}' if lo is not None else ''}{f' <= {hi}' if hi is not None else ''}"
    return check


def number(positive: bool = False) -> Check:
    def check(v):
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")
        return None if ok and (not positive or v > 0) else ("a positive number" if positive else "a number")
    return check


def string(choices: tuple[str, ...] | None = None, max_len: int = 4096) -> Check:
    def check(v):
        if choices is not None:
            return None if v in choices else f"one of {', '.join(choices)}"
        return None if isinstance(v, str) and 0 < len(v) <= max_len else f"a non-empty string of at most {max_len} characters"
    return check


def boolean(v) -> str | None:
    return None if isinstance(v, bool) else "true or false"


def text(v) -> str | None:  # a chat template: any string, long ones included
    return None if isinstance(v, str) else "a string"


def optional(check: Check) -> Check:
    def wrapped(v):
        return None if v is None else (None if check(v) is None else f"null or {check(v)}")
    return wrapped


def list_of(check: Check, length: int | None = None, min_length: int = 0) -> Check:
    def wrapped(v):
        if not isinstance(v, list) or (length is not None and len(v) != length) or len(v) < min_length:
            return f"a list of {length if length is not None else f'at least {min_length}'} items"
        bad = next((check(x) for x in v if check(x) is not None), None)
        return None if bad is None else f"a list whose items are {bad}"
    return wrapped


def shape(leading: str, dims: int) -> Check:
    def check(v):
        ok = isinstance(v, list) and len(v) == dims + 1 and v[0] == leading and all(integer(1)(d) is None for d in v[1:])
        return None if ok else f"[{leading!r}, then {dims} positive integers]"
    return check


def relative_path(v) -> str | None:
    """A POSIX path inside the bundle: not absolute, no '..', no backslashes or drive letters."""
    expected = "a relative path inside the bundle (no leading '/', no '..')"
    if not isinstance(v, str) or not v or len(v) > 1024 or "\\" in v or "\x00" in v or ":" in v:
        return expected
    path = PurePosixPath(v)
    too_long = any(len(part.encode()) > 255 for part in path.parts)  # the file system's name limit
    return None if not path.is_absolute() and ".." not in path.parts and not too_long else expected


def free_form(v) -> str | None:
    return None if isinstance(v, dict) else "an object"


def graph_input(v) -> str | None:
    """One input of a grid encoder's graph: {"name", "dtype", "shape"}, axes named by strings or sized by integers."""
    expected = 'an object {"name": string, "dtype": "float32" or "int64", "shape": [axis name or size, ...]}'
    if not isinstance(v, dict) or set(v) != {"name", "dtype", "shape"} or string(max_len=256)(v["name"]) is not None:
        return expected
    dims_ok = isinstance(v["shape"], list) and 1 <= len(v["shape"]) <= 4 and all(
        integer(1)(d) is None or string(max_len=64)(d) is None for d in v["shape"])
    return None if v["dtype"] in ("float32", "int64") and dims_ok else expected


def vision_grid(v) -> str | None:
    """A grid encoder's vision numbers (edgevlm/vision_grid.VisionGrid)."""
    expected = ("an object with positive integers patch_size, temporal_patch_size, merge_size, in_channels, an integer "
                "window_size >= 0, a list fullatt_block_indexes and optionally an integer position_grid >= 0")
    fields = {"patch_size": integer(1, 1024), "temporal_patch_size": integer(1, 64), "merge_size": integer(1, 64),
              "in_channels": integer(1, 64), "window_size": integer(0, 1 << 16),
              "fullatt_block_indexes": list_of(integer(0, 1024))}
    optional_fields = {"position_grid": integer(0, 1 << 12)}  # Qwen3-VL's learned position table side
    if (not isinstance(v, dict) or not set(fields) <= set(v) <= set(fields) | set(optional_fields)
            or any(check(v[k]) is not None for k, check in {**fields, **optional_fields}.items() if k in v)):
        return expected
    return None


def _check_grid_encoder(where: str, encoder: dict, preprocess: dict) -> None:
    """A grid encoder's contract agrees with itself and with the preprocessing that feeds it."""
    numbers = encoder.get("vision_grid")
    names = [i["name"] for i in encoder.get("inputs", [])]
    if numbers is None or encoder["input_name"] not in names:
        raise BundleError(f"{where}: a grid encoder needs encoder.vision_grid and encoder.inputs naming "
                          f"encoder.input_name {encoder['input_name']!r} (inputs: {names})")
    if preprocess.get("resize_rule") != "qwen2vl":
        raise BundleError(f"{where}: a grid encoder needs preprocess.resize_rule 'qwen2vl', got "
                          f"{_show(preprocess.get('resize_rule'))}")
    for key in ("patch_size", "temporal_patch_size", "merge_size"):
        if preprocess.get(key) != numbers[key]:
            raise BundleError(f"{where}: preprocess.{key} {_show(preprocess.get(key))} differs from the encoder's "
                              f"vision_grid.{key} {numbers[key]}; re-export the bundle")
    patch_dim = numbers["in_channels"] * numbers["temporal_patch_size"] * numbers["patch_size"] ** 2
    if encoder["input_shape"] != ["patches", patch_dim]:
        raise BundleError(f"{where}: encoder.input_shape is {_show(encoder['input_shape'])}; expected "
                          f"['patches', {patch_dim}] (in_channels x temporal_patch_size x patch_size^2)")


def _section(where: str, name: str, data: Any, fields: dict[str, tuple[Check, bool]]) -> dict:
    if not isinstance(data, dict):
        raise BundleError(f"{where}: {name} is {_show(data)}; expected an object")
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise BundleError(f"{where}: {name} has unknown field {unknown[0]!r}; expected only {', '.join(fields)}")
    for key, (check, required) in fields.items():
        if key not in data:
            if required:
                raise BundleError(f"{where}: {name}.{key} is missing; re-export the bundle")
            continue
        expected = check(data[key])
        if expected is not None:
            raise BundleError(f"{where}: {name}.{key} is {_show(data[key])}; expected {expected}")
    return data


def validate(data: Any, where: str) -> None:
    from .decoder_arch import ARCHITECTURES
    from .layout import LAYOUT_KINDS
    from .positions import IMAGE_ATTENTION, POSITION_SCHEMES
    from .preprocess import RESAMPLE, RESIZE_RULES

    if not isinstance(data, dict):
        raise BundleError(f"{where}: the manifest is {_show(data)}; expected an object")
    _section(where, "manifest", data, {
        "format": (string(), True), "format_version": (integer(), True), "edgevlm_version": (text, False),
        "family": (string(), True), "source": (free_form, True), "preprocess": (free_form, True),
        "image_layout": (free_form, True), "encoder": (free_form, True), "decoder": (free_form, True),
        "tokenizer": (free_form, True), "artifacts": (list_of(free_form), True),
        "video": (optional(free_form), False),
    })
    size = integer(1, 1 << 24)  # generous for any real model, and inside the 32-bit ints the C libraries take
    decoder = _section(where, "decoder", data["decoder"], {
        "architecture": (string(tuple(ARCHITECTURES)), True), "hidden_size": (size, True),
        "n_layers": (size, True), "n_heads": (size, True), "n_kv_heads": (size, True),
        "head_dim": (size, True), "intermediate_size": (size, True), "vocab_size": (size, True),
        "context_length": (size, True), "rms_norm_eps": (number(positive=True), True),
        "rope_theta": (number(positive=True), True), "rope_scaling": (optional(free_form), False),
        "tie_word_embeddings": (boolean, False), "position_scheme": (string(POSITION_SCHEMES), False),
        "image_attention": (string(IMAGE_ATTENTION), False),
        "mrope_section": (optional(list_of(integer(0, 1 << 16))), False), "spatial_merge_size": (optional(integer(1, 64)), False),
        "sliding_window": (optional(size), False), "global_every": (optional(integer(1, 1024)), False),
        "rope_local_theta": (optional(number(positive=True)), False),
    })
    vocab = decoder["vocab_size"]
    token_id = integer(0, vocab - 1)
    grid = isinstance(data["encoder"], dict) and data["encoder"].get("kind") == "grid"
    _section(where, "encoder", data["encoder"], {
        "input_name": (string(max_len=256), True), "output_name": (string(max_len=256), True),
        "input_shape": (shape("patches", 1) if grid else shape("tiles", 3), True),
        "output_shape": (shape("merged", 1) if grid else shape("tiles", 2), True),
        "max_tiles": (integer(1, 1 << 16), True), "dtype": (string(("float32",)), False),
        "kind": (string(("tiles", "grid")), False), "inputs": (list_of(graph_input), False),
        "dynamic_axes": (free_form, False), "vision_grid": (optional(vision_grid), False),
        "row_slices": (integer(1, 64), False), "instruction": (optional(free_form), False),
    })
    _section(where, "image_layout", data["image_layout"], {
        "kind": (string(LAYOUT_KINDS), True), "placeholder": (string(max_len=256), True),
        "image_token": (string(max_len=256), True), "image_token_id": (token_id, True),
        "tokens_per_tile": (integer(1, 1 << 20), True), "fake_token": (optional(string(max_len=256)), False),
        "global_token": (optional(string(max_len=256)), False), "row_col_format": (optional(string(max_len=256)), False),
        "start_token": (optional(string(max_len=256)), False), "end_token": (optional(string(max_len=256)), False),
    })
    pixels = integer(1, 16384)  # image sides in pixels
    _section(where, "preprocess", data["preprocess"], {
        "resize_rule": (string(RESIZE_RULES), True), "tile_size": (list_of(pixels, 2), True),
        "resample": (string(tuple(RESAMPLE)), False), "rescale_factor": (number(positive=True), False),
        "image_mean": (list_of(number(), 3), False), "image_std": (list_of(number(positive=True), 3), False),
        "shortest_edge": (optional(pixels), False), "longest_edge": (optional(pixels), False),
        "image_splitting": (boolean, False), "max_tiles": (integer(1, 1 << 16), False),
        "min_tiles": (integer(1, 1 << 16), False), "patch_size": (integer(0, 1024), False),
        "temporal_patch_size": (integer(0, 64), False), "merge_size": (integer(0, 64), False),
        "min_pixels": (integer(0, 1 << 30), False), "max_pixels": (integer(0, 1 << 30), False),
        "pan_and_scan_min_crop": (integer(0, 16384), False), "pan_and_scan_min_ratio": (number(), False),
        "grid_pinpoints": (list_of(list_of(pixels, 2)), False), "max_pooled_tiles": (integer(0, 1 << 16), False),
    })
    _section(where, "tokenizer", data["tokenizer"], {
        "path": (relative_path, True), "chat_template": (optional(text), False),
        "stop_token_ids": (list_of(token_id), False), "bos_token_id": (optional(token_id), False),
        "eos_token_id": (optional(token_id), False),
    })
    names = set()
    for i, artifact in enumerate(data["artifacts"]):
        label = f"artifacts[{i}]"
        _section(where, label, artifact, {
            "name": (string(max_len=128), True), "role": (string(("encoder", "decoder", "tokenizer", "engine")), True),
            "format": (string(tuple(f for f, _ in ARTIFACT_FORMATS.values())), True), "precision": (string(max_len=64), True),
            "path": (relative_path, True), "files": (list_of(free_form, min_length=1), True), "details": (free_form, False),
        })
        optimized = artifact.get("details", {}).get("cpu_optimized")  # the one detail a runtime opens
        if optimized is not None and (relative_path(optimized) is not None
                                      or optimized not in [f.get("path") for f in artifact["files"]]):
            raise BundleError(f"{where}: {label}.details.cpu_optimized is {_show(optimized)}; expected the path of one "
                              "of the artifact's files")
        kind = artifact["name"].split(":")[0]
        expected_format, expected_roles = ARTIFACT_FORMATS.get(kind, (None, ()))
        if artifact["format"] != expected_format or artifact["role"] not in expected_roles:
            raise BundleError(f"{where}: {label} {artifact['name']!r} has format {artifact['format']!r} and role "
                              f"{artifact['role']!r}; a {kind!r} artifact is format {expected_format!r}, role "
                              f"{' or '.join(map(repr, expected_roles)) or None}")
        # unique per role: "mlx:fp16" names both an MLX decoder and an MLX vision half (runtimes look up role + name)
        if (artifact["role"], artifact["name"]) in names:
            raise BundleError(f"{where}: {label}: {artifact['role']} artifact {artifact['name']!r} appears twice")
        names.add((artifact["role"], artifact["name"]))
        for j, entry in enumerate(artifact["files"]):
            _section(where, f"{label}.files[{j}]", entry, {
                "path": (relative_path, True), "sha256": (lambda v: None if isinstance(v, str) and SHA256.match(v)
                                                          else "64 lowercase hex digits", True),
                "bytes": (integer(0), True),
            })
    # cross-field facts the runtimes rely on
    encoder, layout = data["encoder"], data["image_layout"]
    slices = encoder.get("row_slices", 1)
    if slices > decoder["n_layers"] + 1:
        raise BundleError(f"{where}: encoder.row_slices {slices} needs {slices - 1} DeepStack layers but the decoder "
                          f"has {decoder['n_layers']}")
    if encoder["output_shape"][-1] != slices * decoder["hidden_size"]:
        raise BundleError(f"{where}: encoder.output_shape width {encoder['output_shape'][-1]} differs from "
                          f"encoder.row_slices x decoder.hidden_size = {slices} x {decoder['hidden_size']}; the image "
                          "rows could not enter the decoder")
    if grid:
        _check_grid_encoder(where, encoder, data["preprocess"])
    elif encoder["output_shape"][1] != layout["tokens_per_tile"]:
        raise BundleError(f"{where}: encoder.output_shape gives {encoder['output_shape'][1]} tokens per tile but "
                          f"image_layout.tokens_per_tile is {layout['tokens_per_tile']}")
    channels = 4 if data["preprocess"].get("resize_rule") == "idefics2" else 3  # idefics2: + the pixel mask
    expected_input = ["tiles", channels, *data["preprocess"]["tile_size"]]
    if not grid and encoder["input_shape"] != expected_input:
        raise BundleError(f"{where}: encoder.input_shape is {_show(encoder['input_shape'])}; expected {expected_input} "
                          f"({channels} channels at preprocess.tile_size)")
    tokenizers = [a for a in data["artifacts"] if a["role"] == "tokenizer"]
    if tokenizers and tokenizers[0]["path"] != data["tokenizer"]["path"]:
        raise BundleError(f"{where}: tokenizer.path {data['tokenizer']['path']!r} is not the tokenizer artifact's path "
                          f"{tokenizers[0]['path']!r}")
