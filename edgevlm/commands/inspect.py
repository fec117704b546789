"""edgevlm inspect PATH [--json]: family, parameter counts, shapes and image-token layout.
edgevlm inspect --supported [--json]: the architectures edgevlm exports and its decoder-architecture table."""
from __future__ import annotations

from pathlib import Path


def add_arguments(parser) -> None:
    parser.add_argument("path", nargs="?", help="checkpoint folder or bundle")
    parser.add_argument("--supported", action="store_true", help="list the model families and decoder architectures")
    parser.add_argument("--json", action="store_true", help="one JSON object instead of tables")


def checkpoint_summary(path: Path) -> dict:
    """The family's description (torch-free: layout, preprocessing, mmproj, attention), then the loaded model's
    parameter counts, dtype and digest."""
    from ..decoder_arch import architecture
    from ..families import describe_checkpoint, load_checkpoint

    spec = describe_checkpoint(path)
    ckpt = load_checkpoint(path, dtype="auto")
    text = ckpt.decoder.config
    arch = architecture(spec.decoder_architecture)
    return {
        "kind": "checkpoint",
        "path": str(path),
        "family": spec.family,
        "architecture": type(ckpt.hf_model).__name__,
        "dtype": str(next(ckpt.decoder.parameters()).dtype).removeprefix("torch."),
        "parameters": ckpt.parameter_counts(),
        "tile_size": list(spec.preprocess.tile_size),
        "resize_rule": spec.preprocess.resize_rule,
        "image_layout": spec.layout.to_dict(),
        "image_attention": spec.image_attention,
        "mmproj": spec.mmproj_projector or f"none: {spec.mmproj_refusal}",
        "vision": spec.summary()["vision"],
        "decoder": {
            "architecture": arch.name, "mlx_model_type": arch.mlx_model_type,
            # a row without GGUF/MLX (BLIP-2's OPT) says why instead
            "gguf_arch": f"none: {arch.export_refusal}" if arch.export_refusal else arch.gguf_arch_name(),
            "hidden_size": text.hidden_size, "layers": text.num_hidden_layers, "heads": text.num_attention_heads,
            "kv_heads": getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
            "intermediate_size": getattr(text, "intermediate_size", None) or text.ffn_dim,
            "vocab_size": text.vocab_size, "context_length": ckpt.context_length,
            "tie_word_embeddings": bool(text.tie_word_embeddings),
        },
        "stop_token_ids": ckpt.stop_token_ids,
        "sha256": ckpt.source_sha256,
    }


def llama_cpp_usage(path: Path, manifest) -> dict | None:
    """How to run the bundle in stock llama.cpp: its decoder GGUF with its mmproj (libmtmd reads both)."""
    from ..runtimes.bundle_loader import DECODER_PREFERENCE

    mmprojs = manifest.mmproj_names()
    ggufs = [n for n in DECODER_PREFERENCE if n.startswith("gguf:") and n in manifest.names("decoder")]
    if not mmprojs or not ggufs:
        return None
    model = path / manifest.find("decoder", ggufs[0]).path
    artifact = manifest.find("encoder", mmprojs[0])
    mmproj = path / artifact.path
    # the processor's image-token bounds, for projector types whose file cannot carry them (Qwen2-VL)
    bounds = (f" --image-min-tokens {artifact.details['image_min_tokens']} --image-max-tokens "
              f"{artifact.details['image_max_tokens']}") if "image_min_tokens" in artifact.details else ""
    return {
        "decoder": ggufs[0], "mmproj": mmprojs[0],
        "cli": f'llama-mtmd-cli -m {model} --mmproj {mmproj}{bounds} --image IMAGE.jpg -p "Describe the image."',
        "server": f"llama-server -m {model} --mmproj {mmproj}{bounds} --host 127.0.0.1 --port 8080",
        "notes": manifest.find("encoder", mmprojs[0]).details.get("notes", []),
    }


def bundle_summary(path: Path) -> dict:
    from dataclasses import asdict

    from ..manifest import Manifest

    manifest = Manifest.load(path)
    summary = {
        "kind": "bundle",
        "path": str(path),
        "family": manifest.family,
        "format_version": manifest.format_version,
        "edgevlm_version": manifest.edgevlm_version,
        "source": manifest.source,
        "tile_size": list(manifest.preprocess.tile_size),
        "resize_rule": manifest.preprocess.resize_rule,
        "image_layout": manifest.image_layout.to_dict(),
        "encoder": asdict(manifest.encoder),
        "decoder": asdict(manifest.decoder),
        "artifacts": [
            {"name": a.name, "role": a.role, "format": a.format, "precision": a.precision, "path": a.path, "bytes": a.bytes,
             **({"details": a.details} if a.details else {})}
            for a in manifest.artifacts
        ],
    }
    usage = llama_cpp_usage(path, manifest)
    if usage:
        summary["llama_cpp"] = usage
    return summary


def supported() -> dict:
    from ..decoder_arch import ARCHITECTURES
    from dataclasses import asdict

    from ..families import FAMILIES
    from ..families.support import SUPPORT

    return {
        "families": [{"architecture": a, "family": f} for a, f in FAMILIES.items()],
        "support": [{**asdict(row), "decoder_rows": list(row.decoder_rows)} for row in SUPPORT],
        "decoders": [{"name": r.name, "hf_model_types": list(r.hf_model_types), "hf_class": r.hf_class,
                      "gguf_arch": "-" if r.export_refusal else r.gguf_arch_name(), "permute_qk": r.permute_qk, "bias_tensors": list(r.bias_tensors),
                      "mlx_model_type": r.mlx_model_type, "position_schemes": list(r.position_schemes),
                      **({"export_refusal": r.export_refusal} if r.export_refusal else {})}
                     for r in ARCHITECTURES.values()],
    }


def main(args) -> int:
    from ..errors import BadInputError
    from ..loading import is_bundle
    from .common import print_json, table

    if args.supported:
        info = supported()
        if args.json:
            print_json(info)
        else:
            table("checkpoint architectures", ["architecture (config.json)", "family"],
                  [(f["architecture"], f["family"]) for f in info["families"]])
            table("families", ["family", "models", "bridge", "decoder rows", "llama.cpp mmproj", "refused"],
                  [(r["family"], r["models"], r["bridge"], ", ".join(r["decoder_rows"]), r["mmproj"], r["refused"])
                   for r in info["support"]])
            table("decoder architectures", ["row", "text model_type", "HF class", "GGUF arch", "Q/K permuted",
                                            "biases (F32)", "MLX model", "positions"],
                  [(d["name"], ", ".join(d["hf_model_types"]), d["hf_class"], d["gguf_arch"], d["permute_qk"],
                    ", ".join(d["bias_tensors"]) or "-", d["mlx_model_type"], ", ".join(d["position_schemes"]))
                   for d in info["decoders"]])
            for d in info["decoders"]:
                if d.get("export_refusal"):
                    print(f"decoder {d['name']}: {d['export_refusal']}")
        return 0
    if not args.path:
        raise BadInputError("edgevlm inspect needs a checkpoint folder or bundle (or --supported)")
    path = Path(args.path)
    summary = bundle_summary(path) if is_bundle(path) else checkpoint_summary(path)
    if args.json:
        print_json(summary)
        return 0
    layout = summary["image_layout"]
    rows = [
        ("kind", summary["kind"]), ("family", summary["family"]),
        ("tile size", "x".join(map(str, summary["tile_size"]))), ("resize rule", summary["resize_rule"]),
        ("image tokens per tile", layout["tokens_per_tile"]), ("image layout", layout["kind"]),
        ("image token", f"{layout['image_token']} (id {layout['image_token_id']})"),
    ]
    if "parameters" in summary:
        rows += [("image attention", summary["image_attention"]), ("llama.cpp mmproj", summary["mmproj"])]
        rows += [(f"parameters: {k}", v) for k, v in summary["parameters"].items()]
        rows += [(f"decoder {k}", v) for k, v in summary["decoder"].items()]
    else:
        rows += [(f"decoder {k}", v) for k, v in summary["decoder"].items()]
    table(str(path), ["field", "value"], rows)
    if summary.get("artifacts"):
        table("artifacts", ["name", "role", "format", "precision", "MiB", "path"],
              [(a["name"], a["role"], a["format"], a["precision"], a["bytes"] / 2**20, a["path"]) for a in summary["artifacts"]])
    if summary.get("llama_cpp"):
        usage = summary["llama_cpp"]
        table("in stock llama.cpp (libmtmd)", ["what", "command"],
              [("one question", usage["cli"]), ("OpenAI server", usage["server"])]
              + [("note", note) for note in usage["notes"]])
    return 0
