"""Where image embeddings go in the token stream: the placeholder a prompt carries and the text it expands to."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass

LAYOUT_KINDS = ("repeat", "idefics3", "wrapped", "grid", "gemma3", "idefics2", "anyres", "leading", "paligemma")


@dataclass(frozen=True)
class ImageLayout:
    """``repeat`` (LLaVA): the placeholder becomes ``tokens_per_tile`` image tokens.
    ``idefics3``: per tile ``<fake><row_r_col_c>`` + image tokens, a newline per row, then the global view
    ``\\n<fake><global-img>`` + image tokens + ``<fake>``; an unsplit image is only the global view.
    ``wrapped`` (InternVL): ``<img>`` + image tokens for every tile (the thumbnail last) + ``</img>``; the
    placeholder may be the image token itself (InternVL's is ``<IMG_CONTEXT>``): it is split on before expanding.
    ``grid`` (Qwen2-VL): one image token per merged patch, rows x cols of them (the image's own grid, so the count
    depends on its size); the placeholder is the image token itself and the chat template writes the delimiters
    around it (``<|vision_start|><|image_pad|><|vision_end|>``). tokens_per_tile is 1: a "tile" is one patch.
    ``gemma3``: the placeholder is ``<start_of_image>`` (start_token) and each tile becomes ``\\n\\n`` + start_token +
    image tokens + end_token + ``\\n\\n`` (Gemma3Processor.full_image_sequence); with pan-and-scan crops the whole
    image is introduced in words and the crops follow, space-separated (Gemma3Processor.replace_image_token).
    ``idefics2``: ``<fake>`` + (image tokens + ``<fake>``) per tile (4 quarters + the whole when split); `finish`
    then applies Idefics2Processor's two string fixes (adjacent images share one ``<fake>``; a word glued to a
    closing ``<fake>`` gets a space).
    ``anyres`` (LLaVA-OneVision): the placeholder becomes one image token per packed row (the base view, then the
    grid's unpadded, possibly pooled lines, each with its newline row); the count follows the image's size, so
    `expand` takes it (PreprocessSpec.anyres_rows). tokens_per_tile counts the encoder's rows per tile: the tower's
    patches plus the image_newline row each tile carries.
    ``leading`` (BLIP-2 / InstructBLIP): every image's tokens go before the whole prompt, BOS included (the
    processors tokenize the text alone and prepend them); placeholders in the text are dropped.
    ``paligemma``: the placeholder becomes ``tokens_per_tile`` image tokens; `finish` puts start_token (``<bos>``)
    right after the last image and a newline at the end (PaliGemmaProcessor), and the text is tokenized without the
    tokenizer's own bos (`adds_special_tokens`)."""

    kind: str
    placeholder: str  # what a user prompt contains, once per image
    image_token: str
    image_token_id: int
    tokens_per_tile: int
    fake_token: str | None = None
    global_token: str | None = None
    row_col_format: str | None = None  # e.g. "<row_{row}_col_{col}>", 1-based
    start_token: str | None = None  # wrapped: before an image's rows (InternVL "<img>")
    end_token: str | None = None  # wrapped: after them ("</img>")

    def __post_init__(self) -> None:
        if self.kind not in LAYOUT_KINDS:
            raise ValueError(f"image layout kind {self.kind!r} is not one of {LAYOUT_KINDS}")
        if self.tokens_per_tile <= 0:
            raise ValueError("tokens_per_tile must be positive")
        if self.kind == "idefics3" and not (self.fake_token and self.global_token and self.row_col_format):
            raise ValueError("the idefics3 layout needs fake_token, global_token and row_col_format")
        if self.kind == "grid" and self.tokens_per_tile != 1:
            raise ValueError("the grid layout has one image token per merged patch (tokens_per_tile 1)")
        if self.kind == "idefics2" and not self.fake_token:
            raise ValueError("the idefics2 layout needs fake_token")
        if self.kind in ("wrapped", "gemma3") and not (self.start_token and self.end_token):
            raise ValueError(f"the {self.kind} layout needs start_token and end_token")
        if self.kind == "paligemma" and not self.start_token:
            raise ValueError("the paligemma layout needs start_token (the bos after the images)")

    def expand(self, rows: int, cols: int, n_rows: int | None = None) -> str:
        """The text that replaces one placeholder for an image split into rows x cols tiles (0, 0 = unsplit);
        anyres: n_rows, the image's packed rows."""
        image = self.image_token * self.tokens_per_tile
        if self.kind == "anyres":
            if n_rows is None:
                raise ValueError("the anyres layout expands to the image's packed rows: pass n_rows")
            return self.image_token * n_rows
        if self.kind in ("repeat", "leading", "paligemma"):
            return image
        if self.kind == "grid":
            return self.image_token * (rows * cols)
        if self.kind == "wrapped":
            return self.start_token + image * self.n_tiles(rows, cols) + self.end_token
        if self.kind == "gemma3":
            tile = f"\n\n{self.start_token}{image}{self.end_token}\n\n"
            if rows == 0 and cols == 0:
                return tile
            return (f"Here is the original image {tile} and here are some crops to help you see better "
                    + " ".join([tile] * (rows * cols)))
        if self.kind == "idefics2":
            return self.fake_token + (image + self.fake_token) * self.n_tiles(rows, cols)
        global_view = f"{self.fake_token}{self.global_token}{image}{self.fake_token}"
        if rows == 0 and cols == 0:
            return global_view
        text = ""
        for r in range(rows):
            for c in range(cols):
                text += self.fake_token + self.row_col_format.format(row=r + 1, col=c + 1) + image
            text += "\n"
        return text + "\n" + global_view

    def finish(self, text: str) -> str:
        """The expanded prompt as the family's processor leaves it (idefics2: processing_idefics2's fixes)."""
        if self.kind == "paligemma":
            end = text.rfind(self.image_token)
            end = 0 if end < 0 else end + len(self.image_token)
            return text[:end] + self.start_token + text[end:] + "\n"
        if self.kind != "idefics2":
            return text
        fake = self.fake_token
        text = text.replace(fake + fake, fake)
        return re.sub(rf"{re.escape(fake)}(?=[^\s<])", fake + " ", text)

    @property
    def adds_special_tokens(self) -> bool:
        """Whether the tokenizer adds its own special tokens (bos) to the expanded prompt: not for PaliGemma, whose
        processor places bos after the images itself."""
        return self.kind != "paligemma"

    def n_tiles(self, rows: int, cols: int) -> int:
        if self.kind == "grid":
            return rows * cols
        if self.kind == "anyres":  # the base view + the grid
            return rows * cols + 1
        return 1 if rows == 0 and cols == 0 else rows * cols + 1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ImageLayout":
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})
