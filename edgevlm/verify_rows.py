"""verify's rows: one per artifact or pair, each with its checks (metric, measured value, gate, verdict)."""
from __future__ import annotations

from .errors import BackendUnavailableError, EdgeVLMError

# Trained or random weights, measured: the PyTorch reference's mean top-1 probability over the decoder probe. Random
# weights give about 1/vocabulary (the tiny test models 0.003-0.01, the presets ~1e-4); the trained reference model
# gives > 0.9 (docs/parity-ladder.md). Below this, the gates calibrated on trained weights cannot judge.
TRAINED_MIN_CONFIDENCE = 0.2


def failure(name: str, role: str, exc: Exception) -> dict:
    """Only a backend that is not installed here is "skipped"; every other load or run failure is a FAIL."""
    if isinstance(exc, BackendUnavailableError):
        return {"artifact": name, "role": role, "status": "skipped", "note": str(exc), "checks": []}
    note = str(exc) if isinstance(exc, EdgeVLMError) else f"{type(exc).__name__}: {exc}"
    return {"artifact": name, "role": role, "status": "FAIL", "note": note,
            "checks": [{"metric": "loads and runs", "value": "no", "gate": "yes", "verdict": "FAIL"}]}


def refused(name: str, role: str, known) -> dict:
    """A precision this edgevlm has no gate for is never judged by a neighbour's gate."""
    return {"artifact": name, "role": role, "status": "FAIL",
            "note": f"no parity gate for {name}; this edgevlm gates {', '.join(known)}",
            "checks": [{"metric": "known precision", "value": name, "gate": ", ".join(known), "verdict": "FAIL"}]}


def judged_row(name: str, role: str, gate, values: dict, trained: bool | None, note: str | None = None) -> dict:
    """A measured row: judged by its gate, or "unjudged" where the gate needs trained weights and these are random."""
    judged = not gate.trained_only or bool(trained)
    row = {"artifact": name, "role": role, **values, "criterion": gate.criterion,
           "status": ("pass" if gate.passes(values) else "FAIL") if judged else "unjudged",
           "checks": gate.checks(values, judged)}
    if not judged:
        row["note"] = RANDOM_WEIGHTS_NOTE
    elif note:
        row["note"] = note
    return row


RANDOM_WEIGHTS_NOTE = ("not judged: the weights are random (the reference's top-1 probability is below "
                       f"{TRAINED_MIN_CONFIDENCE}), where damage hides in quantization noise; this gate is calibrated "
                       "on trained weights: verify a trained checkpoint (e.g. `edgevlm reference`)")
