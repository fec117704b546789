"""Seeded fuzzers for what users and files hand edgevlm: images, manifests, server request bodies, CLI options. Each
case either works or ends in edgevlm's own error (EdgeVLMError; argparse's exit 2 for unknown options); anything
else is a traceback. tests/test_fuzz.py runs a bounded number of cases in CI; benchmarks/fuzz.py runs 10,000."""
from __future__ import annotations

import base64
import copy
import io
import json
import traceback
from typing import Any, Callable, Iterable

import numpy as np
from PIL import Image

from edgevlm.errors import EdgeVLMError

ODD_VALUES = [None, -1, 0, 10**12, -(10**12), "", [], {}, 3.5, True, "../x", "/etc/passwd", "a" * 300, "nan", float("nan"),
              float("inf"), "tiles", "{% bad", {"url": 1}, [1, 2]]
DELETE = object()


class Tally:
    def __init__(self):
        self.counts = {"ok": 0, "clean error": 0, "traceback": 0}
        self.tracebacks: list[str] = []

    def run(self, label: str, call: Callable[[], Any]) -> None:
        try:
            call()
            self.counts["ok"] += 1
        except EdgeVLMError as exc:
            if "\n" in str(exc).strip():
                self.counts["traceback"] += 1
                self.tracebacks.append(f"{label}: a multi-line error: {exc}"[:400])
            else:
                self.counts["clean error"] += 1
        except SystemExit as exc:  # argparse: unknown option or bad type, usage printed, exit 2
            self.counts["clean error" if exc.code == 2 else "traceback"] += 1
            if exc.code != 2:
                self.tracebacks.append(f"{label}: SystemExit({exc.code})")
        except Exception as exc:  # noqa: BLE001 - exactly what the fuzzers hunt
            self.counts["traceback"] += 1
            self.tracebacks.append(f"{label}: {type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}"[:600])


# ---- images -----------------------------------------------------------------------------------------------------
IMAGE_FORMATS = ["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM", "ICO", "TGA"]
MODES = ["RGB", "RGBA", "L", "LA", "P", "1", "I;16", "I", "F", "CMYK"]


def image_case(rng: np.random.Generator) -> bytes:
    width, height = (int(v) for v in rng.integers(1, 300, 2))
    if rng.random() < 0.1:
        width, height = int(rng.choice([1, 2, 4000])), int(rng.choice([1, 3, 2000]))
    mode = str(rng.choice(MODES))
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    if mode == "I;16":  # 16-bit greys, as scanners and medical images write them
        image = Image.fromarray(pixels[..., 0].astype(np.uint16) * 257)
    else:
        image = Image.fromarray(pixels).convert(mode)
    buffer = io.BytesIO()
    fmt = str(rng.choice(IMAGE_FORMATS))
    try:
        image.save(buffer, fmt)
    except (OSError, ValueError, KeyError):  # this format cannot hold this mode: a plain PNG instead
        image.convert("RGB").save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    damage = rng.random()
    if damage < 0.25 and len(data) > 8:
        data = data[: int(rng.integers(1, len(data)))]  # truncated
    elif damage < 0.5:
        for _ in range(int(rng.integers(1, 20))):
            data[int(rng.integers(0, len(data)))] ^= int(rng.integers(1, 256))  # flipped bytes
    elif damage < 0.6:
        at = int(rng.integers(0, len(data)))
        data[at:at] = rng.integers(0, 256, int(rng.integers(1, 200)), dtype=np.uint8).tobytes()  # inserted noise
    return bytes(data)


def fuzz_images(n: int, seed: int, preprocess_specs: Iterable) -> Tally:
    from edgevlm.images import load_image
    from edgevlm.preprocess import preprocess

    tally, rng, specs = Tally(), np.random.default_rng(seed), list(preprocess_specs)

    def one(data: bytes):
        image = load_image(data)
        for spec in specs:
            preprocess(image, spec)

    for i in range(n):
        data = image_case(rng)
        tally.run(f"image case {i}", lambda: one(data))
    return tally


# ---- manifests ----------------------------------------------------------------------------------------------------
def leaves(value, path=()):
    yield path
    if isinstance(value, dict):
        for key, item in value.items():
            yield from leaves(item, path + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from leaves(item, path + (index,))


def mutate(data, path, new):
    data = copy.deepcopy(data)
    parent = data
    for key in path[:-1]:
        parent = parent[key]
    if new is DELETE:
        del parent[path[-1]]
    else:
        parent[path[-1]] = new
    return data


def manifest_cases(original: dict, n: int, rng: np.random.Generator) -> list[dict]:
    paths = [p for p in leaves(original) if p]
    values = ODD_VALUES + [DELETE]
    cases = []
    for _ in range(n):
        data = original
        for _ in range(1 if rng.random() < 0.8 else 2):
            path, value = paths[rng.integers(len(paths))], values[rng.integers(len(values))]
            try:
                data = mutate(data, path, value)
            except (KeyError, IndexError, TypeError):  # an earlier mutation removed this path's parent
                pass
        cases.append(data)
    return cases


def fuzz_manifests(bundle, image, n: int, seed: int) -> Tally:
    import edgevlm

    tally = Tally()
    original = json.loads((bundle / "manifest.json").read_text())

    def one():
        session = edgevlm.load(bundle, encoder="onnx:fp32", decoder="gguf:q8_0", threads=1)
        session.generate(image, "What colour is the circle?", max_tokens=2)

    try:
        for i, data in enumerate(manifest_cases(original, n, np.random.default_rng(seed))):
            (bundle / "manifest.json").write_text(json.dumps(data))
            tally.run(f"manifest case {i}", one)
    finally:
        (bundle / "manifest.json").write_text(json.dumps(original))
    return tally


# ---- server request bodies ---------------------------------------------------------------------------------------
def body_cases(image_png: bytes, n: int, rng: np.random.Generator) -> list[Any]:
    url = "data:image/png;base64," + base64.b64encode(image_png).decode()
    valid = {"model": "m", "max_tokens": 2, "messages": [
        {"role": "system", "content": "Be short."},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Colour?"}]}]}
    extra = ["data:image/png;base64,@@@", "data:image/png,abc", "data:;base64,", "http://x/y.png", "file:///nonexistent.png",
             "data:image/png;base64," + base64.b64encode(b"not an image").decode()]
    paths = [p for p in leaves(valid) if p]
    cases: list[Any] = []
    for _ in range(n):
        r = rng.random()
        if r < 0.05:
            cases.append(ODD_VALUES[rng.integers(len(ODD_VALUES))])  # not even an object
            continue
        data = valid
        for _ in range(int(rng.integers(1, 3))):
            path = paths[rng.integers(len(paths))]
            pool = ODD_VALUES + extra + [DELETE]
            try:
                data = mutate(data, path, pool[rng.integers(len(pool))])
            except (KeyError, IndexError, TypeError):
                pass
        if rng.random() < 0.2:
            data = {**data, str(rng.choice(["temperature", "top_p", "seed", "max_tokens", "stream"])):
                    ODD_VALUES[rng.integers(len(ODD_VALUES))]}
        cases.append(data)
    return cases


def fuzz_bodies(service, image_png: bytes, n: int, seed: int) -> Tally:
    """Each body through the server's own request path (parse, validate, generate), without the socket."""
    tally = Tally()

    def one(body):
        if not isinstance(body, dict):
            from edgevlm.errors import BadInputError

            raise BadInputError("the request body is not a JSON object")  # what the handler answers (400)
        for _ in service.complete(json.loads(json.dumps(body))):
            pass

    for i, body in enumerate(body_cases(image_png, n, np.random.default_rng(seed))):
        tally.run(f"body case {i}: {json.dumps(body)[:200]}", lambda: one(body))
    return tally


# ---- CLI options -------------------------------------------------------------------------------------------------
def cli_cases(bundle, image_path, n: int, rng: np.random.Generator) -> list[list[str]]:
    numbers = ["-1", "0", "1", "2", "3.5", "1e12", "nan", "abc", "", "99999999999999999999"]
    commands = {
        "run": ([str(bundle), "--image", str(image_path), "--prompt", "Colour?", "--threads", "1", "--max-tokens", "2"],
                ["--max-tokens", "--temperature", "--top-k", "--top-p", "--repetition-penalty", "--seed", "--threads",
                 "--n-ctx", "--embed-cache-mb", "--prefix-cache-mb", "--encoder", "--decoder", "--provider"]),
        "verify": ([str(bundle), "--threads", "1"], ["--threads"]),
        "inspect": ([str(bundle)], []),
        "eval": ([str(bundle), "-n", "1", "--threads", "1"], ["-n", "--threads", "--n-ctx", "--decoder"]),
        "bench": ([str(bundle), "--repeats", "1", "--new-tokens", "2", "--prompt-tokens", "2", "--image-size", "32x32",
                   "--peers", "", "--threads", "1", "--in-process", "--decoder", "gguf:q8_0", "--encoder", "onnx:fp32"],
                  ["--repeats", "--new-tokens", "--prompt-tokens", "--image-size", "--threads", "--accuracy", "--n-ctx"]),
    }
    names = list(commands)
    cases = []
    for _ in range(n):
        name = names[rng.integers(len(names))]
        base, options = commands[name]
        argv = [name, *base]
        for _ in range(int(rng.integers(1, 3))):
            if options and rng.random() < 0.85:
                argv += [str(rng.choice(options)), str(rng.choice(numbers + ["gguf:q9", "onnx:int8", "cuda", "x" * 300]))]
            else:
                argv += [f"--{''.join(rng.choice(list('abcxyz'), 5))}", "1"]  # an unknown option
        cases.append(argv)
    return cases


def fuzz_cli(bundle, image_path, n: int, seed: int) -> Tally:
    import contextlib

    from edgevlm.cli import main

    tally = Tally()

    def one(argv):
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            code = main(argv)
        if code not in (0, 1, 2):
            raise RuntimeError(f"exit code {code}")

    for i, argv in enumerate(cli_cases(bundle, image_path, n, np.random.default_rng(seed))):
        tally.run(f"cli case {i}: {argv}", lambda: one(argv))
    return tally
