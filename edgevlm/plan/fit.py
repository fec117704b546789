"""The start-up check of `edgevlm run/chat/serve`: will the bundle, at this context and these cache bounds, fit the
memory this machine has available? It runs from the manifest and the GGUF headers before anything is loaded, and its
verdict is never a silent failure: fits (no line), tight or does not fit (a warning), could not check (a warning naming
why: no psutil, a planner error), or not applicable (a checkpoint; a pair the planner does not cover yet)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# "not applicable": a checkpoint on the PyTorch reference (a development machine, not a device), or a pair the planner
# does not cover yet (MLX, TensorRT): no line
VERDICTS = ("fits", "tight", "does not fit", "unchecked", "not applicable")


@dataclass(frozen=True)
class FitCheck:
    verdict: str  # VERDICTS
    message: str | None  # the line for stderr; None only when it fits or does not apply

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"fit verdict {self.verdict!r} is not one of {VERDICTS}")
        if (self.message is None) != (self.verdict in ("fits", "not applicable")):
            raise ValueError("a fit check has a message exactly when it says more than 'fits' or 'not applicable'")


def machine_before_load():
    """This machine's memory, read before the model is loaded (after, the model's own pages count as used); None
    without psutil (a minimal install)."""
    try:
        from .devices import this_machine

        return this_machine(bandwidth_gbs=1.0, matmul_gflops=1.0)  # the check needs memory only: no probes
    except Exception:  # noqa: BLE001 - no psutil: the check says it could not run rather than stopping the run
        return None


def _unchecked(why: str, path) -> FitCheck:
    return FitCheck("unchecked", f"warning: could not check whether the model fits this machine's memory ({why}); "
                                 f"`edgevlm plan {path} --device this-machine` plans it")


def fit_check(path, device, encoder: str, decoder: str, n_ctx: int | None = None,
              embed_cache_bytes: int | None = None, prefix_cache_bytes: int | None = None,
              parallel: int = 1) -> FitCheck:
    """The planner's verdict for encoder + decoder on `device` (None: this machine could not be measured)."""
    if not (Path(path) / "manifest.json").is_file():
        return FitCheck("not applicable", None)
    if device is None:
        return _unchecked("psutil is not installed: pip install 'edgevlm[bench]'", path)
    if not (decoder.startswith("gguf:") and encoder.startswith("onnx:")):
        return FitCheck("not applicable", None)  # the planner covers GGUF + ONNX pairs (docs/usage.md#plan-will-it-fit)
    from ..errors import EdgeVLMError
    from .bundle import PlanRequest, plan_bundle

    try:
        plan = plan_bundle(path, device, PlanRequest(context=n_ctx, parallel=parallel,
                                                     embed_cache_bytes=embed_cache_bytes,
                                                     prefix_cache_bytes=prefix_cache_bytes), memory_only=True)
    except (EdgeVLMError, OSError, ValueError) as exc:
        return _unchecked(f"the planner failed: {str(exc).splitlines()[0][:160]}", path)
    option = next((o for o in plan["options"] if o["encoder"] == encoder and o["decoder"] == decoder), None)
    if option is None:
        return _unchecked(f"the plan has no option {encoder} + {decoder}", path)
    if option["verdict"] == "fits":
        return FitCheck("fits", None)
    mib = 1 << 20
    needed, total, usable = option["memory"]["needed"] / mib, option["memory"]["total"] / mib, plan["usable_bytes"] / mib
    lower = "a smaller --n-ctx, smaller --embed-cache-mb/--prefix-cache-mb or a smaller quant"
    if option["verdict"] == "tight":
        return FitCheck("tight", f"warning: {encoder} + {decoder} at context {plan['context']} needs {needed:,.0f} MiB "
                                 f"of the {usable:,.0f} MiB available here, inside the safety margin ({total:,.0f} MiB "
                                 f"with it); if it runs out, try {lower} (edgevlm plan {path} --device this-machine)")
    return FitCheck("does not fit", f"warning: {encoder} + {decoder} at context {plan['context']} needs {needed:,.0f} "
                                    f"MiB but only {usable:,.0f} MiB is available here; expect swapping or an "
                                    f"out-of-memory kill: use {lower} (edgevlm plan {path} --device this-machine)")


def fit_warning(path, device, encoder: str, decoder: str, n_ctx: int | None = None,
                embed_cache_bytes: int | None = None, prefix_cache_bytes: int | None = None,
                parallel: int = 1) -> str | None:
    """fit_check's line: None only when the pair fits."""
    return fit_check(path, device, encoder, decoder, n_ctx, embed_cache_bytes, prefix_cache_bytes, parallel).message
