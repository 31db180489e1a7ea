"""A stand-in for `vllm run-batch` (vLLM itself cannot be installed here): the same command line, the same files.

    python tests/fake_vllm.py run-batch -i IN.jsonl -o OUT.jsonl --model M [--seconds-per-request S]

Reads OpenAI batch lines ({custom_id, method, url, body}) and writes one output line per request, answered as the
fake OpenAI server answers (tests.fake_openai.chat_completion), after all of them are done, as vLLM does. Each request
it answers is appended to $FAKE_VLLM_LOG (one custom_id and request id per line), so a test counts what it ran.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.fake_batches import request_id  # noqa: E402
from tests.fake_openai import chat_completion  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(prog="vllm")
    sub = ap.add_subparsers(dest="cmd", required=True)
    rb = sub.add_parser("run-batch")
    rb.add_argument("-i", "--input-file", required=True)
    rb.add_argument("-o", "--output-file", required=True)
    rb.add_argument("--model", required=True)
    rb.add_argument("--seconds-per-request", type=float, default=0.0)
    args = ap.parse_args()
    out = []
    for raw in Path(args.input_file).read_text().splitlines():
        if not raw.strip():
            continue
        line = json.loads(raw)
        if line["body"]["model"] != args.model:
            sys.exit(f"request {line['custom_id']} asks for model {line['body']['model']!r}, serving {args.model!r}")
        time.sleep(args.seconds_per_request)
        if os.environ.get("FAKE_VLLM_LOG"):
            with open(os.environ["FAKE_VLLM_LOG"], "a") as fh:
                fh.write(json.dumps([line["custom_id"], request_id(line["body"])]) + "\n")
        out.append({"id": f"vllm-{line['custom_id']}", "custom_id": line["custom_id"], "error": None,
                    "response": {"status_code": 200, "request_id": line["custom_id"],
                                 "body": chat_completion(line["body"], args.model)}})
    Path(args.output_file).write_text("".join(json.dumps(r) + "\n" for r in out))


if __name__ == "__main__":
    main()
