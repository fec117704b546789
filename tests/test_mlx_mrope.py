"""MLX M-RoPE decoder (Qwen2-VL / Qwen2.5-VL text) against HF's VL text model, on mlx[cpu].

The MLX folder is what the export writes: the VL text weights as a plain HF qwen2 checkpoint (`Qwen2ForCausalLM`)
converted by mlx-lm; `MlxDecoder(mrope_section=...)` runs it through mlx-vlm's qwen2_vl language model at explicit
(t, row, col) positions. The reference is
`hf_model.model.language_model(inputs_embeds, position_ids=(3, 1, L))` + `lm_head`, the full VL model's logits."""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from builders import build_qwen2_vl
from edgevlm.runtimes.base import Segment

pytest.importorskip("mlx_lm")

MROPE_SECTION = [2, 3, 3]
TOL = 1e-4  # max abs logit difference, fp32
GRID = (3, 4)  # merged image grid (h', w'): 12 image rows
N_TEXT_BEFORE, N_TEXT_AFTER = 5, 3
N_FORCED = 32  # teacher-forced tokens for the quantized check


def _torch_decoder(hf):
    """The decoder edgevlm exports: Qwen2ForCausalLM over the VL text weights, with Qwen2-VL's rotary."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRotaryEmbedding

    text_config = hf.config.text_config
    fields = {k: v for k, v in text_config.to_dict().items() if k not in ("model_type", "architectures")}
    with torch.device("meta"):
        decoder = Qwen2ForCausalLM(Qwen2Config(**fields))
    state = {f"model.{k}": v for k, v in hf.model.language_model.state_dict().items()}
    state["lm_head.weight"] = hf.lm_head.weight
    decoder.load_state_dict(state, assign=True, strict=True)
    decoder.model.rotary_emb = Qwen2VLRotaryEmbedding(text_config)
    return decoder.eval()


def _mlx_folder(hf_folder: Path, out: Path, precision: str) -> Path:
    from mlx_lm import convert

    from edgevlm.export.mlx import PRECISIONS

    dtype, bits = PRECISIONS[precision]
    with contextlib.redirect_stdout(io.StringIO()):
        convert(str(hf_folder), mlx_path=str(out), quantize=bits is not None, q_bits=bits,
                q_group_size=32 if bits else None, dtype=dtype)
    return out


def _unit_scale(hf, seed: int = 1) -> None:
    """Re-draw the text weights at unit scale (std 1/sqrt(fan_in); embeddings std 1). At the builder's HF init
    (std 0.02) attention is nearly uniform: putting the image at 1-D row positions moves the logits by only 7e-4
    (scale 0.7), below what a 1e-4 parity gate can tell from noise, and top-2 gaps of 4e-5 make 8-bit agreement a
    coin toss. At unit scale the same change moves them by 0.9 (scale 3.7), so the parity gates test positions."""
    generator = torch.Generator().manual_seed(seed)
    params = list(hf.model.language_model.named_parameters()) + [("lm_head.weight", hf.lm_head.weight)]
    with torch.no_grad():
        for name, param in params:
            if name.endswith("weight") and param.ndim == 2:
                std = 1.0 if "embed_tokens" in name else param.shape[1] ** -0.5
                param.copy_(torch.randn(param.shape, generator=generator) * std)


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def qwen(request, tmp_path_factory):
    from transformers import AutoModelForImageTextToText

    root = tmp_path_factory.mktemp("qwen2vl-mlx")
    tied = request.param  # tied: mlx-lm's qwen2 has no lm_head, the forward uses embed_tokens.as_linear
    hf = AutoModelForImageTextToText.from_pretrained(build_qwen2_vl(root / "hf", version="2", tied=tied),
                                                     dtype=torch.float32).eval()
    _unit_scale(hf)
    hf_decoder = root / "qwen2"
    _torch_decoder(hf).save_pretrained(hf_decoder)
    config = json.loads((hf_decoder / "config.json").read_text())
    # as export/mlx.py writes it: mlx-lm reads rope_theta only at the top level
    config.update(model_type="qwen2", rope_theta=hf.config.text_config.rope_parameters["rope_theta"])
    (hf_decoder / "config.json").write_text(json.dumps(config))
    folders = {p: _mlx_folder(hf_decoder, root / f"mlx-{p}", p) for p in ("fp32", "8bit", "4bit")}
    rng = np.random.default_rng(0)
    vocab = hf.config.text_config.vocab_size
    prompt = SimpleNamespace(
        before=rng.integers(0, vocab, N_TEXT_BEFORE).astype(np.int32),
        image=rng.standard_normal((GRID[0] * GRID[1], hf.config.text_config.hidden_size)).astype(np.float32),
        after=rng.integers(0, vocab, N_TEXT_AFTER).astype(np.int32),
    )
    return SimpleNamespace(hf=hf, folders=folders, prompt=prompt)


def _segments(prompt) -> list[Segment]:
    """text at 0..4, a 3x4 image at t=5 (row 5+r, col 5+c), text continuing at 5 + max(3, 4) = 9."""
    pos0 = N_TEXT_BEFORE
    rows, cols = np.meshgrid(np.arange(GRID[0]), np.arange(GRID[1]), indexing="ij")
    image = np.stack([np.full(rows.size, pos0), pos0 + rows.ravel(), pos0 + cols.ravel()], axis=1)  # (12, 3)
    after = pos0 + max(GRID)
    return [Segment(np.arange(pos0, dtype=np.int32), token_ids=prompt.before),
            Segment(image.astype(np.int32), embeds=prompt.image),
            Segment(np.arange(after, after + N_TEXT_AFTER, dtype=np.int32), token_ids=prompt.after)]


def _as_rows(segment: Segment) -> np.ndarray:
    return segment.positions if segment.positions.ndim == 2 else np.repeat(segment.positions[:, None], 3, axis=1)


def _reference(hf, segments: list[Segment]) -> np.ndarray:
    """HF VL text model + lm_head over the segments: logits (L, V)."""
    lm = hf.model.language_model
    with torch.no_grad():
        parts = [lm.embed_tokens(torch.from_numpy(s.token_ids.astype(np.int64))) if s.token_ids is not None
                 else torch.from_numpy(s.embeds) for s in segments]
        positions = torch.from_numpy(np.concatenate([_as_rows(s) for s in segments]).T.astype(np.int64))[:, None]
        hidden = lm(inputs_embeds=torch.cat(parts)[None], position_ids=positions).last_hidden_state  # (1, L, D)
        return hf.lm_head(hidden)[0].numpy()


def _decoder(qwen, precision: str = "fp32"):
    from edgevlm.runtimes.mlx_decoder import MlxDecoder

    return MlxDecoder(qwen.folders[precision], n_ctx=256, mrope_section=MROPE_SECTION)


def _token(position: int, token: int) -> Segment:
    return Segment(np.array([position], dtype=np.int32), token_ids=np.array([token], dtype=np.int32))


def test_image_prefill_matches_hf(qwen):
    segments = _segments(qwen.prompt)
    decoder = _decoder(qwen)
    ours = decoder.prefill(segments)
    ref = _reference(qwen.hf, segments)
    assert np.abs(ours - ref[-1]).max() <= TOL
    assert decoder.n_past == N_TEXT_BEFORE + GRID[0] * GRID[1] + N_TEXT_AFTER  # rows in the cache
    assert decoder.next_position == N_TEXT_BEFORE + max(GRID) + N_TEXT_AFTER  # not the row count
    # every prompt position, one segment at a time (the image's last row too)
    decoder = _decoder(qwen)
    ends = np.cumsum([len(s) for s in segments]) - 1
    for segment, end in zip(segments, ends):
        assert np.abs(decoder.prefill([segment]) - ref[end]).max() <= TOL


def test_the_m_rope_matters(qwen):
    """1-D row positions for the image (what a plain mlx-lm qwen2 does) would be measurably wrong: the test sees it."""
    segments = _segments(qwen.prompt)
    rows = np.arange(N_TEXT_BEFORE, N_TEXT_BEFORE + len(segments[1]), dtype=np.int32)
    flat = [Segment(rows, embeds=segments[1].embeds)]
    ref = _reference(qwen.hf, segments)
    wrong = _reference(qwen.hf, segments[:1] + flat)
    assert np.abs(wrong[-1] - ref[N_TEXT_BEFORE + len(segments[1]) - 1]).max() > 1000 * TOL


def test_cached_decode_step_matches_full_sequence(qwen):
    segments = _segments(qwen.prompt)
    decoder = _decoder(qwen)
    logits = decoder.prefill(segments)
    tokens = []
    for _ in range(3):  # greedy steps at next_position, each against HF's whole sequence
        token = int(np.argmax(logits))
        step = _token(decoder.next_position, token)
        segments = segments + [step]
        logits = decoder.prefill([step])
        tokens.append(token)
        assert np.abs(logits - _reference(qwen.hf, segments)[-1]).max() <= TOL
    assert decoder.next_position == N_TEXT_BEFORE + max(GRID) + N_TEXT_AFTER + len(tokens)


def _split(segments: list[Segment], cut: int) -> tuple[list[Segment], list[Segment]]:
    """The segments' rows [0, cut) and [cut, end)."""
    head, tail, start = [], [], 0
    for s in segments:
        stop = start + len(s)
        if stop <= cut:
            head.append(s)
        elif start >= cut:
            tail.append(s)
        else:
            head.append(s.slice(0, cut - start))
            tail.append(s.slice(cut - start))
        start = stop
    return head, tail


def _next_after(segments: list[Segment]) -> int:
    return int(max(_as_rows(s).max() for s in segments)) + 1


# cuts: inside the first text, at the image start, inside the image, at the image end
CUTS = [3, N_TEXT_BEFORE, N_TEXT_BEFORE + 7, N_TEXT_BEFORE + GRID[0] * GRID[1]]


def test_chunked_truncated_and_restored_equal_cold(qwen):
    segments = _segments(qwen.prompt)
    decoder = _decoder(qwen)
    cold = decoder.prefill(segments).copy()
    cold_next = decoder.next_position
    for cut in CUTS:
        head, tail = _split(segments, cut)
        # chunked prefill == one prefill
        chunked = _decoder(qwen)
        chunked.prefill(head)
        assert chunked.next_position == _next_after(head)
        np.testing.assert_allclose(chunked.prefill(tail), cold, atol=1e-5, rtol=0)
        assert (chunked.n_past, chunked.next_position) == (decoder.n_past, cold_next)
        # truncate to the cut, then re-prefill the rest == cold
        decoder.truncate(cut, _next_after(head))
        assert (decoder.n_past, decoder.next_position) == (cut, _next_after(head))
        np.testing.assert_allclose(decoder.prefill(tail), cold, atol=1e-5, rtol=0)
        assert decoder.next_position == cold_next
    # snapshot at the image end, run something else, restore, finish == cold
    head, tail = _split(segments, CUTS[-1])
    decoder.truncate(0)
    decoder.prefill(head)
    state = decoder.snapshot()
    assert state.next_position == N_TEXT_BEFORE + max(GRID) and state.nbytes > 0
    decoder.prefill([_token(decoder.next_position, 7), _token(decoder.next_position + 1, 8)])
    decoder.restore(state)
    assert (decoder.n_past, decoder.next_position) == (CUTS[-1], N_TEXT_BEFORE + max(GRID))
    np.testing.assert_allclose(decoder.prefill(tail), cold, atol=1e-5, rtol=0)


def test_truncate_part_way_needs_the_next_position(qwen):
    decoder = _decoder(qwen)
    decoder.prefill(_segments(qwen.prompt))
    n_past, next_position = decoder.n_past, decoder.next_position
    with pytest.raises(ValueError, match="next_position"):
        decoder.truncate(N_TEXT_BEFORE + 2)
    assert (decoder.n_past, decoder.next_position) == (n_past, next_position)  # refused before trimming
    decoder.truncate(n_past)  # keeping every row keeps the position
    assert decoder.next_position == next_position
    decoder.truncate(0)
    assert (decoder.n_past, decoder.next_position) == (0, 0)


def test_text_positions_reduce_to_stock_mlx_lm(qwen):
    """On text (t = row = col) M-RoPE is 1-D RoPE: mlx-vlm's M-RoPE forward equals mlx-lm's own qwen2 forward on the
    same folder, also for the 8- and 4-bit folders (the seam quantizes the layers the folder has scales for)."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.utils import load_model

    ids = np.concatenate([qwen.prompt.before, qwen.prompt.after])
    for precision in ("fp32", "8bit", "4bit"):
        decoder = _decoder(qwen, precision)
        ours = decoder.prefill([Segment.tokens(ids, 0)])
        stock_model = load_model(qwen.folders[precision])[0]  # the same folder as mlx-lm's own qwen2
        stock = stock_model(mx.array(ids)[None], cache=make_prompt_cache(stock_model))[0, -1].astype(mx.float32)
        assert np.abs(ours - np.array(stock)).max() <= 1e-4


def _greedy_reference(hf, segments: list[Segment], n: int) -> tuple[list[int], np.ndarray]:
    """HF's greedy tokens and their logits (n, V) by whole-sequence recompute."""
    tokens, logits = [], []
    next_position = _next_after(segments)
    for _ in range(n):
        last = _reference(hf, segments)[-1]
        logits.append(last)
        tokens.append(int(np.argmax(last)))
        segments = segments + [_token(next_position, tokens[-1])]
        next_position += 1
    return tokens, np.stack(logits)


def test_fp32_greedy_and_8bit_teacher_forced_agreement(qwen):
    segments = _segments(qwen.prompt)
    ref_tokens, ref_logits = _greedy_reference(qwen.hf, segments, N_FORCED)
    results = {}
    for precision in ("fp32", "8bit"):
        decoder = _decoder(qwen, precision)
        logits = [decoder.prefill(segments).copy()]
        for token in ref_tokens[:-1]:  # teacher-forced on the reference's tokens
            logits.append(decoder.prefill([_token(decoder.next_position, token)]).copy())
        results[precision] = np.stack(logits)
    assert np.abs(results["fp32"] - ref_logits).max() <= TOL
    assert [int(t) for t in results["fp32"].argmax(-1)] == ref_tokens
    agreement = float(np.mean(results["8bit"].argmax(-1) == np.array(ref_tokens)))
    print(f"8-bit top-1 agreement {agreement:.3f}, max |dlogit| {np.abs(results['8bit'] - ref_logits).max():.3g}")
    assert agreement >= 0.95


def test_the_decoder_runs_without_torch(qwen, tmp_path):
    """MlxDecoder on the M-RoPE folder in a fresh process (what a device runs): mlx-vlm's language model loads and
    answers an image prompt with neither torch, transformers, opencv nor datasets imported, and gives this process's
    logits."""
    import subprocess
    import sys

    segments = _segments(qwen.prompt)
    np.savez(tmp_path / "prompt.npz", *[s.token_ids if s.token_ids is not None else s.embeds for s in segments],
             *[s.positions for s in segments])
    script = (
        "import json, sys, time\n"
        "import numpy as np\n"
        "start = time.perf_counter()\n"
        "from edgevlm.runtimes.base import Segment\n"
        "from edgevlm.runtimes.mlx_decoder import MlxDecoder\n"
        f"decoder = MlxDecoder({str(qwen.folders['fp32'])!r}, n_ctx=256, mrope_section={MROPE_SECTION})\n"
        "loaded = time.perf_counter() - start\n"
        f"data = np.load({str(tmp_path / 'prompt.npz')!r})\n"
        "parts = [data[f'arr_{i}'] for i in range(len(data.files))]\n"
        "k = len(parts) // 2\n"
        "segments = [Segment(parts[k + i], **({'token_ids': p} if p.dtype.kind == 'i' else {'embeds': p}))\n"
        "            for i, p in enumerate(parts[:k])]\n"
        "np.save(sys.argv[1], decoder.prefill(segments))\n"
        "print(json.dumps({'load_seconds': loaded, 'heavy': sorted(m for m in sys.modules "
        "if m.split('.')[0] in ('torch', 'transformers', 'cv2', 'datasets'))}))\n"
    )
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path / "logits.npy")], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    print(f"MlxDecoder (mlx-vlm qwen2_vl) import + load: {report['load_seconds']:.2f} s")
    assert report["heavy"] == []
    np.testing.assert_array_equal(np.load(tmp_path / "logits.npy"), _decoder(qwen).prefill(segments))
