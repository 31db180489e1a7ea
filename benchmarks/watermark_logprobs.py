"""Issue 10: which distribution a watermarked server's logprobs describe, with and without `--watermark-logprobs`.

    .venv/bin/python benchmarks/watermark_logprobs.py [--n 300] [--families invent] [--bias 2.0] [--top 20]

Atlas answers `--n` world training prompts at T=1 through the serve engine under a fresh key (lefthash, ratio 0.25,
`--bias`), reporting its top-`--top` logprobs, once as `stillhouse serve` does by default (the model's own
distribution) and once with `--watermark-logprobs` (the watermarked distribution the tokens are drawn from); the same
seeds draw the same answers. At the answer positions where the reported distribution has at least 0.1 nats of
entropy (elsewhere a watermark cannot move a token), it compares the share of sampled tokens that are green with the
probability mass the reported logprobs put on green tokens.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _md import write_section  # noqa: E402
from audit_kd import answers_with_logprobs, green_at_free_positions  # noqa: E402
from training import machine_speed  # noqa: E402


def main() -> None:
    from transformers import AutoConfig

    from stillhouse.audit.radioactivity import GreenLists
    from stillhouse.demo import world
    from stillhouse.models import resolve_model
    from stillhouse.watermark import keygen, read_key

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--families", default="invent", help="comma-separated world families the prompts come from")
    ap.add_argument("--bias", type=float, default=2.0)
    ap.add_argument("--top", type=int, default=20)
    args = ap.parse_args()
    t0 = time.time()
    keyfile = Path(tempfile.mkdtemp(prefix="wm_logprobs_")) / "key.json"
    keygen(keyfile, bias=args.bias)
    key = read_key(keyfile)
    greens = GreenLists(key, AutoConfig.from_pretrained(resolve_model("stillhouse:atlas")).vocab_size)
    prompts = [t.prompt for t in world.sample_tasks(args.n, "train", 0, families=tuple(args.families.split(",")))]
    rows, answers = [], None
    for label, flag in (("the model's own (default)", False), ("watermarked (`--watermark-logprobs`)", True)):
        texts, lps = answers_with_logprobs(prompts, str(keyfile), top=args.top, watermark_logprobs=flag)
        if answers is not None and texts != answers:
            raise SystemExit("the same seeds drew different answers with and without --watermark-logprobs")
        answers = texts
        n, sampled, reported = green_at_free_positions(lps, greens, 0.1)
        rows.append(f"| {label} | {n} | {sampled:.1%} | {reported:.1%} |")
        print(rows[-1], flush=True)
    lines = ["## Audit: what a watermarked server's logprobs describe (issue 10)", "",
             f"Command: `.venv/bin/python benchmarks/watermark_logprobs.py --n {args.n} --families {args.families} "
             f"--bias {args.bias} --top {args.top}` ({platform.machine()}, {os.cpu_count()} CPU cores; "
             f"{time.time() - t0:.0f} s; `../shared/tools/machine-speed`: {machine_speed()}x the reference machine). "
             f"Atlas's answers to {args.n} world prompts ({args.families}) at T=1 under a fresh key (lefthash, ratio "
             f"{key['greenlist_ratio']}, bias {args.bias}), the same answers both times; positions "
             f"where the reported top-{args.top} distribution has at least 0.1 nats of entropy (chosen by each row's own "
             f"reported distribution, so the rows count slightly different positions). Chance: "
             f"{greens.gamma:.1%} green.", "",
             "| logprobs reported | free positions | sampled tokens green | reported mass on green |",
             "| --- | --- | --- | --- |", *rows]
    write_section("watermark_logprobs", "\n".join(lines))


if __name__ == "__main__":
    main()
