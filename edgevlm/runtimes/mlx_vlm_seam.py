"""mlx-vlm's language models (Qwen2-VL / 2.5-VL, Qwen3-VL, Gemma 3) over edgevlm's MLX decoder folders, torch-free.

The language modules are imported one by one without mlx-vlm's packages (edgevlm/mlx_vlm_modules.py says how).

mlx-vlm is installed with `pip install --no-deps` (scripts/setup-venv.sh): its declared dependencies pull opencv,
datasets, transformers and audio packages that none of these modules import. The folders are what export/mlx.py writes
through mlx-lm (its qwen2 / qwen3 / gemma3_text layout); mlx-vlm's language models name their weights the same way."""
from __future__ import annotations

import json
import types
from pathlib import Path
from typing import Any

from ..errors import BundleError
from ..mlx_vlm_modules import INSTALL, MLX_VLM_VERSION, import_module  # noqa: F401 - re-exported (tests, callers)

# mlx-lm model_type of the exported folder (+ interleaved M-RoPE) -> mlx-vlm's family folder. Qwen2.5-VL's text
# model is Qwen2-VL's (qwen2_5_vl/language.py differs only in batched-cache bookkeeping).
FAMILIES = {("qwen2", False): "qwen2_vl", ("qwen3", True): "qwen3_vl", ("gemma3_text", False): "gemma3"}


def family_for(model_type: str | None, mrope_interleaved: bool = False) -> str | None:
    """mlx-vlm's family folder for an exported decoder, or None (a plain decoder: mlx-lm runs it)."""
    return FAMILIES.get((model_type, bool(mrope_interleaved)))


def import_language(family: str) -> types.ModuleType:
    """mlx_vlm.models.<family>.language without the packages' __init__ (no torch, no transformers)."""
    return import_module(family, "language")


def text_config(family: str, config: dict, mrope_section: list[int] | None) -> Any:
    """mlx-vlm's TextConfig from the folder's config.json (mlx-lm's keys) and the manifest's M-RoPE sections."""
    module = import_language(family)
    params = dict(config)
    if family in ("qwen2_vl", "qwen3_vl"):
        # transformers 5 writes rope_parameters, which mlx-vlm does not read: the sections come from the manifest
        params["rope_scaling"] = {"type": "mrope", "mrope_section": [int(s) for s in mrope_section]}
    else:  # gemma3_text: export/mlx.py writes the global base as rope_theta
        params["rope_global_base_freq"] = config["rope_theta"]
    return module.TextConfig.from_dict(params)


def load_language_model(folder: Path, family: str, mrope_section: list[int] | None = None) -> tuple[Any, dict]:
    """mlx-vlm's LanguageModel with the folder's weights (quantized layers where the folder has scales)."""
    import mlx.core as mx
    import mlx.nn as nn

    module = import_language(family)
    try:
        config = json.loads((folder / "config.json").read_text())
        args = text_config(family, config, mrope_section)
        weights = {}
        for file in sorted(folder.glob("*.safetensors")):
            weights.update(mx.load(str(file)))
        model = module.LanguageModel(args) if family == "gemma3" else module.LanguageModel(args, None)
        if "lm_head.weight" not in weights and hasattr(model, "lm_head"):  # gemma3: tied, but mlx-vlm keeps a head
            weights.update({k.replace("model.embed_tokens.", "lm_head."): v for k, v in weights.items()
                            if k.startswith("model.embed_tokens.")})
        quantization = config.get("quantization")
        if quantization:
            nn.quantize(model, group_size=quantization["group_size"], bits=quantization["bits"],
                        mode=quantization.get("mode", "affine"),
                        class_predicate=lambda path, m: hasattr(m, "to_quantized") and f"{path}.scales" in weights)
        model.load_weights(list(weights.items()), strict=True)
    except (OSError, KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"mlx-vlm's {family} language model cannot load {folder} ({type(exc).__name__}: "
                          f"{str(exc)[:200]}); re-export it") from None
    mx.eval(model.parameters())
    model.eval()
    return model, config


def make_cache(model) -> list:
    """One full mlx-vlm KVCache per layer (Gemma 3's local layers too, not a rotating one: truncation and snapshots
    stay exact anywhere)."""
    from mlx_vlm.models.cache import KVCache  # loaded with the language module

    return [KVCache() for _ in model.layers]


def trim_cache(cache: list, n: int) -> int:
    """Positions trimmed off every layer's end (mlx-lm's trim_prompt_cache, over mlx-vlm's caches)."""
    return [c.trim(n) for c in cache][0] if cache and all(c.is_trimmable() for c in cache) else 0


class MRopeLanguage:
    """mlx-vlm's Qwen2-VL / Qwen3-VL LanguageModel at explicit (t, row, col) positions; given position ids it keeps
    none of its own rope state (get_rope_index runs only without them)."""

    def __init__(self, model: Any, mrope_section: list[int]):
        import mlx.core as mx

        self._mx, self.model = mx, model
        head_dim = model.layers[0].self_attn.head_dim
        if sum(mrope_section) != head_dim // 2:
            raise BundleError(f"the manifest's mrope_section {list(mrope_section)} sums to {sum(mrope_section)}, but "
                              f"the MLX decoder's head_dim {head_dim} has {head_dim // 2} rotary frequencies")

    def __call__(self, positions, cache: list, inputs=None, input_embeddings=None, deepstack: list | None = None):
        """positions (L, 3) int32; inputs (1, L) ids or input_embeddings (1, L, D); deepstack: k arrays (L, D), added
        after layers 0..k-1 at every row (mlx-vlm's visual_pos_masks). Returns logits (1, L, V), unevaluated."""
        mx = self._mx
        n = positions.shape[0]
        ids = inputs if inputs is not None else mx.zeros((1, n), dtype=mx.int32)  # only its shape is read
        extra = {}
        if deepstack is not None:
            extra = dict(visual_pos_masks=mx.ones((1, n), dtype=mx.bool_), deepstack_visual_embeds=deepstack)
        position_ids = positions.T[:, None, :]  # (3, 1, L): mlx-vlm's (axis, batch, row)
        return self.model(ids, inputs_embeds=input_embeddings, cache=cache, position_ids=position_ids, **extra).logits


class Gemma3Language:
    """edgevlm's own loop over mlx-vlm's Gemma 3 layers: mlx-vlm's Gemma3Model gives every layer one mask (its VLM
    runs no bidirectional image block) and scales image rows by a bfloat16-rounded sqrt(hidden) (its projector divides
    them by it first); HF and llama.cpp scale only token embeddings, in the weights' dtype. So this embeds and scales
    the tokens, passes image rows as they are, and gives global layers causal OR "inside this image block", local
    layers the same AND the sliding window (key > query - window: a block's rows see its later rows, as HF's mask)."""

    def __init__(self, model: Any):
        import mlx.core as mx

        args = model.config
        self._mx, self.model = mx, model
        self.window, self.every = int(args.sliding_window), int(args.sliding_window_pattern)
        embedding = model.model.embed_tokens
        self.dtype = getattr(embedding, "scales", embedding.weight).dtype
        self.embed_scale = mx.array(args.hidden_size**0.5, mx.float32).astype(self.dtype)

    def __call__(self, cache: list, inputs=None, input_embeddings=None, block: bool = False):
        """Logits (1, n, V), unevaluated, of n tokens (inputs (1, n)) or image rows (input_embeddings (1, n, D));
        block: the rows are one bidirectional image block."""
        mx, inner = self._mx, self.model.model
        h = inner.embed_tokens(inputs) * self.embed_scale if input_embeddings is None else input_embeddings
        n, offset = h.shape[1], cache[0].offset
        queries = mx.arange(offset, offset + n)[:, None]
        keys = mx.arange(offset + n)[None]
        allowed = keys <= queries
        if block:
            allowed = allowed | (keys >= offset)
        local = allowed & (keys > queries - self.window)
        for i, (layer, layer_cache) in enumerate(zip(inner.layers, cache)):
            h = layer(h, allowed if (i + 1) % self.every == 0 else local, layer_cache)
        return self.model.lm_head(inner.norm(h))
