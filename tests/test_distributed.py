"""Tensor and expert parallelism on CPU gloo: real process groups launched by torchrun (or, where a
test must watch one rank fail, by plain subprocesses with torchrun's environment), on the tiny
checkpoint. Every parallel layout must give the single-process logits in exact precision,
the same greedy tokens and the same session results; a rank that dies or hangs must end
the job with an error naming the failure, not a hang.

Run as a module, this file is the worker each rank runs (`python -m tests.test_distributed ...`).
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PROMPT = 140  # crosses the 128-token alignment, so persistence saves a segment
GENERATE = 6


def _tokens(n: int, seed: int) -> list[int]:
    return torch.randint(2, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def script(model, cache_root: Path) -> dict:
    """What every rank (and the single-process model) computes; compared value by value."""
    from runtime.session import SamplingParams, Session

    prompt, more = _tokens(PROMPT, 1), _tokens(5, 2)
    out: dict = {"logits": model(torch.tensor([prompt[:40]]), chunk_size=16)[0]}
    s = Session(model, chunk_size=64)
    s.extend(prompt)
    out["prompt_logits"] = s.last_logits
    out["greedy"] = list(s.generate(GENERATE, SamplingParams(temperature=0)))
    f = s.fork()
    f.extend(more)
    out["fork_logits"] = f.last_logits
    # the MTP block (split like the others) drafts, the main model verifies
    out["speculative"] = list(f.generate(GENERATE, SamplingParams(temperature=0), speculative=True))
    out["accepted"] = f.spec.accepted
    s.rewind(PROMPT - 3)
    s.extend(prompt[-3:])
    out["rewind_logits"] = s.last_logits
    warnings: list[str] = []
    first = Session(model, chunk_size=64, persist=True, cache_root=cache_root, warn=warnings.append)
    first.extend(prompt)
    out["persisted_first_cached"] = first.cached_tokens
    again = Session(model, chunk_size=64, persist=True, cache_root=cache_root, warn=warnings.append)
    again.extend(prompt)
    out["persisted_cached"], out["persisted_logits"] = again.cached_tokens, again.last_logits
    out["foreign_key_warnings"] = sum("another compatibility key" in w for w in warnings)
    return out


def worker(checkpoint: str, out_dir: str, tp: int, ep: int, mode: str, timeout_s: float) -> None:
    from runtime.distributed import comm, shard

    rank, _ = comm.init(timeout_s=timeout_s)
    model = shard.load(checkpoint, tp=tp or None, ep=ep or None)
    out = Path(out_dir)
    (out / f"report{rank}.json").write_text(json.dumps(asdict(model.report)))
    if mode == "run":
        result = script(model, out / "prefix")
        if rank == 0:
            torch.save(result, out / "result.pt")
        return
    if mode == "lead":  # rank 0 alone runs the script; the others follow its model calls
        from runtime.distributed.follow import Leader, follow

        if rank:
            (out / f"follower{rank}.json").write_text(json.dumps(follow(model)))
            return
        with Leader(model) as leader:
            with pytest.raises(ValueError, match="token ids must lie in"):  # refused alike on every rank
                leader.extend(leader.new_state(), torch.tensor([10**6]))
            result = script(leader, out / "prefix")
            gc.collect()
            result["live_parts"] = leader.live_parts()
        torch.save(result, out / "result.pt")
        return
    (out / f"loaded{rank}").touch()
    if rank == 1:  # the test kills (die) or ignores (hang) this rank from here on
        time.sleep(3600)
    try:
        model(torch.tensor([_tokens(8, 3)]))
    except comm.RankFailure as e:
        (out / "error.txt").write_text(str(e))
        raise SystemExit(3)


def torchrun(world: int, args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
           "-m", "tests.test_distributed", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def single(checkpoint_dir, tmp_path_factory):
    """The single-process results; its persisted prefixes are left in the shared cache root,
    where the parallel runs must not use them (another layout, another key)."""
    from runtime import load

    root = tmp_path_factory.mktemp("dist")
    model = load(checkpoint_dir("tiny", 0))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank runs; more threads than free cores only slows it down
    try:
        result = script(model, root / "prefix")
    finally:
        torch.set_num_threads(threads)
    return result, root, {name: t.nbytes for name, t in model.state_dict().items()}


def _expected_held(sizes: dict[str, int], tp: int, ep: int) -> float:
    """Bytes a rank holds by the design: heads and vocabulary 1/tp, experts and the shared expert 1/ep."""
    total = 0.0
    for name, n in sizes.items():
        if name in ("embed.weight", "head.weight") or name.split(".")[-3:-1] in (
                ["attn", "wq_b"], ["attn", "wo_a"], ["attn", "wo_b"]) or name.endswith("attn.attn_sink"):
            total += n / tp
        elif ".experts." in name or ".shared_experts." in name:
            total += n / ep
        else:
            total += n
    return total


# name: world, tp, ep, mode ("run": every rank runs the script; "lead": rank 0 runs it, rank 1 follows)
LAYOUTS = {"tp2": (2, 2, 1, "run"), "ep2": (2, 1, 2, "run"), "tp2_ep4": (4, 2, 4, "run"),
           "tp2_lead": (2, 2, 1, "lead")}


@pytest.fixture(scope="module")
def parallel(checkpoint_dir, single):
    runs: dict[str, tuple[dict, list[dict]]] = {}

    def run(name: str) -> tuple[dict, list[dict]]:
        if name not in runs:
            world, tp, ep, mode = LAYOUTS[name]
            out = single[1] / name
            out.mkdir()
            # its own copy of the single-process prefixes (two runs of one layout share a key)
            shutil.copytree(single[1] / "prefix", out / "prefix")
            done = torchrun(world, [str(checkpoint_dir("tiny", 0)), str(out), str(tp), str(ep), mode, "120"])
            assert done.returncode == 0, done.stderr[-3000:]
            reports = [json.loads((out / f"report{r}.json").read_text()) for r in range(world)]
            result = torch.load(out / "result.pt")
            if mode == "lead":  # the followers forgot every state rank 0 let go of
                result["follower_parts"] = [json.loads((out / f"follower{r}.json").read_text())
                                            for r in range(1, world)]
            runs[name] = result, reports
        return runs[name]

    return run


@pytest.mark.parametrize("name", ["tp2_lead", "ep2", pytest.param("tp2", marks=pytest.mark.slow), "tp2_ep4"])
def test_parallel_equals_single(parallel, single, name):
    """Every rank runs the same calls (SPMD), or rank 0 alone does and the others follow (lead)."""
    expected = single[0]
    got, reports = parallel(name)
    for key in ("logits", "prompt_logits", "fork_logits", "rewind_logits", "persisted_logits"):
        diff = (got[key] - expected[key]).abs().max().item()
        assert diff <= 1e-5, f"{name} {key}: max |diff| {diff}"
    assert got["greedy"] == expected["greedy"]
    assert (got["speculative"], got["accepted"]) == (expected["speculative"], expected["accepted"])
    # the parallel run did not take the single-process prefix (another key: reported as foreign),
    # then saved and reused its own
    assert got["persisted_first_cached"] == expected["persisted_first_cached"] == 0
    assert got["persisted_cached"] == expected["persisted_cached"] == 128
    assert got["foreign_key_warnings"] >= 1 and expected["foreign_key_warnings"] == 0
    # each rank read exactly its planned bytes, less than the whole checkpoint, and holds what the
    # plan says (checked at load too; here against the numbers of a single-process model)
    _, tp, ep, mode = LAYOUTS[name]
    if mode == "lead":
        assert got["follower_parts"] == [got["live_parts"]] == [0]
    for r in reports:
        assert r["read_bytes"] == r["planned_bytes"] < r["checkpoint_bytes"]
        assert r["held_bytes"] == r["planned_held_bytes"] == _expected_held(single[2], tp, ep)


def test_layout_plan_splits_what_it_says(checkpoint_dir):
    """The plan's pieces tile the split tensors exactly once across a group, and replicate the rest."""
    from runtime.checkpoint import inventory
    from runtime.distributed.layout import make_layout, weight_slices
    from tests.conftest import CONFIGS

    config = CONFIGS["tiny"]
    plans = [weight_slices(make_layout(4, r, config, 2, 4), config) for r in range(4)]
    inv = inventory(config)
    for name in plans[0].keys() | plans[3].keys():
        held = [p[name] for p in plans if name in p]
        if ".experts." in name:
            assert len(held) == 1 and held[0].whole  # one owner per routed expert
        elif name in ("embed.weight", "head.weight") or (name.split(".")[-3:-1] in
                                                          (["attn", "wq_b"], ["attn", "wo_a"], ["attn", "wo_b"])):
            spans = sorted((p.span.start, p.span.stop) for p in held[:2])  # one tp group: ranks 0, 1
            assert spans[0][0] == 0 and spans[0][1] == spans[1][0]
            assert spans[1][1] == inv[name].logical_shape[held[0].dim]
        elif ".shared_experts." not in name and not name.endswith("attn_sink"):
            assert all(p.whole for p in held) and len(held) == 4


def test_default_sizes_keep_tensor_parallel_inside_a_node():
    from runtime.config import released_config
    from runtime.distributed.layout import default_sizes

    pro, flash = released_config("pro"), released_config("flash")  # 16 and 8 output groups
    assert default_sizes(16, pro, per_node=8) == (8, 16)  # two nodes of 8: TP over NVLink only
    assert default_sizes(16, pro) == (16, 16)
    assert default_sizes(8, flash, per_node=8) == (8, 8)
    assert default_sizes(6, flash) == (2, 2)  # 6 divides neither 8 groups nor 256 experts


def test_mismatched_layouts_refused(checkpoint_dir):
    from runtime.distributed.layout import LayoutError, make_layout
    from tests.conftest import CONFIGS

    config = CONFIGS["tiny"]
    with pytest.raises(LayoutError, match="must divide the world size 4"):
        make_layout(4, 0, config, tp=3)
    with pytest.raises(LayoutError, match="o_groups=2"):
        make_layout(4, 0, config, tp=4)
    with pytest.raises(LayoutError, match="n_routed_experts=8"):
        make_layout(3, 0, config, tp=1, ep=3)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn_ranks(commands: list[list[str]]) -> list[subprocess.Popen]:
    """One process per command, rank by rank, with the environment torchrun would give them."""
    port = _free_port()
    procs = []
    for rank, command in enumerate(commands):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(len(commands)), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, "-m", *command], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def test_mismatched_launch_refused(checkpoint_dir):
    """Ranks started with different sizes all stop at load, saying what differs."""
    ckpt = str(checkpoint_dir("tiny", 0))
    procs = _spawn_ranks([["runtime.distributed", ckpt, "--tp", "2", "--timeout", "60"],
                          ["runtime.distributed", ckpt, "--tp", "1", "--timeout", "60"]])
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [2, 2], errors
    assert "error: rank 0 and rank 1 were started differently (tp: 2 here, 1 on rank 1)" in errors[0]
    assert "error: rank 1 and rank 0 were started differently (tp: 1 here, 2 on rank 0)" in errors[1]


@pytest.mark.slow
def test_command_line_greedy_equals_single(checkpoint_dir, exact):
    """`torchrun -m runtime.distributed` continues a prompt with the single-process greedy tokens."""
    ids = _tokens(20, 4)
    state, expected = exact.new_state(), []
    token = int(exact.extend(state, torch.tensor(ids)).logits[0].argmax())
    while len(expected) < 6:
        expected.append(token)
        token = int(exact.extend(state, torch.tensor([token])).logits[0].argmax())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
           "runtime.distributed", str(checkpoint_dir("tiny", 0)), "--precision", "exact", "--ep", "1",
           "--ids", ",".join(map(str, ids)), "--max-tokens", "6"]
    done = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=240,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert (result["tp"], result["ep"], result["tokens"]) == (2, 1, expected)


@pytest.mark.parametrize("how", ["die", "hang"])
def test_lost_rank_ends_the_job_with_an_error(checkpoint_dir, tmp_path, how):
    """Rank 1 is killed (die) or stops answering (hang) while rank 0 is in a forward: rank 0 stops
    with RankFailure, within the 5 s timeout for a hang, at once for a death."""
    args = ["tests.test_distributed", str(checkpoint_dir("tiny", 0)), str(tmp_path), "2", "1", "fail", "5"]
    procs = _spawn_ranks([args, args])
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "loaded1").exists():
            assert time.monotonic() < deadline and procs[1].poll() is None, procs[1].communicate()[1][-2000:]
            time.sleep(0.2)
        if how == "die":
            procs[1].send_signal(signal.SIGKILL)
        started = time.monotonic()
        _, err = procs[0].communicate(timeout=60)
        took = time.monotonic() - started
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()
    assert procs[0].returncode == 3, err[-2000:]
    message = (tmp_path / "error.txt").read_text()
    assert "among ranks [0, 1] failed on rank 0: a rank died or did not answer within 5 s" in message
    assert took < 30


@pytest.mark.slow  # a full agent turn (a ~1.5K-token prefill) on two ranks
def test_fix_with_weights_under_torchrun(tmp_path, monkeypatch):
    """`v4agent fix --weights` unchanged under torchrun: runtime.load splits the model, rank 0 runs the
    agent, rank 1 follows its model calls; the run ends (no patch from noise: exit code 1)."""
    from runtime.checkpoint import make_tiny
    from tests.fixtures_agent import isolate, make_repo

    isolate(monkeypatch, tmp_path)
    checkpoint = make_tiny(tmp_path / "checkpoint")  # the real vocabulary: the agent tokenizes text
    repo = make_repo(tmp_path / "repo")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--no-python",
           str(Path(sys.executable).with_name("v4agent")), "fix", "add is wrong", "--repo", str(repo),
           "--weights", str(checkpoint), "--device", "cpu", "--max-turns", "1", "--json"]
    env = dict(os.environ, OMP_NUM_THREADS="1", V4AGENT_MAX_TURN_TOKENS="8", V4AGENT_TP="1", V4AGENT_EP="2")
    done = subprocess.run(cmd, check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    out = json.loads(done.stdout)
    assert (out["stop"], out["turns"], out["cached_tokens"]) == ("max_turns", 1, 0), done.stderr[-3000:]
    assert 1 <= out["tokens_out"] <= 8


def _serve_greedy(checkpoint: Path, launcher: list[str], env: dict[str, str]) -> str:
    """Start `v4agent serve` (through `launcher`), ask one greedy chat completion, stop it; its text."""
    import re
    import urllib.request

    cmd = [*launcher, str(Path(sys.executable).with_name("v4agent")), "serve", "--weights", str(checkpoint),
           "--device", "cpu", "--port", str(_free_port()), "--precision", "exact"]  # one port: ranks would clash
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        seen = ""
        while (found := re.search(r"serving \S+ on (http://\S+/v1)", seen)) is None:
            line = proc.stderr.readline()
            assert line, f"serve ended before listening: {seen[-3000:]}"
            seen += line
        body = json.dumps({"model": checkpoint.name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5,
                           "temperature": 0}).encode()
        request = urllib.request.Request(f"{found.group(1)}/chat/completions", body,
                                         {"content-type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as answer:
            message = json.loads(answer.read())["choices"][0]["message"]
        return message["reasoning_content"] or message["content"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)


@pytest.mark.slow  # two servers started and stopped
def test_serve_under_torchrun_answers_as_one_process(tmp_path, monkeypatch):
    """`v4agent serve` under torchrun: rank 0 listens and runs the engine, rank 1 follows; a greedy
    answer is the single-process server's."""
    from runtime.checkpoint import make_tiny
    from tests.fixtures_agent import isolate

    isolate(monkeypatch, tmp_path)
    checkpoint = make_tiny(tmp_path / "checkpoint")
    env = dict(os.environ, OMP_NUM_THREADS="1", V4AGENT_TP="2", V4AGENT_EP="1")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--no-python"]
    parallel = _serve_greedy(checkpoint, torchrun, env)
    assert parallel and parallel == _serve_greedy(checkpoint, [], env)


if __name__ == "__main__":
    checkpoint, out_dir, tp, ep, mode, timeout_s = sys.argv[1:7]
    worker(checkpoint, out_dir, int(tp), int(ep), mode, float(timeout_s))
