"""The start-up check of `edgevlm run/chat/serve`: will the bundle, at this context and these cache bounds, fit the
memory this machine has available? One warning line when it will not (the planner's verdict for the pair that runs);
nothing when it fits or when the planner cannot say (no psutil, an MLX or TensorRT pair, a checkpoint)."""
from __future__ import annotations

from pathlib import Path


def machine_before_load():
    """This machine's memory, read before the model is loaded (after, the model's own pages count as used)."""
    try:
        from .devices import this_machine

        return this_machine(bandwidth_gbs=1.0, matmul_gflops=1.0)  # the warning needs memory only: no probes
    except Exception:  # noqa: BLE001 - no psutil on a minimal install: no warning rather than no run
        return None


def fit_warning(path, device, encoder: str, decoder: str, n_ctx: int | None = None,
                embed_cache_bytes: int | None = None, prefix_cache_bytes: int | None = None,
                parallel: int = 1) -> str | None:
    """A one-line warning when the planner's verdict for encoder + decoder is 'tight' or 'does not fit'."""
    if device is None or not (Path(path) / "manifest.json").is_file():
        return None
    from ..errors import EdgeVLMError
    from .bundle import PlanRequest, plan_bundle

    try:
        plan = plan_bundle(path, device, PlanRequest(context=n_ctx, parallel=parallel,
                                                     embed_cache_bytes=embed_cache_bytes,
                                                     prefix_cache_bytes=prefix_cache_bytes))
    except (EdgeVLMError, OSError, ValueError):
        return None
    option = next((o for o in plan["options"] if o["encoder"] == encoder and o["decoder"] == decoder), None)
    if option is None or option["verdict"] == "fits":
        return None
    mib = 1 << 20
    needed, total, usable = option["memory"]["needed"] / mib, option["memory"]["total"] / mib, plan["usable_bytes"] / mib
    lower = "a smaller --n-ctx, smaller --embed-cache-mb/--prefix-cache-mb or a smaller quant"
    if option["verdict"] == "tight":
        return (f"warning: {encoder} + {decoder} at context {plan['context']} needs {needed:,.0f} MiB of the "
                f"{usable:,.0f} MiB available here, inside the safety margin ({total:,.0f} MiB with it); "
                f"if it runs out, try {lower} (edgevlm plan {path} --device this-machine)")
    return (f"warning: {encoder} + {decoder} at context {plan['context']} needs {needed:,.0f} MiB but only "
            f"{usable:,.0f} MiB is available here; expect swapping or an out-of-memory kill: use {lower} "
            f"(edgevlm plan {path} --device this-machine)")
