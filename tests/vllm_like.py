"""A local server that answers `/v1/completions` with vLLM's `prompt_logprobs` (a list with None first, then per
position a dict of token id -> logprob, rank, decoded_token, the prompt's own token always among them), computed by
a real tiny model: what on-policy distillation sends to a vLLM teacher, without vLLM."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager

import torch


def app_for(model_dir: str):
    from fastapi import FastAPI
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    app = FastAPI()
    app.state.calls = 0

    @app.post("/v1/completions")
    def completions(body: dict):
        app.state.calls += 1
        ids, k = body["prompt"], int(body.get("prompt_logprobs") or 0)
        with torch.no_grad():
            logp = model(torch.tensor([ids])).logits[0].log_softmax(-1)
        plp = [None]
        for p in range(1, len(ids)):
            row = logp[p - 1]
            order = row.argsort(descending=True)
            rank = {int(i): r + 1 for r, i in enumerate(order[:k].tolist())}
            keep = [*order[:k].tolist(), ids[p]]
            plp.append({str(i): {"logprob": float(row[i]), "rank": rank.get(i, int((row > row[i]).sum()) + 1),
                                 "decoded_token": tok.decode([i])} for i in keep})
        return {"id": "cmpl-x", "object": "text_completion", "created": int(time.time()), "model": body["model"],
                "choices": [{"index": 0, "text": "", "logprobs": None, "finish_reason": "length",
                             "prompt_logprobs": plp}],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": 1, "total_tokens": len(ids) + 1}}

    return app


@contextmanager
def vllm_like(model_dir: str):
    """Serve `app_for(model_dir)` on a free 127.0.0.1 port; yields (the /v1 base URL, the app); always stops it."""
    import uvicorn

    app = app_for(model_dir)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.02)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1", app
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
