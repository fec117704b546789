"""Prompt building, pure: messages -> chat text -> token ids with image-token runs, the identity of every position
(for KV reuse), where each image ends (prefix-cache boundaries), and every position's decoder position."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from ..errors import BadInputError, BundleError
from ..images import load_image
from ..layout import ImageLayout
from ..positions import ImageSpan, PositionPlan, plan_positions
from ..preprocess import PreprocessSpec, tile_grid


@dataclass
class RuntimeSpec:
    """Everything the session needs besides the two backends; built from a checkpoint or a bundle manifest."""

    tokenizer: Any
    chat_template: str | None
    preprocess: PreprocessSpec
    layout: ImageLayout
    stop_token_ids: list[int]
    position_scheme: str = "1d"
    image_attention: str = "causal"  # positions.IMAGE_ATTENTION
    # the encoder also reads the prompt (InstructBLIP): text -> ids (runtimes/tokenizer.InstructionTokenizer)
    instruction_tokenizer: Any = None
    video: Any = None  # the family's video processing (edgevlm.video.kinds); None: the model takes no video


@dataclass
class PreparedImage:
    rgb: Image.Image
    key: str  # content hash: decoded pixels + preprocessing + encoder artifact (+ the instruction's ids)
    rows: int
    cols: int
    n_rows_embedded: int  # tiles * tokens per tile
    instruction: np.ndarray | None = None  # (n,) int64: what the encoder reads besides the pixels, when it does
    # anyres (LLaVA-OneVision) with several images in the prompt: each is one square-padded view (no grid, no
    # packing), as HF's processor and model treat every image of a multi-image prompt
    square_view: bool = False
    # a video frame: rgb is its (H, W, 3) uint8 array and this its family's frame preprocessing (not the image one)
    frame_preprocess: Any = None


@dataclass
class Prompt:
    ids: np.ndarray  # (N,) token ids with image tokens in place
    keys: list  # per position: token id, or (image key, row of that image)
    runs: list[tuple[int, int, int, int]]  # (start, stop, image index, first row) of each image-token run
    positions: PositionPlan
    boundaries: list[int] = field(default_factory=list)  # position right after each image's last row

    def __len__(self) -> int:
        return len(self.ids)


def image_key(rgb: Image.Image, preprocess: PreprocessSpec, encoder_id: str, instruction: np.ndarray | None = None,
              square_view: bool = False) -> str:
    digest = hashlib.sha256()
    if square_view:  # other pixels and other rows than the same image's anyres grid
        digest.update(b"square-view:")
    digest.update(f"{rgb.size}".encode())
    digest.update(rgb.tobytes())
    digest.update(json.dumps(preprocess.to_dict(), sort_keys=True).encode())
    digest.update(encoder_id.encode())
    if instruction is not None:  # the same pixels read with another instruction are other rows
        digest.update(b"instruction:" + np.asarray(instruction, dtype=np.int64).tobytes())
    return digest.hexdigest()


def instruction_text(spec: RuntimeSpec, text: str) -> str:
    """What the encoder's instruction input reads: the rendered prompt without its image placeholders (the text
    InstructBlipProcessor is given)."""
    return "".join(text.split(spec.layout.placeholder))


def prepare_image(spec: RuntimeSpec, source, encoder_id: str, text: str | None = None) -> PreparedImage:
    """`text`: the rendered prompt, needed when the encoder reads it too (spec.instruction_tokenizer)."""
    rgb = load_image(source)
    rows, cols = tile_grid(rgb.size[1], rgb.size[0], spec.preprocess)
    n_rows = spec.layout.n_tiles(rows, cols) * spec.layout.tokens_per_tile
    # anyres: several images in the prompt (the whole conversation, as HF's chat template hands them to the
    # processor) make each one square view: the tile's rows + the newline row; one image is packed (unpadded, pooled)
    square_view = spec.preprocess.resize_rule == "anyres" and text is not None and \
        text.count(spec.layout.placeholder) > 1
    if square_view:
        rows, cols, n_rows = 0, 0, spec.layout.tokens_per_tile
    elif spec.preprocess.resize_rule == "anyres":
        n_rows = spec.preprocess.anyres_rows(rgb.size[1], rgb.size[0])
    instruction = None
    if spec.instruction_tokenizer is not None:
        if text is None:
            raise ValueError("this encoder reads the prompt too: prepare images with the rendered prompt")
        instruction = spec.instruction_tokenizer(instruction_text(spec, text))
    return PreparedImage(rgb, image_key(rgb, spec.preprocess, encoder_id, instruction, square_view), rows, cols, n_rows,
                         instruction, square_view)


def render(spec: RuntimeSpec, messages: list[dict]) -> str:
    """The chat template applied to messages whose content lists {"type": "image"} and {"type": "text"} items."""
    if not spec.chat_template:
        return "".join(spec.layout.placeholder if item["type"] == "image" else item["text"]
                       for message in messages for item in message["content"])
    import jinja2

    try:
        return spec.tokenizer.apply_chat_template(messages, chat_template=spec.chat_template, tokenize=False,
                                                  add_generation_prompt=True)
    except jinja2.TemplateError as exc:  # a template edited by hand: the bundle's problem, said in one line
        raise BundleError(f"the chat template cannot be rendered ({type(exc).__name__}: {exc}); fix "
                          "tokenizer.chat_template in manifest.json or re-export the bundle") from None


def user_message(spec: RuntimeSpec, prompt: str, n_images: int) -> dict:
    placeholder = spec.layout.placeholder
    if placeholder not in prompt:
        return {"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": prompt}]}
    if prompt.count(placeholder) != n_images:
        raise BadInputError(
            f"the prompt has {prompt.count(placeholder)} {placeholder} placeholders but {n_images} images were "
            f"given; use one {placeholder} per image, or none to put the images first"
        )
    content: list[dict] = []
    pieces = prompt.split(placeholder)
    for i, piece in enumerate(pieces):
        if piece:
            content.append({"type": "text", "text": piece})
        if i < len(pieces) - 1:
            content.append({"type": "image"})
    return {"role": "user", "content": content}


def tokenize(spec: RuntimeSpec, text: str, images: list[PreparedImage]) -> Prompt:
    layout = spec.layout
    pieces = text.split(layout.placeholder)
    if len(pieces) - 1 != len(images):
        raise BadInputError(f"the prompt text has {len(pieces) - 1} image placeholders but {len(images)} images were given")
    if layout.kind == "leading":  # BLIP-2 / InstructBLIP: image tokens before the text's own special tokens
        leading = [layout.image_token_id] * sum(image.n_rows_embedded for image in images)
        ids = np.asarray(leading + list(spec.tokenizer("".join(pieces), add_special_tokens=True)["input_ids"]),
                         dtype=np.int32)
    else:
        expanded = pieces[0]
        for image, piece in zip(images, pieces[1:]):
            expanded += layout.expand(image.rows, image.cols, image.n_rows_embedded) + piece
        expanded = layout.finish(expanded)
        ids = np.asarray(spec.tokenizer(expanded, add_special_tokens=layout.adds_special_tokens)["input_ids"],
                         dtype=np.int32)
    is_image = ids == layout.image_token_id
    keys: list = ids.tolist()
    runs: list[tuple[int, int, int, int]] = []
    boundaries: list[int] = []
    rows_done = [0] * len(images)
    image_index, pos = 0, 0
    while pos < len(ids):
        if not is_image[pos]:
            pos += 1
            continue
        if image_index >= len(images):
            raise BadInputError("the prompt contains more image tokens than the images given explain; "
                                "do not type image tokens yourself")
        stop = pos
        while stop < len(ids) and is_image[stop]:
            stop += 1
        # a run never takes more rows than the current image still needs: images side by side (nothing between
        # them) form one stretch of image tokens that belongs to several images
        image = images[image_index]
        stop = min(stop, pos + image.n_rows_embedded - rows_done[image_index])
        first = rows_done[image_index]
        for p in range(pos, stop):
            keys[p] = (image.key, first + p - pos)
        runs.append((pos, stop, image_index, first))
        rows_done[image_index] += stop - pos
        if rows_done[image_index] == image.n_rows_embedded:
            boundaries.append(stop)
            image_index += 1
        pos = stop
    if image_index != len(images):
        raise BadInputError("image tokens in the prompt do not match the images' tile layout; do not type image "
                            "tokens yourself")
    spans = _image_spans(runs, images) if spec.position_scheme == "mrope" else []
    return Prompt(ids, keys, runs, plan_positions(spec.position_scheme, len(ids), spans), boundaries)


def whole_images(prompt: Prompt, n_positions: int) -> int:
    """The largest cut <= n_positions that does not fall inside an image's run of rows."""
    for start, stop, _, _ in prompt.runs:
        if start < n_positions < stop:
            return start
    return n_positions


def _image_spans(runs: list[tuple[int, int, int, int]], images: list[PreparedImage]) -> list[ImageSpan]:
    """Each image's rows as one span of its merged grid, for schemes that place rows on a grid (M-RoPE)."""
    spans = []
    for start, stop, index, first_row in runs:
        image = images[index]
        if first_row != 0 or stop - start != image.n_rows_embedded or image.rows * image.cols != image.n_rows_embedded:
            raise BundleError("M-RoPE positions need each image's rows as one run of its grid; the manifest's image "
                              "layout does not give that (re-export the bundle)")
        spans.append(ImageSpan(start, image.rows, image.cols))
    return spans
