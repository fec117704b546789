"""The PyTorch reference backends: every exported artifact is compared against these."""
from __future__ import annotations

import copy
from typing import Iterator

import numpy as np
import torch

from .base import Decoder, DecoderState, Encoder, Segment


class TorchEncoder(Encoder):
    name = "torch"

    def __init__(self, vision: torch.nn.Module, artifact_id: str):
        self.vision = vision.eval()
        self.artifact_id = artifact_id

    @torch.inference_mode()
    def encode(self, pixel_values: np.ndarray, grid: tuple[int, int, int] | None = None,
               instruction: np.ndarray | None = None) -> np.ndarray:
        """(tiles, 3, H, W) -> (tiles, T, D); with a grid (a native-resolution encoder): (P, C*T*p*p) -> (M, D);
        with an instruction (InstructBLIP): its (n,) ids, repeated for every tile, with an all-ones mask."""
        pixels = torch.from_numpy(np.ascontiguousarray(pixel_values, dtype=np.float32))
        pixels = pixels.to(next(self.vision.parameters()).dtype)  # a checkpoint loaded in its stored dtype (bf16)
        if instruction is not None:
            ids = torch.from_numpy(np.asarray(instruction, dtype=np.int64))[None].expand(len(pixels), -1)
            return self.vision(pixels, ids, torch.ones_like(ids)).float().numpy()
        out = self.vision(pixels) if grid is None else self.vision(pixels, tuple(int(v) for v in grid))
        return out.float().numpy()


def _cache_nbytes(cache) -> int:
    total = 0
    for layer in getattr(cache, "layers", []):
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


class TorchDecoder(Decoder):
    """transformers' LlamaForCausalLM with a DynamicCache and explicit positions; a whole prompt is one forward."""

    name = "torch"

    def __init__(self, model, n_ctx: int | None = None, *, position_scheme: str, artifact_id: str = "torch",
                 deepstack_layers: int = 0, image_attention: str = "causal"):
        """position_scheme: where `step` places a generated token (the checkpoint's or manifest's scheme);
        deepstack_layers: k DeepStack slices after the main embedding in each image row (base.Segment);
        image_attention "bidirectional": each image segment is one block every row of which sees the whole block
        (HF's token-type mask, Gemma 3); "prefix": what is prefilled into an empty sequence (the prompt) is one such
        block, and everything after it causal (PaliGemma's prefix-LM)."""
        from transformers import DynamicCache

        self.model = model.eval()
        self.image_attention = image_attention
        # sliding-window layers keep every position here (their mask applies the window), so truncation never
        # meets a dropped window: the reference stays exact wherever the prompt is cut
        sliding = "sliding_attention" in (getattr(model.config, "layer_types", None) or ())
        self._new_cache = (lambda: DynamicCache()) if sliding else (lambda: DynamicCache(config=model.config))
        self.cache = self._new_cache()
        self.n_past = 0
        self.next_position = 0
        self.n_ctx = int(n_ctx or model.config.max_position_embeddings)
        self.vocab_size = int(model.config.vocab_size)
        self.n_batch = self.n_ctx  # any prompt in one forward
        self.position_scheme, self.artifact_id = position_scheme, artifact_id
        self._embed = model.get_input_embeddings()
        self._logits: np.ndarray | None = None
        self.deepstack_layers = int(deepstack_layers)
        self._hidden = int(model.config.hidden_size)

    def prefill_chunks(self, segments: list[Segment]) -> Iterator[int]:
        with torch.inference_mode():
            length = self._forward(segments)
        yield length

    def _forward(self, segments: list[Segment]) -> int:
        rows = [None if s.token_ids is not None else self._image_rows(s.embeds) for s in segments]
        parts = [self._embed(torch.from_numpy(s.token_ids.astype(np.int64))) if r is None else r[0]
                 for s, r in zip(segments, rows)]
        inputs = torch.cat(parts)[None]  # (1, L, D)
        length = inputs.shape[1]
        positions = np.concatenate([s.positions for s in segments])  # (L,) or (L, k)
        position_ids = torch.from_numpy(positions.astype(np.int64))[None]  # (1, L)
        if positions.ndim == 2:  # (L, k) -> (k, 1, L), transformers' multi-axis position_ids
            position_ids = position_ids.permute(2, 0, 1)
        mask = None
        if self.image_attention == "bidirectional":
            mask = self._block_mask(segments, inputs, position_ids)
        elif self.image_attention == "prefix" and self.n_past == 0:  # the prompt: one block; later tokens causal
            mask = self._prefix_mask(inputs, position_ids)
        hooks = self._deepstack_hooks(segments, rows) if self.deepstack_layers and any(r is not None for r in rows) else []
        try:
            out = self.model(inputs_embeds=inputs, position_ids=position_ids, past_key_values=self.cache,
                             use_cache=True, logits_to_keep=1, **({"attention_mask": mask} if mask is not None else {}))
        finally:
            for hook in hooks:
                hook.remove()
        self.n_past += length
        self.next_position = max(self.next_position, int(positions.max()) + 1)
        self._logits = out.logits[0, -1].float().numpy()
        return length

    def _image_rows(self, embeds: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        """An image segment's rows -> (n, D) main embeddings and (n, k, D) DeepStack slices (None when k = 0)."""
        width = self._hidden * (1 + self.deepstack_layers)
        if embeds.shape[1] != width:
            raise ValueError(f"image rows are {embeds.shape[1]} wide; this decoder takes {width} "
                             f"({1 + self.deepstack_layers} slices of {self._hidden})")
        rows = torch.from_numpy(np.ascontiguousarray(embeds, dtype=np.float32)).to(self._embed.weight.dtype)
        if not self.deepstack_layers:
            return rows, None
        return rows[:, : self._hidden], rows[:, self._hidden:].reshape(len(rows), self.deepstack_layers, self._hidden)

    def _deepstack_hooks(self, segments: list[Segment], rows: list) -> list:
        """DeepStack as transformers' Qwen3VLTextModel does it: slice i + 1 of each image row is added to the hidden
        states after decoder layer i (zeros at text positions: adding 0.0 leaves them exact)."""
        slices = torch.cat([r[1] if r is not None else torch.zeros(len(s), self.deepstack_layers, self._hidden)
                            for s, r in zip(segments, rows)])[None]  # (1, L, k, D)

        def add(index: int):
            def hook(module, args, output):
                if isinstance(output, tuple):
                    return (output[0] + slices[:, :, index].to(output[0].dtype), *output[1:])
                return output + slices[:, :, index].to(output.dtype)
            return hook

        layers = self.model.model.layers
        return [layers[i].register_forward_hook(add(i)) for i in range(self.deepstack_layers)]

    def _block_mask(self, segments: list[Segment], inputs: torch.Tensor, position_ids: torch.Tensor) -> dict | None:
        """HF's Gemma 3 masks (create_masks_for_vision_model): causal, OR'd with "same image block" for every image
        segment, inside the sliding window on local layers. Block ids are indexed by absolute cache position."""
        if all(s.embeds is None for s in segments):
            return None
        from transformers.models.gemma3.modeling_gemma3 import create_masks_for_vision_model

        ids = torch.full((1, self.n_past + inputs.shape[1]), -1, dtype=torch.long)
        start, block = self.n_past, 0
        for s in segments:
            if s.embeds is not None:
                ids[0, start:start + len(s)] = block
                block += 1
            start += len(s)
        return create_masks_for_vision_model(self.model.config, inputs, None, self.cache, position_ids, ids)

    def _prefix_mask(self, inputs: torch.Tensor, position_ids: torch.Tensor) -> dict:
        """HF PaliGemma's masks for the prompt (token_type_ids 0 everywhere: block_sequence_ids 0), full and sliding:
        causal (within the window on local layers) OR "both in the prefix"."""
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        kwargs = dict(config=self.model.config, inputs_embeds=inputs, attention_mask=None, past_key_values=self.cache,
                      position_ids=position_ids, block_sequence_ids=torch.zeros(inputs.shape[:2], dtype=torch.long))
        masks = {"full_attention": create_causal_mask(**kwargs)}
        if getattr(self.model.config, "sliding_window", None) is not None:
            masks["sliding_attention"] = create_sliding_window_causal_mask(**kwargs)
        return masks

    def logits(self) -> np.ndarray:
        if self._logits is None:
            raise RuntimeError("no logits yet: nothing was decoded")
        return self._logits

    def truncate(self, n_past: int, next_position: int | None = None) -> None:
        if n_past == 0:
            self.cache = self._new_cache()
        elif n_past < self.n_past:
            self.cache.crop(n_past - self.n_past)  # transformers 5: a negative count of positions to drop
        self.n_past = min(self.n_past, n_past)
        self.next_position = self.n_past if next_position is None else next_position

    def snapshot(self) -> DecoderState:
        return DecoderState(copy.deepcopy(self.cache), self.n_past, _cache_nbytes(self.cache), self.next_position)

    def restore(self, state: DecoderState) -> None:
        self.cache = copy.deepcopy(state.payload)
        self.n_past, self.next_position = state.n_past, state.next_position
