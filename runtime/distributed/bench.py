"""`v4agent bench distributed`: the parallel model against the single-process one, under torchrun.

On a tiny checkpoint (written once into a temporary directory) it launches 1, 2 and 4 ranks
with `python -m torch.distributed.run` (gloo on CPUs, NCCL on GPUs) and reports, per world
size: the largest logit difference from the single-process model in exact precision, each
rank's checkpoint bytes over the total, the bytes each rank hands to collectives per decoded
token (per layer for the attention and MoE all-reduces, per token for embedding and head),
and the decode step time relative to one rank. It adds the memory plans of the released
configs on the machines docs/distributed.md plans for (computed, not measured).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

PROMPT, DECODE = 48, 16


def _prompt() -> torch.Tensor:
    return torch.randint(2, 512, (PROMPT,), generator=torch.Generator().manual_seed(0))


def worker(checkpoint: str, out: str, tp: int, ep: int) -> None:
    """One rank: logits of the prompt, then DECODE greedy steps timed and their traffic counted."""
    from runtime.distributed import comm, shard

    rank, world = comm.init()
    device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    model = shard.load(checkpoint, device=device, tp=tp or None, ep=ep or None)
    state = model.new_state()
    logits = model.extend(state, _prompt(), logits="all").logits.cpu()
    token = int(logits[-1].argmax())
    comm.traffic.clear()
    steps = []
    for _ in range(DECODE):
        started = time.perf_counter()
        token = int(model.extend(state, torch.tensor([token])).logits[0].argmax())
        steps.append(time.perf_counter() - started)
    traffic = dict(comm.traffic)
    reports = comm.gather_objects(model.report.__dict__, "reports")
    if rank == 0:
        torch.save(logits, Path(out) / "logits.pt")
        layers = model.config.num_hidden_layers
        Path(out, "result.json").write_text(json.dumps({
            "world": world, "tp": model.layout.tp, "ep": model.layout.ep,
            "step_s_median": sorted(steps)[len(steps) // 2],
            "bytes_per_token_per_layer": (traffic.get("attention", 0) + traffic.get("moe", 0)) / DECODE / layers,
            "bytes_per_token_embedding_and_head": (traffic.get("embedding", 0) + traffic.get("head", 0)) / DECODE,
            "reports": reports,
        }))


# the layouts docs/distributed.md plans for: (config, machine, world, tp, ep)
PLANS = (("flash", "2x H200", 2, 2, 2), ("flash", "4x H100", 4, 4, 4), ("flash", "8x H100", 8, 8, 8),
         ("pro", "8x H200", 8, 8, 8), ("pro", "2 nodes x 8 H100", 16, 8, 16))


def memory_plans(precision: str = "reference") -> list[dict]:
    """Weights per rank (as held: FP4 experts packed, the rest dequantized as the model holds it)
    for the released configs on the machines of PLANS, and the KV one sequence adds on every rank."""
    from runtime.config import released_config
    from runtime.distributed.layout import make_layout
    from runtime.distributed.shard import planned_held_bytes
    from runtime.info import model_info
    from runtime.model import Model

    buffers: dict[str, dict[str, torch.Tensor]] = {}
    out = []
    for name, machine, world, tp, ep in PLANS:
        config = released_config(name)
        if name not in buffers:
            with torch.device("meta"):
                buffers[name] = Model(config, precision).state_dict()
        per_rank = [planned_held_bytes(buffers[name], config, precision, make_layout(world, r, config, tp, ep, precision))
                    for r in range(max(tp, ep))]  # ranks beyond max(tp, ep) repeat these parts
        info = model_info(config)
        per_token, fixed = info["kv_bytes_per_token_native_scales"], info["kv_partial_state_bytes_per_sequence"]
        out.append({"model": name, "machine": machine, "world": world, "tp": tp, "ep": ep,
                    "weights_total_one_process": sum(t.nbytes for t in buffers[name].values()),
                    "weights_per_rank_max": max(per_rank), "weights_per_rank_min": min(per_rank),
                    "kv_per_sequence_128k": per_token * 131072 + fixed, "kv_per_sequence_1m": per_token * 2**20 + fixed})
    return out


def _launch(world: int, checkpoint: Path, out: Path, threads: int) -> dict:
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
           "-m", "runtime.distributed.bench", str(checkpoint), str(out), "0", "0"]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
    if done.returncode:
        raise RuntimeError(f"{world} ranks failed: {done.stderr.strip()[-2000:]}")
    return json.loads((out / "result.json").read_text())


def bench_distributed(worlds: tuple[int, ...] = (1, 2, 4)) -> dict:
    from runtime import load
    from runtime.checkpoint import make_tiny
    from runtime.config import tiny_config

    with tempfile.TemporaryDirectory(prefix="v4agent-bench-dist-") as tmp:
        checkpoint = make_tiny(Path(tmp) / "tiny", tiny_config())
        # the same threads per rank at every world size (more than the cores would slow the
        # big worlds down for no reason of their own), and for the single process: GEMMs sum
        # in an order that depends on the thread count, which would show up as a difference
        threads = max(1, (os.cpu_count() or 1) // max(worlds))
        single = load(checkpoint)
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            expected = single.extend(single.new_state(), _prompt(), logits="all").logits
        finally:
            torch.set_num_threads(before)
        runs = {}
        for world in worlds:
            result = _launch(world, checkpoint, Path(tmp) / f"world{world}", threads)
            diff = (torch.load(Path(tmp) / f"world{world}" / "logits.pt") - expected).abs().max().item()
            total = result["reports"][0]["checkpoint_bytes"]
            runs[str(world)] = {
                "tp": result["tp"], "ep": result["ep"],
                "max_logit_diff_vs_single": diff,
                "weight_bytes_over_total_per_rank": [r["read_bytes"] / total for r in result["reports"]],
                "bytes_per_decoded_token_per_layer": result["bytes_per_token_per_layer"],
                "bytes_per_decoded_token_embedding_and_head": result["bytes_per_token_embedding_and_head"],
                "decode_step_s": result["step_s_median"],
            }
    one = runs.get("1", {}).get("decode_step_s")
    for world, run in runs.items():
        if one:
            run["step_time_ratio_vs_1_rank"] = run["decode_step_s"] / one
    return {"checkpoint": "tiny_config() (4 layers, hidden 256, 4 heads, 8 experts, vocab 129,280), exact",
            "backend": "nccl" if torch.cuda.is_available() else "gloo", "prompt": PROMPT, "decoded": DECODE,
            "cpu_count": os.cpu_count(), "threads_per_rank": threads, "worlds": runs,
            "memory_plans_reference_precision": memory_plans()}


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
