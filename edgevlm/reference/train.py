"""The reference model: a small LLaVA-family VLM that edgevlm builds and trains itself, on CPU, on synthetic
scenes (edgevlm.scenes). It answers questions about the image correctly, so export and quantization damage
shows up as task accuracy. Saved as an ordinary HF checkpoint folder, cached per recipe hash."""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from . import scenes
from .tokenizers import REFERENCE_TEMPLATE, train_bpe, wrap

SPECIAL_TOKENS = ["<|endoftext|>", "<|user|>", "<|im_end|>", "<image>"]
TRAIN_SEED_BASE = 0  # training scenes use seeds [0, 10^8); eval uses 10^9 onwards (edgevlm.evaluate)
RECIPE_VERSION = 1  # bump when the training code changes what a recipe produces
TRAIN_THREADS = 2  # torch threads for training, fixed: the weights depend on it (the 5-minute budget assumes 2)


@dataclass(frozen=True)
class Recipe:
    seed: int = 0
    # model input: scenes are rendered at 128 and resized by the processor; one patch per cell of the scenes'
    # 3x3 layout gives 9 image tokens
    image_size: int = 96
    patch_size: int = 32
    vision_hidden: int = 128
    vision_layers: int = 3
    vision_heads: int = 4
    vision_mlp: int = 512
    # decoder widths are multiples of 256 so llama.cpp K-quants apply without fallbacks
    text_hidden: int = 256
    text_layers: int = 3
    text_heads: int = 4
    text_kv_heads: int = 2
    text_mlp: int = 768
    vocab_size: int = 384
    context: int = 512
    steps: int = 2100
    batch_size: int = 8
    qa_per_image: int = 5  # one question of each type, in random order
    extra_qa: int = 3  # then this many more colour/position/presence questions about the same image
    lr: float = 1e-3
    warmup: int = 50
    # auxiliary loss: the projector's output per patch regresses onto a fixed symbolic embedding of what the patch
    # holds (see build_reference); it teaches the tower in seconds what the answers alone take far longer to
    aux_weight: float = 1.0
    vision_steps: int = 400  # stage 1: tower + projector alone on the auxiliary loss (cheap: 9 patches, no decoder)
    vision_batch: int = 32
    curriculum: float = 0.25  # this fraction of stage 2 sees at most two shapes per scene: binding with few distractors
    # ViT's usual position-embedding init (std 0.02) is ~50x quieter than a patch's content after the patch
    # projection: a tower trained for minutes then never learns where a patch is (position answers stayed at
    # chance level). Starting positions at the content's scale makes "which cell" as easy to read as "which colour".
    position_init_std: float = 1.0

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError("image_size must be a multiple of patch_size")
        if self.text_hidden % self.text_heads or self.text_heads % self.text_kv_heads:
            raise ValueError("text_hidden must divide by text_heads, and text_heads by text_kv_heads")
        if not 1 <= self.qa_per_image <= len(scenes.QUESTION_TYPES):
            raise ValueError(f"qa_per_image must be 1..{len(scenes.QUESTION_TYPES)}")

    def digest(self) -> str:
        payload = json.dumps({"recipe": asdict(self), "version": RECIPE_VERSION}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


DEFAULT_RECIPE = Recipe()
TINY_RECIPE = Recipe(image_size=48, patch_size=16, vision_hidden=32, vision_layers=1, vision_heads=2, vision_mlp=64,
                     text_hidden=64, text_layers=1, text_heads=2, text_kv_heads=1, text_mlp=128, steps=3, batch_size=2,
                     warmup=1, vision_steps=2, vision_batch=2)


def cache_root() -> Path:
    return Path(os.environ.get("EDGEVLM_CACHE_DIR", Path.home() / ".cache" / "edgevlm"))


def reference_path(recipe: Recipe = DEFAULT_RECIPE) -> Path:
    return cache_root() / "reference" / f"llava-shapes-{recipe.digest()}"


def _config(recipe: Recipe, vocab_size: int, image_token_id: int):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=recipe.vision_hidden, intermediate_size=recipe.vision_mlp, num_hidden_layers=recipe.vision_layers,
        num_attention_heads=recipe.vision_heads, image_size=recipe.image_size, patch_size=recipe.patch_size,
    )
    text = LlamaConfig(
        vocab_size=vocab_size, hidden_size=recipe.text_hidden, intermediate_size=recipe.text_mlp,
        num_hidden_layers=recipe.text_layers, num_attention_heads=recipe.text_heads,
        num_key_value_heads=recipe.text_kv_heads, max_position_embeddings=recipe.context, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=0, eos_token_id=2, pad_token_id=0,
    )
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_token_id, vision_feature_layer=-1,
                       vision_feature_select_strategy="default", projector_hidden_act="gelu")


class Batcher:
    """Training batches: each image with several question/answer turns; loss only on the answers."""

    def __init__(self, recipe: Recipe, tokenizer, spec, layout):
        self.recipe, self.tokenizer, self.spec, self.layout = recipe, tokenizer, spec, layout
        self.pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
        self._ids: dict[str, list[int]] = {}

    def ids(self, text: str) -> list[int]:
        if text not in self._ids:  # questions and answers repeat: tokenize each once
            self._ids[text] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self._ids[text]

    def sample(self, seed: int, max_shapes: int = 4):
        from ..preprocess import preprocess

        scene = scenes.make_scene(seed, max_shapes)
        rng = scenes.question_rng(seed)
        qas = list(scenes.questions(scene, rng).values())
        rng.shuffle(qas)  # every question type appears first (as in eval) and later in a conversation
        qas = qas[: self.recipe.qa_per_image] + scenes.extra_questions(scene, rng, self.recipe.extra_qa)
        pixels = preprocess(scenes.render(scene), self.spec).pixel_values[0]
        grid = self.recipe.image_size // self.recipe.patch_size
        cells = scenes.cell_labels(scene, grid)
        ids: list[int] = []
        labels: list[int] = []
        for turn, qa in enumerate(qas):
            image = self.layout.expand(0, 0) if turn == 0 else ""
            prompt = f"<|user|>{image}{qa.question}"
            answer = f" {qa.answer}<|im_end|>"  # " top" is one token; "top" after the question is split
            p, a = self.ids(prompt), self.ids(answer)
            ids += p + a
            labels += [-100] * len(p) + a
        return pixels, ids, labels, qas, cells

    def batch(self, first_seed: int, size: int, max_shapes: int = 4):
        import numpy as np
        import torch

        samples = [self.sample(first_seed + i, max_shapes) for i in range(size)]
        width = max(len(s[1]) for s in samples)
        input_ids = torch.full((len(samples), width), self.pad, dtype=torch.long)
        labels = torch.full((len(samples), width), -100, dtype=torch.long)
        mask = torch.zeros((len(samples), width), dtype=torch.long)
        for row, (_, ids, labs, _, _) in enumerate(samples):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, : len(labs)] = torch.tensor(labs)
            mask[row, : len(ids)] = 1
        pixels = torch.from_numpy(np.stack([s[0] for s in samples]))  # (B, 3, H, W)
        colours = torch.tensor([s[4][0] for s in samples])  # (B, cells)
        kinds = torch.tensor([s[4][1] for s in samples])  # (B, cells)
        return pixels, input_ids, mask, labels, colours, kinds


def quick_accuracy(model, batcher: Batcher, n_images: int = 40) -> dict[str, float]:
    """Teacher-forced exact match on held-out single-turn questions (every answer token is the argmax): equal to
    greedy exact match, at the cost of one batched forward. For watching training, not for reporting."""
    import numpy as np
    import torch

    from .evaluate import EVAL_SEED_BASE

    hits: dict[str, list[int]] = {t: [] for t in scenes.QUESTION_TYPES}
    rows = []
    from ..preprocess import preprocess

    for i in range(n_images):
        scene = scenes.make_scene(EVAL_SEED_BASE + i)
        pixels = preprocess(scenes.render(scene), batcher.spec).pixel_values[0]
        for qa in scenes.questions(scene, scenes.question_rng(EVAL_SEED_BASE + i)).values():
            prompt = f"<|user|>{batcher.layout.expand(0, 0)}{qa.question}"
            p, a = batcher.ids(prompt), batcher.ids(f" {qa.answer}<|im_end|>")
            rows.append((pixels, p + a, len(p), a, qa.kind))
    width = max(len(r[1]) for r in rows)
    ids = torch.full((len(rows), width), batcher.pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for j, (_, seq, _, _, _) in enumerate(rows):
        ids[j, : len(seq)] = torch.tensor(seq)
        mask[j, : len(seq)] = 1
    pixels = torch.from_numpy(np.stack([r[0] for r in rows]))
    with torch.inference_mode():
        predicted = model(pixel_values=pixels, input_ids=ids, attention_mask=mask).logits.argmax(-1)
    for j, (_, _, n_prompt, answer, kind) in enumerate(rows):
        guess = predicted[j, n_prompt - 1 : n_prompt - 1 + len(answer)].tolist()
        hits[kind].append(int(guess == answer))
    result = {k: sum(v) / len(v) for k, v in hits.items()}
    result["overall"] = sum(sum(v) for v in hits.values()) / len(rows)
    return result


def build_reference(out: Path, recipe: Recipe = DEFAULT_RECIPE, progress: Callable[[int, int, float], None] | None = None,
                    monitor: tuple[int, Callable[[int, dict], None]] | None = None) -> dict:
    """Train and save; returns training facts (seconds, final loss, parameters).

    torch's CPU kernels split some reductions by thread count, so the weights depend on it: training always runs
    with TRAIN_THREADS (a test session that had set 1 thread built different weights than the 2-thread CLI)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(TRAIN_THREADS)
    try:
        return _train_and_save(out, recipe, progress, monitor)
    finally:
        torch.set_num_threads(previous)


def _train_and_save(out: Path, recipe: Recipe, progress, monitor) -> dict:
    import torch
    from transformers import LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from ..families import llava as llava_family
    from ..families.spec import Vocabulary

    torch.manual_seed(recipe.seed)
    random.seed(recipe.seed)
    bpe = train_bpe(scenes.corpus(), recipe.vocab_size, SPECIAL_TOKENS)
    bpe.add_tokens(scenes.all_questions())  # whole-question tokens (see REFERENCE_TEMPLATE)
    tokenizer = wrap(bpe, bos="<|endoftext|>",
                     eos="<|im_end|>", pad="<|endoftext|>", chat_template=REFERENCE_TEMPLATE)
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    config = _config(recipe, len(tokenizer), image_token_id)
    model = LlavaForConditionalGeneration(config)
    if recipe.position_init_std:
        with torch.no_grad():
            model.model.vision_tower.embeddings.position_embedding.weight.normal_(0.0, recipe.position_init_std)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": recipe.image_size},
                                            crop_size={"height": recipe.image_size, "width": recipe.image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=recipe.patch_size,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=REFERENCE_TEMPLATE)
    described = llava_family.describe(config.to_dict(), image_processor.to_dict(), Vocabulary.from_tokenizer(tokenizer))
    spec, layout = described.preprocess, described.layout
    batcher = Batcher(recipe, tokenizer, spec, layout)
    _check_tokenization(batcher, tokenizer)

    if (recipe.image_size // recipe.patch_size) ** 2 != layout.tokens_per_tile:
        raise RuntimeError("the reference layout expects one image token per patch")
    # The tower + projector regress each patch onto a fixed symbolic embedding: colour + shape + cell, from fixed
    # random tables. Probed directly, a small decoder learns the questions in a few hundred steps on such clean
    # inputs, while learning to read raw tower features (where shape is a quiet direction) takes it far longer.
    tables = torch.Generator().manual_seed(recipe.seed + 1)
    n_cells, n_colours, n_kinds = layout.tokens_per_tile, len(scenes.COLOURS) + 1, len(scenes.SHAPES) + 1
    colour_table = torch.randn(n_colours, recipe.text_hidden, generator=tables)
    kind_table = torch.randn(n_kinds, recipe.text_hidden, generator=tables)
    cell_table = torch.randn(n_cells, recipe.text_hidden, generator=tables)
    # shape x colour and shape x cell vectors: "where is the star" and "is there a red star" then read a direction
    # only the star's token carries, so a not-yet-sharp attention over the image still gives the right answer
    kind_colour_table = torch.randn(n_kinds, n_colours, recipe.text_hidden, generator=tables)
    kind_cell_table = torch.randn(n_kinds, n_cells, recipe.text_hidden, generator=tables)
    cells = torch.arange(n_cells)
    # The corner cells never hold a shape: each becomes a summary of one shape kind (its colour and its cell, or
    # "absent"), gathered by the tower's attention. A question about the star then reads one fixed token.
    corners = [0, 2, 6, 8] if n_cells == 9 else []
    summary_table = torch.randn(n_kinds, recipe.text_hidden, generator=tables)
    summary_colour_table = torch.randn(n_colours, recipe.text_hidden, generator=tables)
    summary_cell_table = torch.randn(n_cells + 1, recipe.text_hidden, generator=tables)  # last row: absent

    def aux_loss(pixels, colours, kinds):
        states = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states
        layers = config.vision_feature_layer
        layers = [layers] if isinstance(layers, int) else list(layers)
        features = torch.cat([states[i][:, 1:] for i in layers], dim=-1)  # what LLaVA's projector reads, CLS dropped
        patches = model.model.multi_modal_projector(features)  # (B, cells, D)
        target = (colour_table[colours] + kind_table[kinds] + cell_table[None] + kind_colour_table[kinds, colours]
                  + kind_cell_table[kinds, cells[None].expand_as(kinds)])  # (B, cells, D)
        for kind, corner in enumerate(corners, start=1):
            where = kinds == kind  # (B, cells)
            present = where.any(1)
            colour = (colours * where).sum(1)  # 0 when absent
            cell = torch.where(present, (cells[None] * where).sum(1), torch.full_like(present, n_cells, dtype=torch.long))
            target[:, corner] = summary_table[kind] + summary_colour_table[colour] + summary_cell_table[cell]
        return torch.nn.functional.mse_loss(patches, target)

    model.train()
    start = time.perf_counter()
    total = recipe.vision_steps + recipe.steps
    loss_ema = None
    seed = TRAIN_SEED_BASE

    def report(step: int, loss: float) -> None:
        nonlocal loss_ema
        loss_ema = loss if loss_ema is None else 0.95 * loss_ema + 0.05 * loss
        if progress:
            progress(step, total, loss_ema)

    # stage 1: the vision tower learns colour and shape per patch
    vision_parameters = (list(model.model.vision_tower.parameters())
                         + list(model.model.multi_modal_projector.parameters()))
    optimizer = torch.optim.AdamW(vision_parameters, lr=recipe.lr, weight_decay=0.01, betas=(0.9, 0.98))
    for step in range(recipe.vision_steps):
        pixels, _, _, _, colours, kinds = batcher.batch(seed, recipe.vision_batch)
        seed += recipe.vision_batch
        loss = aux_loss(pixels, colours, kinds)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        report(step + 1, loss.item())

    # stage 2: the whole VLM on the answers (the auxiliary loss keeps the tower honest)
    parameters = list(model.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=recipe.lr, weight_decay=0.01, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < recipe.warmup:
            return (step + 1) / recipe.warmup
        progress_frac = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress_frac))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    loss_ema = None
    for step in range(recipe.steps):
        max_shapes = 2 if step < recipe.curriculum * recipe.steps else 4
        pixels, input_ids, mask, labels, colours, kinds = batcher.batch(seed, recipe.batch_size, max_shapes)
        seed += recipe.batch_size
        loss = model(pixel_values=pixels, input_ids=input_ids, attention_mask=mask, labels=labels).loss
        if recipe.aux_weight:
            loss = loss + recipe.aux_weight * aux_loss(pixels, colours, kinds)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        scheduler.step()
        report(recipe.vision_steps + step + 1, loss.item())
        if monitor and (step + 1) % monitor[0] == 0:
            model.eval()
            monitor[1](step + 1, quick_accuracy(model, batcher))
            model.train()
    seconds = time.perf_counter() - start
    model.eval()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.pad_token_id = batcher.pad
    model.save_pretrained(out)
    processor.save_pretrained(out)
    facts = {"recipe": asdict(recipe), "digest": recipe.digest(), "train_seconds": round(seconds, 1),
             "held_out_teacher_forced": quick_accuracy(model, batcher),
             "final_loss_ema": round(loss_ema, 4), "parameters": sum(p.numel() for p in model.parameters()),
             "torch_threads": torch.get_num_threads()}
    (out / "edgevlm_reference.json").write_text(json.dumps(facts, indent=2) + "\n")
    return facts


def _check_tokenization(batcher: Batcher, tokenizer) -> None:
    """Training pieces must tokenize exactly as the chat template renders the same conversation at run time."""
    _, ids, _, qas, _ = batcher.sample(TRAIN_SEED_BASE)
    messages = []
    for turn, qa in enumerate(qas):
        content = ([{"type": "image"}] if turn == 0 else []) + [{"type": "text", "text": qa.question}]
        messages += [{"role": "user", "content": content}, {"role": "assistant", "content": f" {qa.answer}"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    text = text.replace("<image>", batcher.layout.expand(0, 0), 1)
    if tokenizer(text, add_special_tokens=False)["input_ids"] != ids:
        raise RuntimeError("reference training tokens differ from the chat template's; fix Batcher.sample")


def ensure_reference(recipe: Recipe = DEFAULT_RECIPE, out: Path | None = None, force: bool = False,
                     progress: Callable[[int, int, float], None] | None = None) -> Path:
    """The cached reference checkpoint, trained first if missing (atomic: a half-trained folder never appears)."""
    out = Path(out) if out else reference_path(recipe)
    if (out / "edgevlm_reference.json").is_file() and not force:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        build_reference(temp, recipe, progress)
        if out.exists():
            shutil.rmtree(out)
        temp.rename(out)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return out
