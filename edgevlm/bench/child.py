"""One benchmark run in its own process (see edgevlm.bench.run.measure_isolated): argv[1] is the JSON request,
progress lines go to stderr, the run record is the last stdout line."""
from __future__ import annotations

import json
import sys


def main() -> int:
    from ..errors import EdgeVLMError
    from .harness import Scenario
    from .run import CHILD_PROGRESS, measure

    request = json.loads(sys.argv[1])
    values = dict(request["scenario"])
    values["image_size"] = tuple(values["image_size"])

    def progress(message: str) -> None:
        print(CHILD_PROGRESS + message, file=sys.stderr, flush=True)

    try:
        if request.get("workload") == "video":  # the video workload (edgevlm.bench.video)
            from .video import VideoWorkload, measure_video

            record = measure_video(request["path"], request["encoder"], request["decoder"], Scenario(**values),
                                   VideoWorkload(**request["video"]), progress)
        elif request.get("peer") == "mtmd":  # llama.cpp's own multimodal path, alone in this process
            from pathlib import Path

            from .harness import mtmd_peer

            record = mtmd_peer(Path(request["path"]), request["decoder"], request["mmproj"], request["texts"],
                               request["placeholder"], Scenario(**values), progress)
        else:
            record = measure(request["path"], request["encoder"], request["decoder"], Scenario(**values),
                             request["bandwidth"], progress, request.get("trace"), request.get("accuracy_n", 0))
    except EdgeVLMError as error:  # a clear error stays a clear error in the parent
        print(json.dumps({"error": str(error), "type": type(error).__name__}))
        return 0
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
