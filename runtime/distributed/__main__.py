"""`torchrun ... -m runtime.distributed CHECKPOINT`: load a checkpoint split across the ranks and
greedily continue a prompt; rank 0 prints one JSON object (docs/distributed.md has the commands).

A smoke test for a machine or a cluster: it shows the layout, each rank's bytes against the
plan, the tokens and the decode step time. Bad sizes, mismatched launches and lost ranks
end every rank with one `error: ...` line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="torchrun --nproc-per-node N -m runtime.distributed")
    parser.add_argument("checkpoint", help="checkpoint directory in the official layout")
    parser.add_argument("--tp", type=int, default=None, help="tensor-parallel size (default: from the world size)")
    parser.add_argument("--ep", type=int, default=None, help="expert-parallel size (default: the world size)")
    parser.add_argument("--precision", choices=("exact", "reference"), default="reference")
    prompt = parser.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default="def fibonacci(n):", help="text, encoded with the checkpoint's tokenizer")
    prompt.add_argument("--ids", help="comma-separated token ids instead of text")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds a rank waits for the others")
    args = parser.parse_args(argv)

    from runtime.checkpoint import CheckpointError
    from runtime.distributed import comm, shard
    from runtime.distributed.layout import LayoutError

    try:
        rank, world = comm.init(args.timeout)
        device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
        model = shard.load(args.checkpoint, args.precision, device, tp=args.tp, ep=args.ep)
        if args.ids is not None:
            ids = [int(i) for i in args.ids.split(",") if i.strip()]
        else:
            from runtime.tokenizer import load_tokenizer

            ids = load_tokenizer(args.checkpoint).encode(args.prompt)
        state = model.new_state()
        token = int(model.extend(state, torch.tensor(ids)).logits[0].argmax())
        tokens, steps = [token], []
        while len(tokens) < args.max_tokens:
            started = time.perf_counter()
            tokens.append(int(model.extend(state, torch.tensor([tokens[-1]])).logits[0].argmax()))
            steps.append(time.perf_counter() - started)
        reports = comm.gather_objects(model.report.__dict__, "reports")
    except (LayoutError, comm.RankFailure, CheckpointError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if rank == 0:
        print(json.dumps({"world": world, **{k: v for k, v in model.layout.describe().items() if k != "rank"},
                          "precision": args.precision, "prompt_tokens": len(ids), "tokens": tokens,
                          "decode_step_s_median": sorted(steps)[len(steps) // 2] if steps else None,
                          "ranks": reports}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
