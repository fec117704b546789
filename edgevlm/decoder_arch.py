"""One row per decoder architecture: everything export and the runtimes need to know about a decoder type. Adding a
decoder type (qwen2, gemma, ...) is a row here plus its tests. A leaf module: gguf-py and transformers are imported
only by the functions that need them (export), never by the runtime."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache


@dataclass(frozen=True)
class DecoderArch:
    name: str  # the manifest's decoder.architecture
    hf_model_types: tuple[str, ...]  # text_config.model_type values this row takes
    hf_class: str  # transformers class of the text decoder
    hf_rotary_class: str  # its rotary-embedding class (a non-persistent buffer rebuilt after loading)
    gguf_arch: str  # gguf-py MODEL_ARCH member
    permute_qk: bool  # llama.cpp's converter permutes Q/K rows (rotate-half -> interleaved RoPE)
    bias_tensors: tuple[str, ...]  # linear biases the GGUF carries (F32); any other bias is refused
    mlx_model_type: str  # mlx-lm model module
    position_schemes: tuple[str, ...]  # the manifest's decoder.position_scheme values it can run
    # where the rotary class lives when it is not beside hf_class (Qwen2-VL: a Qwen2 decoder with M-RoPE)
    hf_rotary_module: str | None = None
    # M-RoPE frequencies take their axis interleaved (t, row, col, t, ...: Qwen3-VL), not in contiguous sections
    mrope_interleaved: bool = False
    # added to every RMS-norm weight on the way to GGUF: Gemma's norms scale by (1 + weight), llama.cpp's by weight
    gguf_norm_shift: float = 0.0
    # why neither a GGUF nor an MLX decoder can be written (one line); such a row runs on the torch runtime only
    export_refusal: str | None = None
    # llama.cpp's graph for this arch multiplies every input row by sqrt(n_embd), embedding rows included (gemma2):
    # image rows, which HF adds unscaled, go in divided by it
    llama_scales_input_rows: bool = False
    # local (sliding-window) layers: llama.cpp's arch fixes one global layer every N (None: no local layers)
    swa_global_every: int | None = None

    def __post_init__(self) -> None:
        if not (self.name and self.hf_model_types and self.position_schemes):
            raise ValueError(f"incomplete decoder architecture row {self}")

    def gguf_model_arch(self):
        import gguf

        return getattr(gguf.MODEL_ARCH, self.gguf_arch)

    def gguf_arch_name(self) -> str:
        import gguf

        return gguf.MODEL_ARCH_NAMES[self.gguf_model_arch()]

    def gguf_tensor_name(self, hf_name: str, n_blocks: int) -> str:
        """gguf-py's name for an HF decoder tensor (e.g. model.layers.0.self_attn.q_proj.weight -> blk.0.attn_q.weight)."""
        mapped = _tensor_name_map(self.gguf_arch, n_blocks).get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise KeyError(f"gguf-py has no {self.gguf_arch} name for {hf_name}")
        return mapped


@lru_cache(maxsize=8)
def _tensor_name_map(gguf_arch: str, n_blocks: int):
    """gguf-py's name map, built once per architecture and depth: building it formats every tensor name of every
    block (2.3 s over a 28-layer model's 338 tensors when built per tensor: most of `edgevlm plan`'s time)."""
    import gguf

    return gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, gguf_arch), n_blocks)


ARCHITECTURES = {
    "llama": DecoderArch(
        # Mistral (Idefics2's decoder) is a Llama to llama.cpp's converter; its sliding window bounds the context instead
        name="llama", hf_model_types=("llama", "mistral"), hf_class="LlamaForCausalLM",
        hf_rotary_class="LlamaRotaryEmbedding",
        gguf_arch="LLAMA", permute_qk=True, bias_tensors=(), mlx_model_type="llama", position_schemes=("1d",),
    ),
    # Qwen2 / Qwen2.5 (InternVL3, LLaVA-OneVision): q/k/v biases; llama.cpp's qwen2 arch uses NEOX (rotate-half)
    # RoPE, so Q/K go in unpermuted (llama-model.cpp llama_model_rope_type: QWEN2 -> LLAMA_ROPE_TYPE_NEOX)
    "qwen2": DecoderArch(
        name="qwen2", hf_model_types=("qwen2",), hf_class="Qwen2ForCausalLM", hf_rotary_class="Qwen2RotaryEmbedding",
        gguf_arch="QWEN2", permute_qk=False, bias_tensors=("attn_q", "attn_k", "attn_v"), mlx_model_type="qwen2",
        position_schemes=("1d",),
    ),
    # Qwen2-VL / Qwen2.5-VL text: Qwen2 weights and attention, M-RoPE ((t, row, col) positions, rotate-half pairs
    # whose frequency sections take one axis each). transformers: Qwen2ForCausalLM with Qwen2-VL's rotary gives the
    # VL model's logits exactly; llama.cpp: arch qwen2vl (LLAMA_ROPE_TYPE_MROPE, NEOX pairs, so no Q/K permutation);
    # MLX: mlx-lm's qwen2 folder, run by mlx-vlm's qwen2_vl language model (runtimes/mlx_vlm_seam.py)
    "qwen2vl": DecoderArch(
        name="qwen2vl", hf_model_types=("qwen2_vl_text", "qwen2_5_vl_text"), hf_class="Qwen2ForCausalLM",
        hf_rotary_class="Qwen2VLRotaryEmbedding", gguf_arch="QWEN2VL", permute_qk=False,
        bias_tensors=("attn_q", "attn_k", "attn_v"), mlx_model_type="qwen2", position_schemes=("mrope",),
        hf_rotary_module="transformers.models.qwen2_vl.modeling_qwen2_vl",
    ),
    # Qwen3-VL text: Qwen3 weights (QK-norm on each head, no biases) with interleaved M-RoPE: frequency i takes row
    # when i % 3 == 1 and i < 3 * section[1], col when i % 3 == 2 and i < 3 * section[2], else t (HF's
    # Qwen3VLTextRotaryEmbedding); image rows carry DeepStack slices (FamilySpec.deepstack_layers). llama.cpp: arch
    # qwen3vl (LLAMA_ROPE_TYPE_IMROPE, NEOX pairs: no Q/K permutation); MLX: mlx-vlm's qwen3_vl language model
    "qwen3vl": DecoderArch(
        name="qwen3vl", hf_model_types=("qwen3_vl_text",), hf_class="Qwen3ForCausalLM",
        hf_rotary_class="Qwen3VLTextRotaryEmbedding", gguf_arch="QWEN3VL", permute_qk=False, bias_tensors=(),
        mlx_model_type="qwen3", position_schemes=("mrope",),
        hf_rotary_module="transformers.models.qwen3_vl.modeling_qwen3_vl", mrope_interleaved=True,
    ),
    # Gemma 3 text: QK-norm, sandwich norms (post-attention / post-feed-forward), (1 + w) RMS norms, token
    # embeddings scaled by sqrt(hidden) inside the model (image rows are not: llama.cpp scales only token input),
    # local sliding-window layers (RoPE base 10k) and global ones every sixth layer; NEOX RoPE in llama.cpp (no Q/K
    # permutation). transformers: Gemma3ForCausalLM; MLX: mlx-lm's gemma3_text folder, mlx-vlm's gemma3 layers.
    "gemma3": DecoderArch(
        name="gemma3", hf_model_types=("gemma3_text",), hf_class="Gemma3ForCausalLM",
        hf_rotary_class="Gemma3RotaryEmbedding", gguf_arch="GEMMA3", permute_qk=False, bias_tensors=(),
        mlx_model_type="gemma3_text", position_schemes=("1d",), gguf_norm_shift=1.0, swa_global_every=6,
    ),
    # Gemma 2 text (PaliGemma 2): sandwich norms, (1 + w) RMS norms, attention-logit and final-logit soft-capping,
    # local layers (even) alternating with global ones (odd); no QK-norm. llama.cpp's gemma2 scales every input row
    # by sqrt(n_embd) (models/gemma2.cpp), HF only the token embeddings. transformers: Gemma2ForCausalLM; mlx-lm:
    # gemma2's weights under edgevlm's own masks (runtimes/mlx_gemma2.py: mlx-lm's forward has no sliding window)
    "gemma2": DecoderArch(
        name="gemma2", hf_model_types=("gemma2",), hf_class="Gemma2ForCausalLM",
        hf_rotary_class="Gemma2RotaryEmbedding", gguf_arch="GEMMA2", permute_qk=False, bias_tensors=(),
        mlx_model_type="gemma2", position_schemes=("1d",), gguf_norm_shift=1.0, llama_scales_input_rows=True,
        swa_global_every=2,
    ),
    # OPT (BLIP-2's published decoders): learned absolute positions (offset 2), LayerNorm with biases, ReLU MLP
    "opt": DecoderArch(
        name="opt", hf_model_types=("opt",), hf_class="OPTForCausalLM", hf_rotary_class="", gguf_arch="",
        permute_qk=False, bias_tensors=(), mlx_model_type="", position_schemes=("1d",),
        export_refusal="OPT decoders cannot be written as GGUF or MLX: llama.cpp (0c1e570) and mlx-lm have no OPT "
                       "architecture, so neither runs it as a decoder here; export --encoder onnx:... alone and run "
                       "the decoder on torch (--decoder torch)",
    ),
    # T5 (BLIP-2 Flan-T5): an encoder-decoder. The prompt (image rows + text) is the T5 encoder's input and the
    # answer the T5 decoder's (runtimes/torch_seq2seq.py); relative attention buckets, no positions in the rows
    "t5": DecoderArch(
        name="t5", hf_model_types=("t5",), hf_class="T5ForConditionalGeneration", hf_rotary_class="", gguf_arch="",
        permute_qk=False, bias_tensors=(), mlx_model_type="", position_schemes=("1d",),
        export_refusal="T5 decoders cannot be written as GGUF or MLX: T5 is an encoder-decoder, which llama.cpp "
                       "(0c1e570) runs only as text through llama_encode (no image rows) and mlx-lm not as a VLM "
                       "decoder; export --encoder onnx:... alone and run the decoder on torch (--decoder torch)",
    ),
}


def architecture(name: str) -> DecoderArch:
    if name not in ARCHITECTURES:
        raise KeyError(name)
    return ARCHITECTURES[name]


def architecture_for_model_type(model_type: str) -> DecoderArch:
    for row in ARCHITECTURES.values():
        if model_type in row.hf_model_types:
            return row
    from .errors import CheckpointError

    supported = ", ".join(t for row in ARCHITECTURES.values() for t in row.hf_model_types)
    raise CheckpointError(f"the text decoder is {model_type!r}; this edgevlm exports decoders of type {supported}")
