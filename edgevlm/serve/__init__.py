"""`edgevlm serve`: an OpenAI-compatible HTTP API over a Session. POST /v1/chat/completions (images as data URLs, or
local paths under --allow-local-images; optional SSE streaming), GET /v1/models, /health, /metrics, and a chat page
at /.

    openai.py     request parsing and response shapes (pure)
    metrics.py    Prometheus metrics (prometheus_client, one registry per server)
    scheduler.py  the one engine thread: slots, admission, batched steps
    sequences.py  which decoder sequence each slot answers on, and the batched decode step
    http.py       the handler, the server and its options"""
from .http import EdgeServer, ServerOptions, make_server
from .openai import ChatService

__all__ = ["ChatService", "EdgeServer", "ServerOptions", "make_server"]
