"""Every family with an mmproj writer, once through a real `llama-server --mmproj`: a bundle of every family llama.cpp
knows runs in stock llama.cpp and answers an OpenAI chat request with an image, as edgevlm answers it.

    .venv/bin/python benchmarks/llama_server_interop.py [--families llava,gemma3] [--bin DIR] [--tokens 8]

Per family: the tiny checkpoint the tests build (tests/builders.py), exported with the ONNX fp32 encoder, the f16
mmproj (`--encoder onnx:fp32,gguf:f16`) and the F32 GGUF decoder; llama-server (benchmarks/build_llama_bin.sh) started
with the command `edgevlm inspect` prints for the bundle, on 127.0.0.1 at a free port, 1 thread, flash attention off
and an f32 KV cache (the settings of edgevlm's parity mode), then one `/v1/chat/completions` request (the image as a
data URL, temperature 0) and the server stopped. Its greedy tokens are compared with edgevlm's (ONNX fp32 encoder +
the same GGUF through edgevlm's llama.cpp decoder, parity mode) and with llama.cpp's multimodal library in this
process (libmtmd on the same mmproj and GGUF, given the prompt text llama-server rendered). Where they differ, what
differs is measured: the prompt (llama-server renders the GGUF's chat template itself), or the image rows (the f16
mmproj's encoder against edgevlm's ONNX graph: edgevlm's decoder is then given libmtmd's rows). The same server also
gets edgevlm's own prompt as a raw `/completion` request (`prompt_string` + `multimodal_data`), whose tokens are
compared with edgevlm's. Image sizes are ones where mtmd preprocesses as the HF processor does (the artifacts' notes
say where it does not).

Writes benchmarks/results/llama-server-interop/report.json and report.md (command, date, commit, CPU, flags, the
llama.cpp build); a run with --families replaces those families' rows and keeps the others. Bounded: a server gets
--server-timeout seconds to come up and answer, and is always stopped (killed by its own process id)."""
from __future__ import annotations

import argparse
import base64
import datetime as dt
import io
import json
import shlex
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # builders.py: the tiny checkpoints the tests build
sys.path.insert(0, str(ROOT / "benchmarks"))  # render_interop.py
QUESTION = "Describe the image."
OUT = "benchmarks/results/llama-server-interop"


@dataclass(frozen=True)
class Family:
    """One family with an mmproj writer: its tests' tiny checkpoint (builder, seed) and an image size where libmtmd
    preprocesses as the HF processor does."""
    name: str
    projector: str
    builder: str
    kwargs: tuple
    size: tuple[int, int]


FAMILIES = (
    Family("llava", "mlp", "build_llava", (("tower", "siglip"), ("seed", 1)), (32, 32)),  # the tower's own size
    Family("idefics3", "idefics3", "build_idefics3", (("seed", 2),), (64, 64)),
    Family("qwen2-vl", "qwen2vl_merger", "build_qwen2_vl", (("version", "2"), ("seed", 11)), (168, 112)),
    Family("qwen2.5-vl", "qwen2.5vl_merger", "build_qwen25_vl_mtmd_windows", (("seed", 11),), (224, 168)),
    Family("internvl", "internvl", "build_internvl_unit_text", (("seed", 8),), (64, 32)),
    Family("qwen3-vl", "qwen3vl_merger", "build_qwen3_vl", (("seed", 3),), (300, 200)),
    Family("gemma3", "gemma3", "builders_gemma3.build_gemma3", (("seed", 5),), (64, 64)),
)


def noise_image(seed: int, width: int, height: int):
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def export_bundle(family: Family, work: Path) -> Path:
    import importlib

    from edgevlm.export.exporter import ArtifactRequest, export_checkpoint

    module, _, name = family.builder.rpartition(".")  # "build_x" lives in tests/builders.py, "m.build_x" in tests/m.py
    ckpt = getattr(importlib.import_module(module or "builders"), name)(work / "ckpt", **dict(family.kwargs))
    encoders = [ArtifactRequest("onnx", "fp32"), ArtifactRequest("mmproj", "f16")]
    return export_checkpoint(ckpt, work / "bundle", encoders, [ArtifactRequest("gguf", "f32")], max_tiles=8)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post(url: str, body: dict, timeout: float) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:  # llama-server's refusals carry a JSON body with the reason
        raise RuntimeError(f"HTTP {exc.code}: {exc.read().decode(errors='replace')[:500]}") from None


def server_command(bundle: Path, binary: Path, port: int) -> list[str]:
    """`edgevlm inspect`'s llama-server command for the bundle, on our port, with parity settings and 1 thread."""
    from edgevlm.commands.inspect import llama_cpp_usage
    from edgevlm.manifest import Manifest

    argv = shlex.split(llama_cpp_usage(bundle, Manifest.load(bundle))["server"])
    assert argv[0] == "llama-server" and argv[-4:] == ["--host", "127.0.0.1", "--port", "8080"], argv
    return [str(binary), *argv[1:-2], "--port", str(port), "--threads", "1", "--threads-batch", "1",
            "--ctx-size", "1024", "--parallel", "1", "--flash-attn", "off", "--cache-type-k", "f32",
            "--cache-type-v", "f32", "--no-webui"]


MEDIA = "\x00media\x00"  # where the image goes in a raw prompt: replaced by the server's own marker


def ask_server(command: list[str], port: int, image_url: str, tokens: int, timeout: float, log: Path,
               raw_prompt: str) -> dict:
    """Start llama-server, wait for /health, ask one chat question, then the same as a raw /completion prompt laid
    out as edgevlm lays it out (MEDIA where the image goes), stop it. Whatever happens, the server is killed."""
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                             {"type": "text", "text": QUESTION}]}]
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    with open(log, "w") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        while True:
            if process.poll() is not None:
                return {"answered": False, "error": f"llama-server exited with {process.returncode} before /health"}
            if time.monotonic() > deadline:
                return {"answered": False, "error": f"llama-server not healthy within {timeout:.0f} s"}
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                time.sleep(0.25)
        props = post_get(f"{base}/props")  # the media marker is drawn at random per server start
        out: dict = {"build_info": props.get("build_info"), "media_marker": props.get("media_marker")}
        try:
            out["prompt"] = post(f"{base}/apply-template", {"messages": messages}, 30)["prompt"]
            start = time.perf_counter()
            answer = post(f"{base}/v1/chat/completions",
                          {"model": "bundle", "messages": messages, "max_tokens": tokens, "temperature": 0,
                           # the token ids: `__verbose` has them all (logprobs merges a split UTF-8 character's)
                           "return_tokens": True, "verbose": True}, max(deadline - time.monotonic(), 5))
        except (RuntimeError, urllib.error.URLError, OSError) as exc:
            return {**out, "answered": False, "error": str(exc)}
        choice = answer["choices"][0]
        try:
            raw = post(f"{base}/completion", {
                "prompt": {"prompt_string": raw_prompt.replace(MEDIA, out["media_marker"]),
                           "multimodal_data": [image_url.split(",", 1)[1]]},
                "n_predict": tokens, "temperature": 0, "return_tokens": True}, max(deadline - time.monotonic(), 5))
            out["raw"] = {"tokens": raw["tokens"], "text": raw["content"]}
        except (RuntimeError, urllib.error.URLError, OSError) as exc:
            out["raw"] = {"error": str(exc)}
        return {**out, "answered": True, "seconds": round(time.perf_counter() - start, 2),
                "text": choice["message"]["content"], "finish_reason": choice["finish_reason"],
                "tokens": answer["__verbose"]["tokens"],
                "usage": answer.get("usage"), "timings": answer.get("timings")}
    finally:
        process.kill()  # the one process this function started
        process.wait(timeout=30)


def post_get(url: str) -> dict:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.loads(response.read())
    except (urllib.error.URLError, OSError, ValueError):
        return {}


class FixedRows:
    """An encoder that returns image rows computed elsewhere (libmtmd's, from the same image)."""
    name = artifact_id = "mtmd-rows"
    graph_bytes = None

    def __init__(self, rows: list[np.ndarray]):
        self.rows = np.stack(rows)  # (tiles, T, D): one row block per image chunk

    def encode(self, pixel_values, grid=None):
        return self.rows


def until_stop(tokens: list[int], stops: set[int]) -> list[int]:
    """The answer's tokens: up to (not including) the first stop token, as llama-server returns them."""
    for i, token in enumerate(tokens):
        if token in stops:
            return tokens[:i]
    return tokens


def check_family(family: Family, binary: Path, tokens: int, timeout: float, work: Path) -> dict:
    import edgevlm
    from edgevlm.bench.peers.mtmd import MTMD_IMAGE_WRAPPERS, MtmdPipeline, image_token_bounds, media_prompt
    from edgevlm.manifest import Manifest
    from edgevlm.runtimes.prompt import prepare_image

    row: dict = {"family": family.name, "projector": family.projector, "image": "x".join(map(str, family.size)),
                 "builder": f"tests/{family.builder.rpartition('.')[0] or 'builders'}.py {family.builder.rpartition('.')[2]}({', '.join(f'{k}={v!r}' for k, v in family.kwargs)})"}
    bundle = export_bundle(family, work)
    manifest = Manifest.load(bundle)
    mmproj = manifest.find("encoder", "mmproj:f16")
    assert mmproj.details["projector_type"] == family.projector, mmproj.details
    image = noise_image(12, *family.size)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()

    session = edgevlm.load(bundle, encoder="onnx:fp32", decoder="gguf:f32", threads=1, parity=True)
    stops = set(session.spec.stop_token_ids)
    ours = session.generate(image, QUESTION, max_tokens=tokens)
    ours_text = session.render([session.user_message(QUESTION, 1)])
    ids = session.tokenize(ours_text, [prepare_image(session.spec, image, "probe")]).ids.tolist()
    row["edgevlm"] = {"tokens": until_stop(ours.tokens, stops), "text": ours.text, "prompt_positions": len(ids)}

    port = free_port()
    command = server_command(bundle, binary, port)
    row["server_command"] = shlex.join(["llama-server", *command[1:]]).replace(str(bundle), "BUNDLE")
    raw_prompt = media_prompt(ours_text, manifest.image_layout.placeholder, family.projector, MEDIA)
    server = ask_server(command, port, url, tokens, timeout, work / "llama-server.log", raw_prompt)
    row["server"] = server
    if server["answered"]:
        server["tokens"] = until_stop(server["tokens"], stops)
        if "tokens" in server["raw"]:
            server["raw"]["tokens"] = until_stop(server["raw"]["tokens"], stops)
            row["raw_tokens_equal"] = server["raw"]["tokens"] == row["edgevlm"]["tokens"]
    else:
        row["server_log_tail"] = (work / "llama-server.log").read_text(errors="replace")[-1500:]
        return row

    # libmtmd in this process on llama-server's prompt text: same library, same files, same settings
    decoder = bundle / manifest.find("decoder", "gguf:f32").path
    pipeline = MtmdPipeline(decoder, bundle / mmproj.path, n_ctx=1024, threads=1, parity=True,
                            image_tokens=image_token_bounds(mmproj.details))
    try:
        tokenized = pipeline.tokenize(server["prompt"].replace(server["media_marker"], pipeline.marker),
                                      [np.asarray(image)])
        image_token = manifest.image_layout.image_token_id
        laid_out = []
        for chunk in tokenized.chunks:
            laid_out += list(chunk.token_ids) if chunk.kind == "text" else [image_token] * chunk.n_tokens
        rows, _ = pipeline.encode(tokenized)
        pipeline.prefill(tokenized)
        mtmd_tokens = until_stop(pipeline.generate(tokens, tuple(stops))[0], stops)
    finally:
        pipeline.close()
    row["mtmd_in_process"] = {"tokens": mtmd_tokens}
    row["prompt_equal"] = laid_out == ids
    if not row["prompt_equal"]:
        first = next((i for i, (a, b) in enumerate(zip(laid_out, ids)) if a != b), min(len(laid_out), len(ids)))
        row["prompt_difference"] = {"position": first, "server": laid_out[max(first - 2, 0):first + 6],
                                    "edgevlm": ids[max(first - 2, 0):first + 6],
                                    "server_text": server["prompt"], "edgevlm_text": ours_text}
    row["tokens_equal"] = server["tokens"] == row["edgevlm"]["tokens"]
    row["server_equals_mtmd"] = server["tokens"] == mtmd_tokens
    prompt, raw, reference = QUESTION, False, row["edgevlm"]["tokens"]
    if not row["prompt_equal"]:
        # edgevlm on llama-server's own prompt text (raw), where edgevlm lays it out with the same ids
        begin, end = MTMD_IMAGE_WRAPPERS.get(family.projector, ("", ""))
        text = server["prompt"].replace(server["media_marker"], begin + manifest.image_layout.placeholder + end)
        row["edgevlm_on_server_prompt"] = None
        if session.tokenize(text, [prepare_image(session.spec, image, "probe")]).ids.tolist() == laid_out:
            prompt, raw = text, True
            reference = until_stop(session.generate(image, text, raw=True, max_tokens=tokens).tokens, stops)
            row["edgevlm_on_server_prompt"] = {"tokens": reference}
    if server["tokens"] != reference and (raw or row["prompt_equal"]):
        # the decoders compared on the same image rows: edgevlm's decoder given libmtmd's rows
        same_rows = edgevlm.load(bundle, encoder="onnx:fp32", decoder="gguf:f32", threads=1, parity=True)
        same_rows.encoder = FixedRows(rows)
        theirs = same_rows.generate(image, prompt, raw=raw, max_tokens=tokens)
        row["edgevlm_on_mtmd_rows"] = {"tokens": until_stop(theirs.tokens, stops)}
        row["rows_cosine"] = _cosine(np.stack(rows), session.encoder.encode(*_pixels(manifest, image)))
    row["explanation"] = explain(row)
    return row


def _pixels(manifest, image):
    from edgevlm.preprocess import preprocess

    pre = preprocess(image, manifest.preprocess)
    return (pre.pixel_values,) if pre.grid is None else (pre.pixel_values, pre.grid)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(-1).astype(np.float64), np.asarray(b).reshape(-1).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def explain(row: dict) -> str:
    """What the measurements say: where llama-server's prompt differs from edgevlm's, and why the tokens differ."""
    parts = []
    if not row["prompt_equal"]:
        diff = row["prompt_difference"]
        server_text = diff["server_text"].replace(row["server"]["media_marker"], "<__media__>")
        parts.append(f"llama-server's prompt (the GGUF's chat template rendered by llama.cpp over the request's content "
                     f"flattened to one string, the image laid out by mtmd) differs from edgevlm's at token "
                     f"{diff['position']} ({diff['server']} vs {diff['edgevlm']}): it renders "
                     f"{json.dumps(server_text)} where edgevlm renders {json.dumps(diff['edgevlm_text'])}")
        on_prompt = row.get("edgevlm_on_server_prompt")
        if on_prompt is None:
            parts.append("edgevlm cannot lay llama-server's prompt text out with llama-server's ids (edgevlm's image "
                         "layout writes its own text around the image)")
        else:
            same = on_prompt["tokens"] == row["server"]["tokens"]
            parts.append(f"on llama-server's prompt text, edgevlm gives {'the same' if same else 'other'} tokens")
    if "raw_tokens_equal" in row and not row["prompt_equal"]:
        parts.append(f"sent edgevlm's prompt as a raw /completion prompt, llama-server gives "
                     f"{'the same' if row['raw_tokens_equal'] else 'other'} tokens as edgevlm")
    if not row["tokens_equal"]:
        parts.append(f"llama-server's tokens {'equal' if row['server_equals_mtmd'] else 'differ from'} libmtmd's "
                     "in-process tokens on the same prompt")
        if "edgevlm_on_mtmd_rows" in row:
            same = row["edgevlm_on_mtmd_rows"]["tokens"] == row["server"]["tokens"]
            parts.append(f"the image rows differ (f16 mmproj vs ONNX fp32 encoder, cosine {row['rows_cosine']:.6f}); "
                         f"given libmtmd's rows, edgevlm's decoder gives {'the same' if same else 'other'} tokens")
    return "; ".join(parts)


def llama_build(binary: Path) -> dict:
    key = binary.parent / "KEY"
    info = dict(line.split("=", 1) for line in key.read_text().splitlines() if "=" in line) if key.is_file() else {}
    version = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30)
    info["version"] = " ".join((version.stdout + version.stderr).split())[:200]
    return info


def render_md(report: dict) -> str:
    from render_interop import INTEROP_NOTE, interop_table

    build = report["llama_cpp"]
    lines = ["# llama-server interop", "", f"Command: `{report['command']}`", "",
             f"Date {report['date']} · commit {report['commit']} · CPU {report['cpu']} · flags "
             f"{' '.join(report['cpu_flags'])} · llama.cpp built with `{build.get('isa', 'not recorded')}`", "",
             INTEROP_NOTE, ""]
    return "\n".join(lines + interop_table(report)) + "\n"


def main() -> int:
    from edgevlm.machine import cpu_flags, cpu_model, source_commit

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(f.name for f in FAMILIES))
    parser.add_argument("--bin", help="folder with llama-server (default: benchmarks/build_llama_bin.sh --print)")
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--server-timeout", type=float, default=180)
    parser.add_argument("--out", default=OUT)
    parser.add_argument("--render", action="store_true", help="only rewrite report.md from report.json")
    args = parser.parse_args()
    out = Path(args.out)
    if args.render:
        report = json.loads((out / "report.json").read_text())
        for row in report["rows"]:
            if "tokens_equal" in row:
                row["explanation"] = explain(row)
        (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
        (out / "report.md").write_text(render_md(report))
        return 0
    folder = args.bin or subprocess.run([str(ROOT / "benchmarks/build_llama_bin.sh"), "--print"], capture_output=True,
                                        text=True).stdout.strip()
    binary = Path(folder) / "llama-server"
    if not folder or not binary.is_file():
        raise SystemExit("no llama-server: run benchmarks/build_llama_bin.sh (or pass --bin DIR)")
    wanted = args.families.split(",")
    unknown = set(wanted) - {f.name for f in FAMILIES}
    if unknown:
        raise SystemExit(f"unknown families {sorted(unknown)}: {', '.join(f.name for f in FAMILIES)}")
    previous = json.loads((out / "report.json").read_text()) if (out / "report.json").is_file() else {"rows": []}
    rows = {row["family"]: row for row in previous["rows"]}
    for family in (f for f in FAMILIES if f.name in wanted):
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix=f"interop-{family.name}-") as work:
            try:
                row = check_family(family, binary, args.tokens, args.server_timeout, Path(work))
            except Exception:  # noqa: BLE001 - recorded as this family's result; the other families still run
                import traceback

                row = {"family": family.name, "projector": family.projector, "image": "x".join(map(str, family.size)),
                       "server": {"answered": False, "error": "the check failed: " + traceback.format_exc()[-800:]}}
        row["date"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        row["command"] = shlex.join(["python", *sys.argv])
        row["seconds"] = round(time.perf_counter() - start, 1)
        rows[family.name] = row
        print(json.dumps({k: row.get(k) for k in ("family", "tokens_equal", "server_equals_mtmd", "prompt_equal")}
                         | {"answered": row["server"]["answered"]}), flush=True)
    commands = list(dict.fromkeys(rows[f.name]["command"] for f in FAMILIES if f.name in rows))
    report = {"command": " ; ".join(commands), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "commit": source_commit(), "cpu": cpu_model(), "cpu_flags": cpu_flags(),
              "llama_cpp": llama_build(binary), "question": QUESTION, "max_tokens": args.tokens,
              "rows": [rows[f.name] for f in FAMILIES if f.name in rows]}
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "report.md").write_text(render_md(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
