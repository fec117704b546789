"""The torch half every family's load() shares: the loaded checkpoint split at the seam (vision module, decoder),
with its FamilySpec (preprocessing, layout, ...) from the family's torch-free describe()."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..layout import ImageLayout
from ..preprocess import PreprocessSpec
# the torch-free file readers, re-exported for the family loaders and older call sites
from .files import (PROCESSOR_FILES, TOKENIZER_FILES, WEIGHT_PATTERNS, check_files, checkpoint_sha256,  # noqa: F401
                    read_config, read_processor_config, resample_name)
from .spec import FamilySpec


@dataclass
class LoadedCheckpoint:
    spec: FamilySpec  # what describe() says of the checkpoint: family, preprocessing, layout, ...
    path: Path
    hf_model: Any  # the transformers model, kept for parity checks
    vision: torch.nn.Module  # pixel_values (tiles,3,H,W) float32 -> image_embeds (tiles,T,D)
    decoder: Any  # transformers.LlamaForCausalLM sharing the checkpoint's tensors
    tokenizer: Any
    chat_template: str | None
    stop_token_ids: list[int]
    context_length: int
    source_sha256: str
    extra: dict = field(default_factory=dict)

    @property
    def family(self) -> str:
        return self.spec.family

    @property
    def preprocess(self) -> PreprocessSpec:
        return self.spec.preprocess

    @property
    def layout(self) -> ImageLayout:
        return self.spec.layout

    @property
    def vision_dtype(self) -> torch.dtype:
        return next(self.vision.parameters()).dtype

    def release_decoder(self) -> None:
        """Free the decoder's weights (export writes every decoder artifact's inputs first, then this, so that the
        vision export never holds the decoder too). The modules stay, on the meta device; the torch decoder cannot
        run afterwards."""
        self._to_meta({p.data_ptr() for p in self.decoder.parameters()})
        self._own_vision_weights()
        self.extra["decoder_released"] = True

    def _own_vision_weights(self) -> None:
        """Private copies of the vision weights, which are views of the checkpoint's file mapping: while any view
        lives the whole mapping stays, and every decoder page read to write the decoder's inputs counts in RSS until
        the vision export (SmolVLM2-2.2B: 4.4 GB mapped against 0.85 GB of bf16 vision weights)."""
        copies: dict = {}
        for param in self.vision.parameters():
            if param.device.type != "meta":
                key = (param.data_ptr(), param.shape, param.stride(), param.dtype)  # tied weights stay tied
                if key not in copies:
                    copies[key] = param.data.clone()
                param.data = copies[key]

    def release_weights(self) -> None:
        """Free every weight (the last export steps need only files already written)."""
        self._to_meta({p.data_ptr() for m in (self.decoder, self.hf_model, self.vision) for p in m.parameters()})
        self.extra["weights_released"] = True

    def _to_meta(self, owned: set[int]) -> None:
        for model in (self.decoder, self.hf_model, self.vision):
            for module in model.modules():
                for name, param in list(module.named_parameters(recurse=False)):
                    if param.data_ptr() in owned:
                        setattr(module, name, torch.nn.Parameter(torch.empty(param.shape, dtype=param.dtype, device="meta"),
                                                                 requires_grad=False))

    @property
    def text_config(self):
        return self.decoder.config

    @property
    def decoder_architecture(self) -> str:
        """The decoder_arch row, as the spec read it from the VL model's own text config (Qwen2-VL's decoder is a
        Qwen2ForCausalLM whose config says qwen2, but its positions are M-RoPE)."""
        return self.spec.decoder_architecture

    @property
    def position_scheme(self) -> str:
        return self.spec.position_scheme

    @property
    def deepstack_layers(self) -> int:
        return self.spec.deepstack_layers

    @property
    def mrope_section(self) -> list[int] | None:
        section = self.spec.mrope_section
        return list(section) if self.position_scheme == "mrope" and section else None

    def parameter_counts(self) -> dict[str, int]:
        vision = sum(p.numel() for p in self.vision.parameters())
        seen: set[int] = set()
        decoder = 0
        for p in self.decoder.parameters():  # tied embeddings count once
            if p.data_ptr() not in seen:
                seen.add(p.data_ptr())
                decoder += p.numel()
        return {"vision+projector": vision, "decoder": decoder, "total": vision + decoder}


def read_chat_template(path: Path, tokenizer) -> str | None:
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text()
    if (path / "chat_template.json").is_file():
        return json.loads((path / "chat_template.json").read_text()).get("chat_template")
    return getattr(tokenizer, "chat_template", None)


def torch_dtype(name: str):
    """"float32" (the default: reference and parity) or "auto" (the checkpoint's stored dtype: export)."""
    if name == "auto":
        return "auto"
    if name != "float32":
        raise ValueError(f"checkpoint dtype {name!r}: use 'float32' or 'auto'")
    return torch.float32


def build_decoder(text_config, state_dict: dict[str, torch.Tensor]):
    """The text decoder as a plain transformers causal LM (the class its row in decoder_arch names) whose parameters
    are the checkpoint's own tensors (no copy)."""
    import importlib

    import transformers

    from ..decoder_arch import architecture_for_model_type

    arch = architecture_for_model_type(getattr(text_config, "model_type", "llama"))
    model_class = getattr(transformers, arch.hf_class)
    modeling = importlib.import_module(arch.hf_rotary_module or model_class.__module__)
    rotary_config = text_config.__class__.from_dict(text_config.to_dict())  # never mutate the caller's config
    tied = state_dict["lm_head.weight"].data_ptr() == state_dict["model.embed_tokens.weight"].data_ptr()
    rotary_config.tie_word_embeddings = tied
    decoder_config = rotary_config
    if not isinstance(text_config, model_class.config_class):  # a VL text config: the decoder class's own config
        values = {k: v for k, v in rotary_config.to_dict().items() if k not in ("model_type", "architectures")}
        rope = dict(values.get("rope_parameters") or {})
        for key in ("mrope_section", "mrope_interleaved"):  # the rotary below reads them from the VL config
            rope.pop(key, None)  # (Qwen2Config / Qwen3Config warn on them)
        decoder_config = model_class.config_class(**{**values, "rope_parameters": rope or None})
    with torch.device("meta"):
        decoder = model_class(decoder_config)
    decoder.load_state_dict(state_dict, assign=True, strict=True)
    # a non-persistent buffer, not in the state dict
    decoder.model.rotary_emb = getattr(modeling, arch.hf_rotary_class)(config=rotary_config)
    return decoder.eval()


def decoder_from(text_config, language_model: torch.nn.Module, lm_head: torch.nn.Module):
    """build_decoder from a VLM's language model (keys become model.*) and its lm_head: the families' common split."""
    return build_decoder(text_config, {**prefixed(language_model, "model."), "lm_head.weight": lm_head.weight})


def prefixed(module: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}{k}": v for k, v in module.state_dict(keep_vars=False).items()}


def stop_ids(path: Path, config: dict, tokenizer, extra_tokens: tuple[str, ...] = ()) -> list[int]:
    ids: set[int] = set()
    gen_file = path / "generation_config.json"
    sources = [config.get("eos_token_id"), config.get("text_config", {}).get("eos_token_id")]
    if gen_file.is_file():
        sources.append(json.loads(gen_file.read_text()).get("eos_token_id"))
    sources.append(tokenizer.eos_token_id)
    for value in sources:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(int(v) for v in value)
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in extra_tokens if t in vocab)
    return sorted(ids)


def loaded(spec: FamilySpec, path: Path, config_json: dict, hf_model, tokenizer, weights, vision, decoder,
           context_length: int | None = None) -> LoadedCheckpoint:
    """What every family's load() returns: its modules, with the checkpoint files' chat template, stop ids and hash;
    the context is the text config's max_position_embeddings unless the family says otherwise."""
    if context_length is None:
        context_length = hf_model.config.text_config.max_position_embeddings
    return LoadedCheckpoint(
        spec=spec, path=path, hf_model=hf_model, vision=vision, decoder=decoder, tokenizer=tokenizer,
        chat_template=read_chat_template(path, tokenizer),
        stop_token_ids=stop_ids(path, config_json, tokenizer, spec.stop_tokens),
        context_length=int(context_length), source_sha256=checkpoint_sha256(path, weights),
    )
