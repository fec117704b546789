"""Decoder backend on MLX: token ids, or `input_embeddings` for image rows, into a KV cache per layer; truncation
by trimming the caches, snapshots with `copy.deepcopy` of the cache (KVCache has no copy()).

Plain decoders (Llama, Qwen2, ...) run on mlx-lm's model and prompt cache, at the cache offset. The VL families run
on mlx-vlm's language models (mlx_vlm_seam.py): with `mrope_section` (Qwen2-VL / 2.5-VL; Qwen3-VL interleaved, with
DeepStack slices) at the segments' own (n, 3) positions: the cache holds `n_past` rows while the sequence continues
at `next_position`, which is not n_past after an image; Gemma 3 with its image blocks bidirectional."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import BundleError
from ..backends import require_mlx
from .base import Decoder, DecoderState, Segment
from .mlx_vlm_seam import family_for


class MlxDecoder(Decoder):
    name = "mlx"

    def __init__(self, folder: str | Path, n_ctx: int, mrope_section: list[int] | None = None,
                 artifact_id: str = "mlx", mrope_interleaved: bool = False, deepstack_layers: int = 0,
                 image_attention: str = "causal"):
        """mrope_interleaved / deepstack_layers: Qwen3-VL (the decoder row's rotary layout; k DeepStack slices after
        each image row's main embedding, as the manifest's encoder.row_slices says)."""
        folder = Path(folder)
        model_type = _model_type(folder)
        family = family_for(model_type, mrope_interleaved) if (mrope_section or model_type == "gemma3_text") else None
        require_mlx(mlx_lm=family is None)  # the VL families never import mlx_lm (which imports torch)
        import mlx.core as mx

        self._mx = mx
        self.deepstack_layers = int(deepstack_layers)
        if self.deepstack_layers and not mrope_section:
            raise BundleError("DeepStack rows run through the M-RoPE forward only (Qwen3-VL); the manifest lacks "
                              "decoder.mrope_section")
        if mrope_section and family is None:
            wanted = "qwen3" if mrope_interleaved else "qwen2"
            raise BundleError(f"{'interleaved ' if mrope_interleaved else ''}M-RoPE runs over mlx-vlm's "
                              f"{wanted} layout; this folder is {model_type!r}")
        if image_attention != "causal" and family != "gemma3" and model_type != "gemma2":
            raise BundleError(f"the MLX decoder runs {image_attention} image attention only for Gemma 3 (gemma3_text) "
                              f"and Gemma 2; this folder is {model_type!r}")
        self._mrope = self._gemma3 = self._gemma2 = None
        if family is not None:  # the VL families: mlx-vlm's language models (mlx_vlm_seam.py)
            from . import mlx_vlm_seam

            self.model, self.config = mlx_vlm_seam.load_language_model(folder, family, mrope_section)
            self._make_cache = lambda: mlx_vlm_seam.make_cache(self.model)
            self._trim = lambda n: mlx_vlm_seam.trim_cache(self.cache, n)
            if family == "gemma3":
                self._gemma3 = mlx_vlm_seam.Gemma3Language(self.model)
            else:
                self._mrope = mlx_vlm_seam.MRopeLanguage(self.model, [int(s) for s in mrope_section])
        else:  # plain decoders: mlx-lm's own model and prompt cache
            import mlx_lm.models.cache as lm_cache
            from mlx_lm.utils import load_model

            try:
                self.model, self.config = load_model(folder)
            except Exception as exc:  # noqa: BLE001 - mlx-lm's own errors for a malformed folder: the bundle's problem
                raise BundleError(f"mlx-lm cannot load {folder} ({type(exc).__name__}: {str(exc)[:200]}); "
                                  "re-export it") from None
            self._make_cache = lambda: lm_cache.make_prompt_cache(self.model)
            self._trim = lambda n: lm_cache.trim_prompt_cache(self.cache, n) if lm_cache.can_trim_prompt_cache(
                self.cache) else 0
            if model_type == "gemma2":  # PaliGemma 2: mlx_gemma2.py (window, prefix, capping) over mlx-lm's layers
                from .mlx_gemma2 import Gemma2Forward

                self._gemma2 = Gemma2Forward(self.model, self.config.get("sliding_window"))
                self._make_cache = self._gemma2.make_cache
        self.cache = self._make_cache()
        self.n_ctx = int(n_ctx)
        self.n_batch = self.n_ctx  # one call takes a whole segment
        self.artifact_id = artifact_id
        self.position_scheme = "mrope" if mrope_section else "1d"
        self._logits: np.ndarray | None = None
        self.n_past = 0
        self.next_position = 0
        self.vocab_size = int(self.config["vocab_size"])
        self.device = str(mx.default_device())
        embedding = self.model.model.embed_tokens
        self.dtype = getattr(embedding, "scales", embedding.weight).dtype  # quantized: the dtype of its scales
        self.image_attention = image_attention

    def prefill_chunks(self, segments: list[Segment]) -> Iterator[int]:
        """The whole prompt as one chunk: mlx evaluates lazily, so the segments' calls run as one graph."""
        mx = self._mx
        logits, total = None, sum(len(s) for s in segments)
        if self._gemma2 is not None:  # one call for all segments (a prefix-LM prompt is one block)
            logits, segments = self._prefill_gemma2(segments), []
        for segment in segments:
            if self._mrope is not None:
                logits = self._prefill_mrope(segment)
                continue
            n = len(segment)
            # 1-D models take RoPE positions from the cache offset: a segment must continue the sequence there
            expected = np.arange(self.n_past, self.n_past + n)
            if segment.positions.ndim != 1 or not np.array_equal(segment.positions, expected):
                raise BundleError("the MLX model places tokens at its cache offset; this segment's positions do not "
                                  "continue the sequence there (a position scheme the MLX backend cannot run)")
            if self._gemma3 is not None:
                logits = self._prefill_gemma3(segment)
            elif segment.token_ids is not None:
                logits = self.model(mx.array(segment.token_ids.astype(np.int32))[None], cache=self.cache)
            else:
                # mlx-lm uses `inputs` only for its shape when input_embeddings are given; rows enter in the
                # model's own dtype, as its token embeddings do
                embeds = mx.array(np.ascontiguousarray(segment.embeds, dtype=np.float32))[None].astype(self.dtype)
                logits = self.model(mx.zeros((1, n), dtype=mx.int32), cache=self.cache, input_embeddings=embeds)
            self.n_past += n
            self.next_position = self.n_past
        last = logits[0, -1].astype(mx.float32)
        mx.eval(last)
        self._logits = np.array(last)
        yield total

    def _prefill_gemma2(self, segments: list[Segment]):
        """All segments in one call: into an empty sequence with prefix attention they are the prompt, one block."""
        mx = self._mx
        n = sum(len(s) for s in segments)
        positions = np.concatenate([s.positions for s in segments])
        if positions.ndim != 1 or not np.array_equal(positions, np.arange(self.n_past, self.n_past + n)):
            raise BundleError("mlx-lm places tokens at its cache offset; these positions do not continue the sequence")
        h = mx.concatenate([self._gemma2.embed(mx.array(s.token_ids.astype(np.int32))[None]) if s.token_ids is not None
                            else mx.array(np.ascontiguousarray(s.embeds, dtype=np.float32))[None].astype(self.dtype)
                            for s in segments], axis=1)
        block = self.image_attention == "prefix" and self.n_past == 0
        logits = self._gemma2(self.cache, h, block=block)
        self.n_past += n
        self.next_position = self.n_past
        return logits

    def _prefill_gemma3(self, segment: Segment):
        mx = self._mx
        if segment.token_ids is not None:
            return self._gemma3(self.cache, inputs=mx.array(segment.token_ids.astype(np.int32))[None])
        rows = mx.array(np.ascontiguousarray(segment.embeds, dtype=np.float32))[None].astype(self.dtype)
        return self._gemma3(self.cache, input_embeddings=rows, block=self.image_attention == "bidirectional")

    def logits(self) -> np.ndarray:
        if self._logits is None:
            raise RuntimeError("no logits yet: nothing was decoded")
        return self._logits

    def _prefill_mrope(self, segment: Segment):
        """One segment at its own (t, row, col) positions; returns its logits (1, n, V), unevaluated."""
        mx = self._mx
        positions = _mrope_positions(segment.positions)  # (n, 3)
        if segment.token_ids is not None:
            ids = mx.array(segment.token_ids.astype(np.int32))[None]  # (1, n)
            logits = self._mrope(mx.array(positions), self.cache, inputs=ids)
        else:  # rows enter in the model's own dtype, as its token embeddings do
            rows = np.ascontiguousarray(segment.embeds, dtype=np.float32)
            hidden = rows.shape[1] // (1 + self.deepstack_layers)
            if rows.shape[1] != hidden * (1 + self.deepstack_layers) or hidden != self.config["hidden_size"]:
                raise BundleError(f"image rows are {rows.shape[1]} wide; the MLX decoder takes "
                                  f"{1 + self.deepstack_layers} slices of {self.config['hidden_size']}")
            embeds = mx.array(rows[:, :hidden])[None].astype(self.dtype)
            deepstack = None
            if self.deepstack_layers:  # k slices (n, D), added after layers 0..k-1 in the model's dtype (as HF)
                deepstack = [mx.array(rows[:, hidden * (i + 1):hidden * (i + 2)]).astype(self.dtype)
                             for i in range(self.deepstack_layers)]
            logits = self._mrope(mx.array(positions), self.cache, input_embeddings=embeds, deepstack=deepstack)
        self.n_past += len(segment)
        # the sequence continues after the largest position so far (after an image: pos0 + max(h', w'))
        self.next_position = max(self.next_position, int(positions.max()) + 1)
        return logits

    def truncate(self, n_past: int, next_position: int | None = None) -> None:
        kept = min(self.n_past, n_past)
        if next_position is None:
            next_position = self._default_next_position(kept)
        if n_past == 0:
            self.cache = self._make_cache()
        elif n_past < self.n_past:
            wanted = self.n_past - n_past
            trimmed = self._trim(wanted)
            if trimmed != wanted:  # e.g. a rotating (sliding-window) cache: start over rather than lie about n_past
                self.cache = self._make_cache()
                self.n_past = self.next_position = 0
                raise RuntimeError(f"the MLX cache could trim {trimmed} of {wanted} positions; the sequence was cleared")
        self.n_past, self.next_position = kept, next_position

    def _default_next_position(self, kept: int) -> int:
        """Where the sequence continues after keeping `kept` rows, when the caller does not say."""
        if self._mrope is None or kept == 0:
            return kept  # 1-D: one position per row
        if kept == self.n_past:
            return self.next_position
        # M-RoPE rows do not say where the sequence continues (an image spans fewer positions than rows); only the
        # caller's position plan does. Checked before trimming, so a refused call changes nothing.
        raise ValueError("truncating an M-RoPE sequence part-way needs the next_position it continues at")

    def snapshot(self) -> DecoderState:
        nbytes = sum(_nbytes(c) for c in self.cache)
        return DecoderState(copy.deepcopy(self.cache), self.n_past, int(nbytes), self.next_position)

    def restore(self, state: DecoderState) -> None:
        self.cache = copy.deepcopy(state.payload)
        self.n_past, self.next_position = state.n_past, state.next_position


def _model_type(folder: Path) -> str | None:
    try:
        return json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError) as exc:
        raise BundleError(f"the MLX decoder folder {folder} has no readable config.json ({exc}); "
                          "re-export it") from None


def _mrope_positions(positions: np.ndarray) -> np.ndarray:
    """(n,) text positions (t = row = col) or (n, 3) (t, row, col) -> (n, 3) int32."""
    if positions.ndim == 1:
        return np.repeat(positions[:, None], 3, axis=1).astype(np.int32)
    if positions.shape[1] != 3:
        raise BundleError(f"M-RoPE takes (n, 3) positions (t, row, col), got {positions.shape}")
    return positions.astype(np.int32)


def _nbytes(cache) -> int:
    """Bytes of one layer's cache; counted from its arrays where the class has no nbytes (the prefix LRU is bounded
    in bytes, so 0 would make it unbounded)."""
    nbytes = getattr(cache, "nbytes", None)
    if nbytes is not None:
        return int(nbytes)
    return sum(int(getattr(a, "nbytes", 0)) for a in getattr(cache, "state", ()) or ())
