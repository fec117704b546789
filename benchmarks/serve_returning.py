"""Workload f of serve_vs_llama_server.py: returning users on idle slots. More users than slots take turns one
request at a time (user 1 turn 1, user 2 turn 1, ... user k turn 1, then user 1 turn 2, ...), so nothing queues: every
returning turn finds an idle slot, and with k = slots + 2 users taking turns in order the slot it finds holds another
user's conversation (the least recently used one). Turn 1 is an image and a few hundred words of the user's notes, so
prefilling a conversation again costs something measurable; turns 2-3 add a fixed assistant sentence and a short
follow-up. What each server reused is read from its own per-request timings (the stream's last chunk: edgevlm's
n_reused_positions, llama-server's cache_n) and, for edgevlm, from /metrics scraped before and after."""
from __future__ import annotations

import re
import time
import urllib.error
import urllib.request

import numpy as np

WORDS = ("river", "market", "window", "garden", "letter", "orange", "engine", "forest", "silver", "harbor", "pencil",
         "winter", "bridge", "candle", "meadow", "rocket", "violin", "basket", "castle", "mirror", "planet", "ladder",
         "saddle", "copper", "thunder", "pillow", "island", "marble", "tunnel", "blanket", "compass", "lantern")
NOTES_WORDS = 60  # ~300 tokens of notes in turn 1 with W1's tokenizer (beside the image's)
METRICS = ("edgevlm_conversation_cache_hits_total", "edgevlm_conversation_cache_misses_total",
           "edgevlm_conversation_disk_hits_total", "edgevlm_prefix_cache_hits_total")

DETAIL = ("preprocess_ms", "encode_ms", "prefill_ms", "snapshot_ms", "n_prompt_tokens", "n_reused_positions", "conversation_cache_hits",
          "prefix_cache_hits", "cache_n", "prompt_n", "prompt_ms",
          # edgevlm serve's own stages: the server's ttft_ms counts to the first token, first_text_ms to the first text
          "receive_ms", "queue_ms", "first_text_ms")  # per request, from each server's timings


def notes(user: int) -> str:
    """The user's own notes: seeded words, different for every user (no text prefix shared across users)."""
    words = np.random.default_rng(7_000 + user).choice(WORDS, NOTES_WORDS)
    return "My notes so far: " + " ".join(words) + "."


def scrape(port: int) -> dict[str, float]:
    """The counters of METRICS from the server's /metrics ({} where it has none: llama-server without --metrics)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            text = response.read().decode()
    except (urllib.error.URLError, OSError):
        return {}
    out = {}
    for name in METRICS:
        found = re.search(rf"^{name}(?:{{[^}}]*}})?\s+([0-9.e+-]+)$", text, re.M)
        if found:
            out[name] = float(found.group(1))
    return out


def run_returning(users: int, turns: int, deadline: float, ask, first_turn, follow_ups: tuple[str, ...],
                  assistant: str) -> list:
    """Every user's turn t before anyone's turn t + 1; one request in flight at a time. ask(messages, label) streams
    one request and gives its Outcome (ask(None, label): the failure of a request not sent, past the deadline);
    first_turn(user, notes) is the user's first message. A user whose turn failed takes no later turn."""
    histories: dict[int, list[dict]] = {}
    out = []
    for turn in range(turns):
        for index in range(users):
            if turn and index not in histories:
                continue
            if time.monotonic() > deadline:
                out.append(ask(None, f"turn{turn + 1}"))
                continue
            history = ([first_turn(index, notes(index))] if turn == 0 else
                       histories[index] + [{"role": "user", "content": follow_ups[(turn - 1) % len(follow_ups)]}])
            outcome = ask(history, f"turn{turn + 1}")
            out.append(outcome)
            if outcome.ok:
                histories[index] = history + [{"role": "assistant", "content": assistant}]
            else:
                histories.pop(index, None)
    return out


def reused(timings: dict | None) -> tuple[int, int] | None:
    """(positions reused from a cache or the live sequence, prompt positions) from one server's timings."""
    if not timings:
        return None
    if "n_reused_positions" in timings:  # edgevlm
        return int(timings["n_reused_positions"]), int(timings.get("n_prompt_tokens") or 0)
    if "cache_n" in timings:  # llama-server: cache_n reused, prompt_n prefilled
        return int(timings["cache_n"]), int(timings["cache_n"]) + int(timings.get("prompt_n") or 0)
    return None


def summarize_returning(outcomes: list, before: dict, after: dict, pct) -> dict:
    """Turn 1 and turns 2-3 TTFT p50/p95, what the returning turns reused (per-request timings), /metrics deltas."""
    ok = [o for o in outcomes if o.ok]
    first = [o for o in ok if o.label == "turn1"]
    later = [o for o in ok if o.label != "turn1"]
    out = {"ttft_turn1_p50_ms": pct([o.ttft_ms for o in first], 50),
           "ttft_turn1_p95_ms": pct([o.ttft_ms for o in first], 95),
           "ttft_turns23_p50_ms": pct([o.ttft_ms for o in later], 50),
           "ttft_turns23_p95_ms": pct([o.ttft_ms for o in later], 95)}
    for name, group in (("turn1", first), ("turns23", later)):
        pairs = [p for p in (reused(o.timings) for o in group) if p is not None]
        if pairs:
            out[f"{name}_reused_positions"] = sum(r for r, _ in pairs)
            out[f"{name}_prompt_positions"] = sum(n for _, n in pairs)
            out[f"{name}_prefilled_p50"] = pct([n - r for r, n in pairs], 50)
    if "turns23_prompt_positions" in out:
        out["turns23_reused_share"] = round(out["turns23_reused_positions"] / max(1, out["turns23_prompt_positions"]), 3)
    hits = [int((o.timings or {}).get("conversation_cache_hits", 0)) for o in later]
    if any(o.timings and "conversation_cache_hits" in o.timings for o in later):
        out["turns23_conversation_hits"] = sum(hits)
    out["metrics_delta"] = {k: after[k] - before.get(k, 0.0) for k in after}
    out["per_request"] = [{"label": o.label, "ttft_ms": round(o.ttft_ms, 1),  # the client's: to its first text
                           **({"server_ttft_ms": o.timings["ttft_ms"]} if "ttft_ms" in (o.timings or {}) else {}),
                           **{k: v for k, v in (o.timings or {}).items() if k in DETAIL}} for o in ok]
    return out


def render_returning(rows: list[tuple[str, str, dict]], fmt) -> list[str]:
    """report.md's table of workload f."""
    if not rows:
        return []
    lines = ["", "Workload f (returning users, one request at a time, each return on an idle slot holding another "
             "user's conversation): TTFT by turn; 'reused': the prompt positions of turns 2-3 a server did not "
             "prefill (its own per-request timings: edgevlm's n_reused_positions, llama-server's cache_n); "
             "'conversation hits': edgevlm's parked-conversation restores (/metrics, after - before):", "",
             "| workload | server | turn 1 TTFT p50 / p95 ms | turns 2-3 TTFT p50 / p95 ms | turns 2-3 prefilled "
             "p50 | turns 2-3 reused | conversation hits / misses |", "|---|---|---|---|---|---|---|"]
    for name, server, m in rows:
        delta = m.get("metrics_delta") or {}
        hits = (f"{delta['edgevlm_conversation_cache_hits_total']:.0f} / "
                f"{delta.get('edgevlm_conversation_cache_misses_total', 0):.0f}"
                if "edgevlm_conversation_cache_hits_total" in delta else "-")
        share = (f"{m['turns23_reused_positions']:,} of {m['turns23_prompt_positions']:,} "
                 f"({100 * m['turns23_reused_share']:.0f}%)" if "turns23_reused_share" in m else "-")
        lines.append(f"| {name} | {server} | {fmt(m['ttft_turn1_p50_ms'])} / {fmt(m['ttft_turn1_p95_ms'])} | "
                     f"{fmt(m['ttft_turns23_p50_ms'])} / {fmt(m['ttft_turns23_p95_ms'])} | "
                     f"{fmt(m.get('turns23_prefilled_p50'))} | {share} | {hits} |")
    return lines
