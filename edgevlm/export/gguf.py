"""Decoder -> GGUF (arch `llama`) with gguf-py, then quantized by llama.cpp's own quantizer.

Q and K rows are permuted the way llama.cpp's convert_hf_to_gguf.py does (HF rotate-half RoPE -> llama.cpp's
interleaved RoPE); without it the logits are garbage. The tokenizer goes in as gguf-py's SpecialVocab plus the
token list and types: byte-level BPE (`gpt2`, the pre-tokenizer name read from tokenizer.json, never guessed) or
SentencePiece BPE with byte fallback (`llama`, with piece scores)."""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np

from ..decoder_arch import architecture
from ..errors import BadInputError, CheckpointError
from ..reference.tokenizers import QWEN2_SPLIT
from ..manifest import Artifact
from .bundle import BundleWriter

# precision -> gguf-py's LlamaFileType member (= llama.h's llama_ftype, which the quantizer takes)
FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q4_0": "MOSTLY_Q4_0", "q8_0": "MOSTLY_Q8_0",
              "q4_k_m": "MOSTLY_Q4_K_M", "q5_k_m": "MOSTLY_Q5_K_M", "q6_k": "MOSTLY_Q6_K"}
K_QUANTS = ("q4_k_m", "q5_k_m", "q6_k")
QK_K = 256  # K-quant super-block width: rows must be a multiple of it


def file_type(precision: str) -> int:
    import gguf

    return int(getattr(gguf.LlamaFileType, FILE_TYPES[precision]))


def permute_rope(weight: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.LlamaModel.permute: rotate-half row order -> interleaved pairs."""
    n_out, n_in = weight.shape
    return weight.reshape(n_head, 2, n_out // n_head // 2, n_in).swapaxes(1, 2).reshape(n_out, n_in)


def _steps(tokenizer_json: dict, part: str = "pre_tokenizer", sequence_key: str = "pretokenizers") -> list[dict]:
    """The steps of one tokenizer.json stage (pre-tokenizer or normalizer), a Sequence unpacked."""
    stage = tokenizer_json.get(part) or {}
    return stage.get(sequence_key, [stage]) if stage.get("type") == "Sequence" else [stage]


def tokenizer_pre(tokenizer_json: dict) -> str:
    """llama.cpp's name for the pre-tokenizer (unknown names fail to load there, so refuse early here)."""
    items = _steps(tokenizer_json)
    types = [p.get("type") for p in items]
    if types == ["ByteLevel"] and items[0].get("use_regex", True):
        return "gpt-2"
    if types == ["Digits", "ByteLevel"] and items[0].get("individual_digits"):
        return "smollm"
    if (types == ["Split", "ByteLevel"] and items[0].get("pattern", {}).get("Regex") == QWEN2_SPLIT
            and not items[1].get("use_regex", True)):
        return "qwen2"  # llama-vocab.cpp LLAMA_VOCAB_PRE_TYPE_QWEN2: the same regex
    raise CheckpointError(
        f"the tokenizer's pre-tokenizer {types} has no known llama.cpp name; supported: plain ByteLevel (gpt-2), "
        "Digits+ByteLevel (smollm) and Qwen2's Split+ByteLevel (qwen2)"
    )


def write_vocab(writer, tokenizer, tokenizer_dir: Path, vocab_size: int, chat_template: str | None) -> None:
    import gguf

    data = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    model = data.get("model", {})
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        write_sentencepiece_vocab(writer, tokenizer, tokenizer_dir, data, vocab_size)
    elif model.get("type") == "BPE":
        write_byte_level_vocab(writer, tokenizer, data, vocab_size)
    else:
        raise CheckpointError(
            f"the tokenizer model {model.get('type')!r} is not exported to GGUF; supported: byte-level BPE (GPT-2 "
            "style) and SentencePiece BPE with byte fallback (Llama/Mistral style)"
        )
    special = gguf.SpecialVocab(tokenizer_dir, load_merges=model.get("type") == "BPE" and not model.get("byte_fallback"),
                                n_vocab=vocab_size)
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    special.add_special_token["bos"] = tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id]
    special.add_special_token["eos"] = tokenizer.eos_token_id is not None and probe[-1:] == [tokenizer.eos_token_id]
    if chat_template and not special.chat_template:
        special.chat_template = chat_template
    special.add_to_gguf(writer)


def _token_table(tokenizer, data: dict, vocab_size: int, normal_type) -> tuple[list[str], list[int]]:
    """Token strings and llama.cpp token types by id; ids the tokenizer lacks (embedding padding) become UNUSED."""
    import gguf

    added = {t["id"]: t for t in data.get("added_tokens", [])}
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(normal_type(by_id[i]))
    return tokens, types


def write_byte_level_vocab(writer, tokenizer, data: dict, vocab_size: int) -> None:
    import gguf

    tokens, types = _token_table(tokenizer, data, vocab_size, lambda _: gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(tokenizer_pre(data))
    writer.add_token_list(tokens)
    writer.add_token_types(types)


BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def sentencepiece_scores(tokenizer_dir: Path, data: dict, tokens: list[str]) -> list[float]:
    """llama.cpp's SentencePiece tokenizer merges the best-scoring pair first. The scores come from tokenizer.model
    when the checkpoint ships it; otherwise from tokenizer.json's merge ranks, which HF's converter derives from
    those same scores (a piece made by merge rank r scores -r)."""
    model_file = tokenizer_dir / "tokenizer.model"
    if model_file.is_file():
        import sentencepiece

        processor = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        base = processor.vocab_size()
        return [processor.GetScore(i) if i < base else -1000.0 for i in range(len(tokens))]
    rank: dict[str, int] = {}
    for r, merge in enumerate(data["model"].get("merges", [])):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank.setdefault(left + right, r)
    unranked = -float(len(rank) + 1)  # single characters and bytes: never the result of a merge
    return [-float(rank[t]) if t in rank else unranked for t in tokens]


def write_sentencepiece_vocab(writer, tokenizer, tokenizer_dir: Path, data: dict, vocab_size: int) -> None:
    import gguf

    unk = tokenizer.unk_token

    def piece_type(piece: str):
        if piece == unk:
            return gguf.TokenType.UNKNOWN
        return gguf.TokenType.BYTE if BYTE_PIECE.fullmatch(piece) else gguf.TokenType.NORMAL

    tokens, types = _token_table(tokenizer, data, vocab_size, piece_type)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(sentencepiece_scores(tokenizer_dir, data, tokens))
    writer.add_token_types(types)
    writer.add_add_space_prefix(adds_space_prefix(data))


def sentencepiece_note(tokenizer_dir: Path) -> str | None:
    """llama.cpp's SentencePiece tokenizer always adds the dummy "▁" prefix, also after special tokens and before a
    leading space, as SentencePiece itself does. A tokenizer.json whose Metaspace prefixes only the first piece
    (transformers' legacy=False) tokenizes those two cases differently from the GGUF; edgevlm's runtime tokenizes
    with the bundle's HF tokenizer and is unaffected, stock llama.cpp is."""
    data = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    if not data.get("model", {}).get("byte_fallback"):
        return None
    items = _steps(data)
    if any(i.get("type") == "Metaspace" and i.get("prepend_scheme") == "first" for i in items):
        return ("the tokenizer is SentencePiece with legacy=False: stock llama.cpp adds a space prefix after special "
                "tokens and before leading spaces where it does not (edgevlm's runtime uses the HF tokenizer)")
    return None


def adds_space_prefix(data: dict) -> bool:
    """Whether the tokenizer prepends "▁" to the text (Metaspace prepend_scheme, or the older Prepend normalizer)."""
    for item in _steps(data):
        if item.get("type") == "Metaspace":
            return item.get("prepend_scheme", "always") != "never" and item.get("add_prefix_space", True)
    normalizers = _steps(data, "normalizer", "normalizers")
    return any(n.get("type") == "Prepend" and n.get("prepend") == "\u2581" for n in normalizers)


# GGUF tensor type per written precision for matrices; norms and biases are always F32, as llama.cpp's converter
# writes them. "bf16" is only the quantizer's input for bf16 checkpoints (no rounding of their weights).
MATRIX_TYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16"}
MATRIX_DTYPES = {"F32": np.float32, "F16": np.float16}  # BF16 goes in as raw uint16


def intermediate_precision(ckpt) -> str:
    """The quantizer's input: 16 bits, never an F32 copy of a checkpoint (bf16 stays bf16: F16 could overflow)."""
    import torch

    dtype = next(ckpt.decoder.parameters()).dtype
    return "bf16" if dtype == torch.bfloat16 else "f16"


def _writer_header(ckpt, manifest, path: Path, tokenizer_dir: Path, dtype: str):
    import gguf

    spec = manifest.decoder
    arch = architecture(spec.architecture)
    writer = gguf.GGUFWriter(str(path), arch.gguf_arch_name())
    writer.add_name(f"edgevlm {manifest.family} decoder")
    writer.add_context_length(spec.context_length)
    writer.add_embedding_length(spec.hidden_size)
    writer.add_block_count(spec.n_layers)
    writer.add_feed_forward_length(spec.intermediate_size)
    writer.add_head_count(spec.n_heads)
    writer.add_head_count_kv(spec.n_kv_heads)
    writer.add_rope_dimension_count(spec.head_dim)
    if spec.head_dim * spec.n_heads != spec.hidden_size:
        writer.add_key_length(spec.head_dim)
        writer.add_value_length(spec.head_dim)
    writer.add_layer_norm_rms_eps(spec.rms_norm_eps)
    writer.add_rope_freq_base(spec.rope_theta)
    if spec.position_scheme == "mrope":  # llama.cpp's qwen2vl requires 4 sections (t, row, col, unused)
        writer.add_rope_dimension_sections([*spec.mrope_section, 0])
    if manifest.encoder.row_slices > 1:  # DeepStack (qwen3vl): image rows are n_embd x (1 + k) wide
        if manifest.encoder.row_slices - 1 >= spec.n_layers:  # qwen3vl.cpp adds after the last layer's row pick
            raise CheckpointError(f"{manifest.encoder.row_slices - 1} DeepStack slices need a decoder of more layers "
                                  f"than that for llama.cpp (it has {spec.n_layers})")
        writer.add_num_deepstack_layers(manifest.encoder.row_slices - 1)
    if spec.sliding_window:  # llama.cpp's gemma3 / gemma2 fix the pattern (every 6th / 2nd layer global)
        if spec.global_every != arch.swa_global_every:
            raise CheckpointError(f"local attention every {spec.global_every} layers is not what llama.cpp's "
                                  f"{arch.gguf_arch_name()} architecture computes")
        writer.add_sliding_window(spec.sliding_window)
        writer.add_rope_freq_base_swa(spec.rope_local_theta)
    config = ckpt.decoder.config
    if arch.name == "gemma2":  # soft-capping: tanh(x / cap) * cap on attention scores and on the final logits
        for key, add in (("attn_logit_softcapping", writer.add_attn_logit_softcapping),
                         ("final_logit_softcapping", writer.add_final_logit_softcapping)):
            if getattr(config, key, None) is None:  # llama.cpp's gemma2 always caps (50 / 30 by default)
                raise CheckpointError(f"the Gemma 2 decoder has no {key}; llama.cpp's gemma2 always applies one")
            add(float(getattr(config, key)))
    scaling = dict(spec.rope_scaling or {})
    if scaling.get("rope_type") == "linear":  # Gemma 3 4B+: the global layers' positions divided by `factor`
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    elif scaling.get("rope_type", "default") != "default":
        raise CheckpointError(f"RoPE scaling {spec.rope_scaling} is not exported to GGUF yet")
    scalar = getattr(config, "query_pre_attn_scalar", None)
    # llama.cpp's gemma2 / gemma3 scale attention by 1/sqrt(head_dim), except gemma2's 46-layer 27B: hidden / heads
    usual = spec.hidden_size // spec.n_heads if arch.name == "gemma2" and spec.n_layers == 46 else spec.head_dim
    if arch.name in ("gemma2", "gemma3") and scalar not in (None, usual):
        raise CheckpointError(f"query_pre_attn_scalar {scalar} differs from {usual}: llama.cpp's {arch.name} would "
                              "scale attention differently; export onnx + mlx for this checkpoint")
    writer.add_vocab_size(spec.vocab_size)
    writer.add_file_type(file_type(dtype))
    write_vocab(writer, ckpt.tokenizer, tokenizer_dir, spec.vocab_size, manifest.tokenizer.get("chat_template"))
    return writer


def write_gguf(ckpt, manifest, path: Path, tokenizer_dir: Path, dtype: str = "f32", progress=None) -> Path:
    """The decoder as an F32, F16 or BF16 GGUF: hyper-parameters, tokenizer and tensors. Tensors are converted and
    written one at a time from the checkpoint's own (stored-dtype) tensors: the writer never holds a copy of the
    model. progress(done, total, name) is called per tensor."""
    import gguf
    import torch

    spec = manifest.decoder
    arch = architecture(spec.architecture)
    state = ckpt.decoder.state_dict()  # references to the model's tensors, no copies
    n_blocks = spec.n_layers
    if spec.tie_word_embeddings:  # llama.cpp falls back to token_embd (gguf-py's gemma2 has no output tensor at all)
        state.pop("lm_head.weight", None)
    elif arch.name == "gemma2":
        raise CheckpointError("the Gemma 2 decoder has an untied lm_head; llama.cpp's gemma2 always reads token_embd")
    names = {k: arch.gguf_tensor_name(k, n_blocks) for k in state}
    stray = [k for k in state if k.endswith(".bias") and names[k].split(".")[-2] not in arch.bias_tensors]
    if stray:
        raise CheckpointError(f"the decoder has biases {stray[:3]} that the {arch.name} GGUF layout has no place for")
    plan = []  # (hf name, gguf name, GGML type name)
    for hf_name in state:
        gguf_name = names[hf_name]
        if gguf_name == "output.weight" and spec.tie_word_embeddings:
            continue  # tied: llama.cpp falls back to token_embd
        kind = gguf_name.split(".")[-2]  # attn_q, attn_k, ffn_up, attn_norm, ...
        keep_f32 = kind.endswith("norm") or hf_name.endswith(".bias") or state[hf_name].dim() < 2
        plan.append((hf_name, gguf_name, "F32" if keep_f32 else MATRIX_TYPES[dtype]))

    def converted(hf_name: str, gguf_name: str, type_name: str) -> np.ndarray:
        tensor = state[hf_name].detach()
        kind = gguf_name.split(".")[-2]
        if arch.gguf_norm_shift and kind.endswith("norm"):  # Gemma: (1 + w) in HF, w in llama.cpp
            tensor = tensor.float() + arch.gguf_norm_shift
        if arch.permute_qk and hf_name.endswith(".weight") and kind in ("attn_q", "attn_k"):
            tensor = torch.from_numpy(permute_rope(tensor.float().numpy(), spec.n_heads if kind == "attn_q" else spec.n_kv_heads))
        if type_name == "BF16":  # the stored bits, viewed as uint16 (gguf-py takes raw BF16 that way)
            return tensor.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)
        return tensor.to(torch.float16 if type_name == "F16" else torch.float32).contiguous().numpy()

    writer = _writer_header(ckpt, manifest, path, tokenizer_dir, dtype)
    for hf_name, gguf_name, type_name in plan:
        shape = tuple(state[hf_name].shape)
        nbytes = int(np.prod(shape)) * (4 if type_name == "F32" else 2)
        raw = gguf.GGMLQuantizationType.BF16 if type_name == "BF16" else None
        writer.add_tensor_info(gguf_name, shape, np.dtype(np.uint16 if raw else MATRIX_DTYPES[type_name]), nbytes, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for done, (hf_name, gguf_name, type_name) in enumerate(plan, 1):
        writer.write_tensor_data(converted(hf_name, gguf_name, type_name))
        if progress:
            progress(done, len(plan), gguf_name)
    writer.close()
    return path



def quantize(source: Path, path: Path, precision: str, threads: int | None = None) -> None:
    import ctypes
    import os

    import llama_cpp

    from ..backends import silence_llama_logs

    silence_llama_logs(llama_cpp)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = file_type(precision)
    params.nthread = threads or os.cpu_count() or 1
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(path).encode(), ctypes.byref(params))
    if status != 0 or not path.is_file():
        raise RuntimeError(f"llama.cpp's quantizer failed for {precision} (status {status})")


def tensor_types(path: Path) -> dict[str, int]:
    from ..gguf_header import read_header

    return dict(Counter(t.type_name for t in read_header(path).tensors))


def k_quant_fallbacks(spec, precision: str) -> str | None:
    if precision not in K_QUANTS:
        return None
    widths = {spec.hidden_size, spec.intermediate_size}
    bad = sorted(w for w in widths if w % QK_K)
    if not bad:
        return None
    return (f"row widths {bad} are not multiples of {QK_K}: llama.cpp stores those tensors in a legacy "
            "quant (Q5_0/Q8_0/...) instead of a K-quant; see tensor_types")


def _intermediate(writer: BundleWriter) -> Path | None:
    found = sorted((writer.root / ".work").glob("intermediate-*.gguf"))
    return found[0] if found else None


def prepare_decoder(ckpt, manifest, writer: BundleWriter, precision: str, log=print, tensor_progress=None, **_) -> None:
    """Everything that needs the torch decoder: an F32/F16 GGUF itself, or the 16-bit quantizer input (written
    once for all quantized GGUFs). Runs before the exporter releases the decoder's weights."""
    (writer.root / "decoder").mkdir(exist_ok=True)
    tokenizer_dir = writer.root / "tokenizer"
    if precision in ("f32", "f16"):
        log(f"  writing {precision.upper()} GGUF")
        write_gguf(ckpt, manifest, writer.root / "decoder" / f"{precision}.gguf", tokenizer_dir, precision,
                   progress=tensor_progress)
    elif _intermediate(writer) is None:
        source_precision = intermediate_precision(ckpt)
        scratch = writer.root / ".work"
        scratch.mkdir(exist_ok=True)
        log(f"  writing {source_precision.upper()} GGUF (quantizer input)")
        write_gguf(ckpt, manifest, scratch / f"intermediate-{source_precision}.gguf", tokenizer_dir, source_precision,
                   progress=tensor_progress)


def export_decoder(ckpt, manifest, writer: BundleWriter, precision: str, log=print, threads: int | None = None, **_) -> Artifact:
    """The artifact, from what prepare_decoder wrote (the torch decoder may be gone by now)."""
    tokenizer_dir = writer.root / "tokenizer"
    path = writer.root / "decoder" / f"{precision}.gguf"
    if precision not in ("f32", "f16"):
        source = _intermediate(writer)
        if source is None:
            raise RuntimeError("the quantizer input is missing; prepare_decoder must run first")
        log(f"  quantizing to {precision} with llama.cpp")
        quantize(source, path, precision, threads)
    from ..gguf_header import read_header

    header = read_header(path)  # the sizes the start-up fit check needs without opening the GGUF (plan/bundle.py)
    details = {"ftype": file_type(precision), "tensor_types": tensor_types(path), "weight_bytes": header.weight_bytes,
               "bytes_per_token": header.bytes_per_token(), "block_params": header.block_params()}
    note = k_quant_fallbacks(manifest.decoder, precision)
    if note:
        details["k_quant_fallback"] = note
        log(f"  note: {note}")
    note = sentencepiece_note(tokenizer_dir)
    if note:
        details["tokenizer_note"] = note
        log(f"  note: {note}")
    return writer.artifact(f"gguf:{precision}", "decoder", "gguf", precision, f"decoder/{precision}.gguf", **details)


def release_intermediates(writer: BundleWriter) -> None:
    """Deleted once every quantized GGUF is written: it is as large as the decoder."""
    source = _intermediate(writer)
    if source is not None:
        source.unlink()
