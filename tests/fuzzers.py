"""Fuzzers for what users, files and clients hand edgevlm: images, manifests, crafted GGUF headers (decoders and
mmprojs), server request bodies, CLI options. Cases come from Hypothesis strategies (tests/strategies.py), so a
failure shrinks to its smallest input and is saved (tests/hypothesis_profile.py). Each case either works or ends in
edgevlm's own one-line error (EdgeVLMError; argparse's exit 2 for unknown options); anything else is a traceback.
tests/test_fuzz.py runs bounded, fixed-seed cases in CI; benchmarks/fuzz.py runs 10,000 of each and counts."""
from __future__ import annotations

import io
import json
import time
import traceback
from collections import Counter
from typing import Any, Callable

from hypothesis import given, seed as fixed_seed, settings

import gguf_craft
import strategies
from edgevlm.errors import EdgeVLMError
from hypothesis_profile import PHASES, SLOW_OK, example_database


PROGRESS = None  # benchmarks/fuzz.py: a file each case's label is written to first, so a child that dies says which


class Tally:
    def __init__(self):
        self.counts = {"ok": 0, "clean error": 0, "traceback": 0}
        self.tracebacks: list[str] = []
        self.errors: Counter = Counter()  # clean errors by type
        self.by_reader: dict[str, Counter] = {}  # crafted files: outcomes per reader
        self.statuses: Counter = Counter()  # the server: answers by HTTP status
        self.slowest_s = 0.0
        self.cases = 0
        self.progress = PROGRESS

    def run(self, label: str, call: Callable[[], Any], reader: str | None = None) -> str:
        if self.progress is not None:
            self.progress.write_text(label[:2000])
        start = time.perf_counter()
        try:
            call()
            outcome = "ok"
        except EdgeVLMError as exc:
            outcome = "clean error"
            self.errors[type(exc).__name__] += 1
            if "\n" in str(exc).strip():
                outcome = "traceback"
                self.tracebacks.append(f"{label}: a multi-line error: {exc}"[:400])
        except SystemExit as exc:  # argparse: unknown option or bad type, usage printed, exit 2
            outcome = "clean error" if exc.code == 2 else "traceback"
            self.errors["usage (exit 2)"] += exc.code == 2
            if exc.code != 2:
                self.tracebacks.append(f"{label}: SystemExit({exc.code})")
        except Exception as exc:  # noqa: BLE001 - exactly what the fuzzers hunt
            outcome = "traceback"
            self.tracebacks.append(f"{label}: {type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}"[:600])
        self.slowest_s = max(self.slowest_s, time.perf_counter() - start)
        self.counts[outcome] += 1
        if reader is not None:
            self.by_reader.setdefault(reader, Counter())[outcome] += 1
        return outcome

    def as_dict(self) -> dict:
        return {"cases": self.cases, "outcomes": dict(self.counts), "errors_by_type": dict(self.errors.most_common()),
                **({"by_reader": {k: dict(v) for k, v in self.by_reader.items()}} if self.by_reader else {}),
                **({"http_statuses": {str(k): v for k, v in sorted(self.statuses.items())}} if self.statuses else {}),
                "slowest_case_s": round(self.slowest_s, 3), "tracebacks": self.tracebacks[:10]}


def drive(name: str, strategy, check: Callable[[Any, Tally], str], n: int, seed: int, strict: bool) -> Tally:
    """`check` on `n` examples of `strategy` (fixed seed). strict (tests): a traceback fails the example, so
    Hypothesis shrinks it and saves it in the fuzzer's example database; otherwise (benchmark) every case is
    counted and nothing is saved."""
    tally = Tally()

    # the profile's settings restated: benchmarks/fuzz.py runs without tests/conftest.py (no 200 ms deadline there)
    @settings(max_examples=n, database=example_database(name) if strict else None, deadline=None, phases=PHASES,
              suppress_health_check=SLOW_OK, print_blob=True)
    @fixed_seed(seed)
    @given(strategy)
    def case(value):
        tally.cases += 1
        if check(value, tally) == "traceback" and strict:
            raise AssertionError(tally.tracebacks[-1])

    case()
    return tally


# ---- images ----------------------------------------------------------------------------------------------------------
def fuzz_images(n: int, seed: int, preprocess_specs, strict: bool = True) -> Tally:
    from edgevlm.images import load_image
    from edgevlm.preprocess import preprocess

    specs = list(preprocess_specs)

    def one(data: bytes):
        image = load_image(data)
        for spec in specs:
            preprocess(image, spec)

    return drive("images", strategies.image_files(),
                 lambda data, tally: tally.run(f"image of {len(data)} bytes", lambda: one(data)), n, seed, strict)


# ---- manifests -------------------------------------------------------------------------------------------------------
def fuzz_manifests(bundle, image, n: int, seed: int, strict: bool = True) -> Tally:
    import edgevlm

    original = json.loads((bundle / "manifest.json").read_text())

    def one(edits):
        (bundle / "manifest.json").write_text(json.dumps(strategies.apply_edits(original, edits)))
        session = edgevlm.load(bundle, encoder="onnx:fp32", decoder="gguf:q8_0", threads=1)
        session.generate(image, "What colour is the circle?", max_tokens=2)

    edits = strategies.json_edits(original, strategies.manifest_values())
    try:
        return drive("manifests", edits, lambda e, tally: tally.run(f"manifest edits {e}"[:300], lambda: one(e)), n,
                     seed, strict)
    finally:
        (bundle / "manifest.json").write_text(json.dumps(original))


# ---- crafted GGUF headers --------------------------------------------------------------------------------------------
def gguf_readers(bundle, kind: str) -> dict[str, Callable]:
    """Every place edgevlm reads a GGUF itself, as (name -> call on the crafted file). A decoder: the header reader
    (start-up, `plan`), the planner's tensor table and whole plan of the bundle (its manifest without the recorded
    sizes, so the planner opens the file), and llama.cpp's loader behind edgevlm's check (`run`, `serve`, `verify`).
    An mmproj: the header reader and libmtmd's loader behind the same check (`verify`, the bench peer)."""
    from edgevlm.gguf_header import _cached, read_header
    from edgevlm.plan.bundle import PlanRequest, plan_bundle
    from edgevlm.plan.devices import get_device
    from edgevlm.plan.gguf_weights import read_gguf_tensors

    def header(path):
        _cached.cache_clear()  # a fresh parse of each case (the cache keys on size, mtime and inode)
        found = read_header(path)
        return found.weight_bytes, found.bytes_per_token(), found.block_params()

    readers = {"header": header, "tensor table": read_gguf_tensors}
    if kind == "decoder":
        from edgevlm.runtimes.llamacpp import LlamaModel

        device = get_device("rtx-4090-24gb")
        readers["plan"] = lambda path: plan_bundle(bundle, device, PlanRequest(), memory_only=True)
        readers["llama.cpp load"] = lambda path: LlamaModel(path).close()
    else:
        from edgevlm.bench.peers.mtmd import MtmdPipeline

        decoder = bundle / "decoder" / "q8_0.gguf"
        readers["libmtmd load"] = lambda path: MtmdPipeline(decoder, path, n_ctx=256, threads=1).close()
    return readers


def gguf_fuzz_bundle(bundle, work) -> Any:
    """A copy of `bundle` whose manifest does not record the GGUF sizes (so the planner reads the header) and
    whose crafted files sit beside its decoder: decoder/crafted.gguf and encoder/crafted-mmproj.gguf."""
    import shutil

    copy = shutil.copytree(bundle, work / "gguf-fuzz-bundle")
    manifest = json.loads((copy / "manifest.json").read_text())
    for artifact in manifest["artifacts"]:
        if artifact["name"] == "gguf:q8_0":
            for key in ("weight_bytes", "bytes_per_token", "block_params"):
                artifact.get("details", {}).pop(key, None)
            artifact["path"] = artifact["files"][0]["path"] = "decoder/crafted.gguf"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def fuzz_ggufs(bundle, template_path, kind: str, n: int, seed: int, strict: bool = True,
               readers: list[str] | None = None) -> Tally:
    """Crafted GGUFs from the template (a real exported decoder or mmproj) through every reader: each ends in
    success or a one-line BundleError naming the file."""
    from edgevlm.errors import BundleError

    template = gguf_craft.parse(template_path.read_bytes())
    path = bundle / ("decoder/crafted.gguf" if kind == "decoder" else "encoder/crafted-mmproj.gguf")
    calls = gguf_readers(bundle, kind)
    calls = {name: calls[name] for name in readers} if readers else calls

    def one(name, read):
        try:
            read(path)
        except BundleError as exc:
            if str(path) not in str(exc):
                raise AssertionError(f"the error does not name the file: {exc}") from None
            raise

    def check(case, tally):
        crafts, parts = case
        path.write_bytes(gguf_craft.serialize(parts))
        outcomes = [tally.run(f"{kind} crafted by {crafts} read by {name}", lambda: one(name, read), name)
                    for name, read in calls.items()]
        return "traceback" if "traceback" in outcomes else outcomes[0]

    return drive(f"gguf-{kind}", strategies.crafted_ggufs(template), check, n, seed, strict)


# ---- server request bodies -------------------------------------------------------------------------------------------
def fuzz_bodies(service, image_png: bytes, n: int, seed: int, strict: bool = True) -> Tally:
    """Each body through the server's own request path (parse, validate, generate), without the socket."""
    from edgevlm.serve.openai import parse_body

    def one(body):
        for _ in service.complete(parse_body(strategies.encoded(body))):
            pass

    return drive("bodies", strategies.request_bodies(image_png),
                 lambda body, tally: tally.run(f"body {strategies.encoded(body)[:200]!r}", lambda: one(body)), n, seed, strict)


def fuzz_server(base_url: str, image_png: bytes, n: int, seed: int, strict: bool = True) -> Tally:
    """Each body POSTed to a running server: a 200, or a 4xx whose message is one line; a 500, a dropped connection
    or a traceback in its log is a defect (the caller reads the log)."""
    import urllib.error
    import urllib.request

    from edgevlm.errors import BadInputError

    def one(body, tally):
        request = urllib.request.Request(f"{base_url}/v1/chat/completions", data=strategies.encoded(body),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                response.read()
                tally.statuses[response.status] += 1
                return
        except urllib.error.HTTPError as error:
            status, raw = error.code, error.read()
        tally.statuses[status] += 1
        message = json.loads(raw)["error"]["message"]
        if not 400 <= status < 500 or "\n" in message:
            raise RuntimeError(f"HTTP {status}: {message}")
        raise BadInputError(message)  # a 4xx with its one-line message: a clean error

    return drive("server", strategies.request_bodies(image_png),
                 lambda body, tally: tally.run(f"body {strategies.encoded(body)[:200]!r}", lambda: one(body, tally)), n, seed,
                 strict)


# ---- CLI options -----------------------------------------------------------------------------------------------------
def fuzz_cli(bundle, image_path, n: int, seed: int, strict: bool = True) -> Tally:
    import contextlib

    from edgevlm.cli import main

    def one(argv):
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            code = main(argv)
        if code not in (0, 1, 2) and not (argv[0] == "verify" and code == 3):  # verify: 3 = some artifact unchecked
            raise RuntimeError(f"exit code {code}")

    return drive("cli", strategies.cli_argvs(bundle, image_path),
                 lambda argv, tally: tally.run(f"cli {argv}", lambda: one(argv)), n, seed, strict)
