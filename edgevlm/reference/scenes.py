"""Synthetic scenes for the reference model: 1-4 shapes (distinct kinds) in distinct places, with questions whose
answers are short and exactly checkable. Everything is a pure function of a seed."""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star")
COLOURS = {
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (40, 70, 230),
    "yellow": (240, 220, 30), "purple": (150, 40, 190), "orange": (250, 140, 20),
}
BACKGROUNDS = ((0, 0, 0), (60, 60, 60), (200, 200, 200), (245, 235, 215), (20, 30, 70))
# slot -> centre as a fraction of the canvas: the cells of a 3x3 grid
SLOTS = {"left": (1 / 6, 0.5), "right": (5 / 6, 0.5), "top": (0.5, 1 / 6), "bottom": (0.5, 5 / 6), "centre": (0.5, 0.5)}
SLOT_ORDER = ("top", "left", "centre", "right", "bottom")  # descriptions read the 3x3 grid row by row
NUMBERS = ("zero", "one", "two", "three", "four")
QUESTION_TYPES = ("colour", "count", "position", "presence", "describe")
IMAGE_SIZE = 128


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    slot: str


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]
    background: tuple[int, int, int]
    seed: int

    def find(self, kind: str) -> Shape | None:
        return next((s for s in self.shapes if s.kind == kind), None)


@dataclass(frozen=True)
class QA:
    kind: str
    question: str
    answer: str


def make_scene(seed: int, max_shapes: int = 4) -> Scene:
    rng = random.Random(seed)
    n = rng.randint(1, max_shapes)
    kinds = rng.sample(SHAPES, n)
    slots = rng.sample(list(SLOTS), n)
    shapes = tuple(Shape(k, rng.choice(list(COLOURS)), s) for k, s in zip(kinds, slots))
    return Scene(shapes, rng.choice(BACKGROUNDS), seed)


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if kind == "square":
        points = [(math.cos(angle + math.pi / 4 + i * math.pi / 2), math.sin(angle + math.pi / 4 + i * math.pi / 2)) for i in range(4)]
        scale = 0.95
    elif kind == "triangle":
        points = [(math.cos(-math.pi / 2 + i * 2 * math.pi / 3), math.sin(-math.pi / 2 + i * 2 * math.pi / 3)) for i in range(3)]
        scale = 1.15
    else:  # star
        points = []
        for i in range(10):
            radius = 1.0 if i % 2 == 0 else 0.45
            theta = -math.pi / 2 + i * math.pi / 5
            points.append((radius * math.cos(theta), radius * math.sin(theta)))
        scale = 1.25
    return [(cx + scale * r * x, cy + scale * r * y) for x, y in points]


def render(scene: Scene, size: int = IMAGE_SIZE) -> Image.Image:
    """Draw at 2x and downsample, for antialiased edges."""
    rng = random.Random(scene.seed * 7919 + 1)
    big = size * 2
    image = Image.new("RGB", (big, big), scene.background)
    draw = ImageDraw.Draw(image)
    for shape in scene.shapes:
        fx, fy = SLOTS[shape.slot]
        r = big * rng.uniform(0.13, 0.155)
        cx = big * (fx + rng.uniform(-0.015, 0.015))
        cy = big * (fy + rng.uniform(-0.015, 0.015))
        colour = COLOURS[shape.colour]
        if shape.kind == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        else:
            angle = rng.uniform(-0.15, 0.15) if shape.kind != "star" else rng.uniform(-0.2, 0.2)
            draw.polygon(_polygon(shape.kind, cx, cy, r, angle), fill=colour)
    return image.resize((size, size), Image.Resampling.BOX)


CALIBRATION_SEED = 3_000_000_000  # int8 calibration tiles (ONNX static QDQ and TensorRT): one set for both


def scene_tiles(spec, n: int, seed: int):
    """n preprocessed encoder tiles (n, 3, H, W) float32 from the scenes seed, seed + 1, ... (rendered at the tile
    size): calibration and probe inputs that look like what the encoder sees at run time."""
    import numpy as np

    from ..preprocess import preprocess

    tiles = []
    while len(tiles) < n:
        tiles.extend(preprocess(render(make_scene(seed), size=max(spec.tile_size)), spec).pixel_values)
        seed += 1
    return np.stack(tiles[:n]).astype(np.float32)


def cell_labels(scene: Scene, grid: int) -> tuple[list[int], list[int]]:
    """Per patch of a grid x grid patch layout (row-major): colour and shape index of the scene cell (3x3) the
    patch lies in, 0 = empty. An auxiliary training target for the vision tower."""
    by_cell = {}
    for shape in scene.shapes:
        fx, fy = SLOTS[shape.slot]
        by_cell[(int(fy * 3), int(fx * 3))] = shape
    colours, kinds = [], []
    for row in range(grid):
        for col in range(grid):
            shape = by_cell.get((row * 3 // grid, col * 3 // grid))
            colours.append(1 + list(COLOURS).index(shape.colour) if shape else 0)
            kinds.append(1 + SHAPES.index(shape.kind) if shape else 0)
    return colours, kinds


def describe(scene: Scene) -> str:
    ordered = sorted(scene.shapes, key=lambda s: SLOT_ORDER.index(s.slot))
    return ", ".join(f"{s.colour} {s.kind} {s.slot}" for s in ordered)


def question_rng(seed: int) -> random.Random:
    """The random stream that picks questions about scene `seed`: independent of the one that drew the scene
    (the same integer seed would replay make_scene's draws and tie the question to the scene's layout)."""
    return random.Random(f"questions-{seed}")


def questions(scene: Scene, rng: random.Random) -> dict[str, QA]:
    """One question of every type about the scene (the choice within a type comes from rng)."""
    shape = rng.choice(scene.shapes)
    present_kinds = [s.kind for s in scene.shapes]
    if rng.random() < 0.5:
        count_q = QA("count", "How many shapes are there?", NUMBERS[len(scene.shapes)])
    else:
        colour = rng.choice([s.colour for s in scene.shapes] + list(COLOURS))
        n = sum(s.colour == colour for s in scene.shapes)
        count_q = QA("count", f"How many {colour} shapes are there?", NUMBERS[n])
    if rng.random() < 0.5:
        kind = rng.choice(SHAPES)
        presence = QA("presence", f"Is there a {kind}?", "yes" if kind in present_kinds else "no")
    else:
        kind, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        if rng.random() < 0.5:  # often ask about a shape that is there, in its own or another colour
            kind = shape.kind
            colour = rng.choice([shape.colour, colour])
        truth = any(s.kind == kind and s.colour == colour for s in scene.shapes)
        presence = QA("presence", f"Is there a {colour} {kind}?", "yes" if truth else "no")
    return {
        "colour": QA("colour", f"What colour is the {shape.kind}?", shape.colour),
        "count": count_q,
        "position": QA("position", f"Where is the {shape.kind}?", shape.slot),
        "presence": presence,
        "describe": QA("describe", "Describe the image.", describe(scene)),
    }


def extra_questions(scene: Scene, rng: random.Random, n: int) -> list[QA]:
    """More binding practice for training: colour and position of every shape, presence of absent ones."""
    pool = []
    for shape in scene.shapes:
        pool.append(QA("colour", f"What colour is the {shape.kind}?", shape.colour))
        pool.append(QA("position", f"Where is the {shape.kind}?", shape.slot))
    for kind in SHAPES:
        colour = rng.choice(list(COLOURS))
        truth = any(s.kind == kind and s.colour == colour for s in scene.shapes)
        pool.append(QA("presence", f"Is there a {colour} {kind}?", "yes" if truth else "no"))
    rng.shuffle(pool)
    return pool[:n]


def all_questions() -> list[str]:
    """Every question the scenes ask, in a fixed order (each is one token of the reference tokenizer)."""
    out = ["How many shapes are there?", "Describe the image."]
    out += [f"How many {c} shapes are there?" for c in COLOURS]
    for kind in SHAPES:
        out += [f"What colour is the {kind}?", f"Where is the {kind}?", f"Is there a {kind}?"]
        out += [f"Is there a {c} {kind}?" for c in COLOURS]
    return out


def normalize(answer: str) -> str:
    return " ".join(answer.strip().lower().rstrip(".").split())


def corpus() -> list[str]:
    """Text to train the tokenizer on: every word the questions and answers use."""
    rng = random.Random(0)
    lines = []
    for seed in range(3000):
        scene = make_scene(seed)
        lines += [f"{qa.question} {qa.answer}" for qa in questions(scene, rng).values()]
    return lines
