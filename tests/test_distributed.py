"""torchrun scale-out: N ranks = one process on the global batch, rank 0 writes, failures stop every rank.

The multi-process tests start 2 Gloo ranks of ``tests/distributed_worker.py`` (1 thread each), either with the
environment torchrun would export (so that the survivor of a killed rank is observed, not torn down by an agent)
or with torchrun itself (the CLI path and resume). Each has a timeout: a hang fails instead of waiting.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dnet_fast import distributed
from dnet_fast.checkpoint import load_checkpoint
from dnet_fast.config import load_config
from dnet_fast.distributed import LOCAL, Collective
from dnet_fast.engine import fit
from dnet_fast.sampling import MetaBatchSampler
from tests import distributed_worker as worker
from tests.conftest import TINY_OVERRIDES
from tests.helpers import flatten_state, free_port, world_of_one

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "distributed_worker.py"
TIMEOUT_S = 240  # per launch: imports and a few float64 iterations take seconds; a hang fails here
TOL = 1e-10


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **extra}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def launch(args: list[str], nprocs: int = 2) -> list[subprocess.CompletedProcess]:
    """Starts ``nprocs`` ranks of the worker with torchrun's environment; waits for all (with a timeout)."""
    port = str(free_port())
    procs = []
    for rank in range(nprocs):
        env = _env(RANK=str(rank), WORLD_SIZE=str(nprocs), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(nprocs),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, str(WORKER), *args], env=env, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    deadline, done = time.monotonic() + TIMEOUT_S, []
    try:
        for p in procs:
            out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"rank {len(done)} did not finish within {TIMEOUT_S} s (hang)")
    return done


def torchrun(args: list[str], nprocs: int = 2) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node nprocs ARGS`` with a timeout."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nprocs}", *args]
    try:
        return subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"torchrun did not finish within {TIMEOUT_S} s (hang): {' '.join(args)}")


def _relative_errors(got: dict, want: dict) -> dict[str, float]:
    got, want = dict(flatten_state(got)), dict(flatten_state(want))
    assert got.keys() == want.keys()
    errors = {}
    for key, w in want.items():
        g = got[key]
        if not isinstance(w, torch.Tensor):
            assert g == w, key
            continue
        w, g = w.double(), g.double()
        errors[key] = float((g - w).norm() / w.norm().clamp_min(1e-300)) if w.numel() else 0.0
    return errors


# ----------------------------------------------------------------------------------------------------------
# Two ranks equal one process on the global batch


@pytest.fixture(scope="module")
def two_rank_states(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("steps")
    done = launch(["steps", str(out)])
    for rank, p in enumerate(done):
        assert p.returncode == 0, f"rank {rank}:\n{p.stderr[-4000:]}"
    return out


@pytest.mark.slow
@pytest.mark.parametrize("case", list(worker.CASES))
def test_two_ranks_equal_one_process_on_the_global_batch(two_rank_states, case):
    want = worker.run_case(case, LOCAL)  # one process, batch 2·B and meta batch 2·M per iteration
    ranks = [torch.load(two_rank_states / f"{case}-rank{r}.pt", weights_only=True) for r in range(worker.WORLD)]
    errors = _relative_errors(ranks[0], want)
    worst = max(errors, key=errors.get)
    print(f"{case}: max relative error {errors[worst]:.2e} ({worst}) over {len(errors)} tensors")
    assert errors[worst] < TOL, worst
    # θ, Adam's moments and the parameters: bit-identical on every rank
    for key, t in flatten_state(ranks[1]):
        other = dict(flatten_state(ranks[0]))[key]
        assert torch.equal(t, other) if isinstance(t, torch.Tensor) else t == other, key
    if worker.CASES[case][0] not in ("off", "frozen"):  # frozen: D is never optimised
        assert want["diffnet_optimizer"]["state"], "Difficulty-Net's Adam has state to compare"


@pytest.mark.slow
@pytest.mark.parametrize("how", ["kill", "raise"])
def test_a_failing_rank_stops_the_other_with_a_message(tmp_path, how):
    start = time.monotonic()
    rank0, rank1 = launch(["steps", str(tmp_path), "--kill-rank", "1", "--kill-step", "2", "--how", how])
    assert time.monotonic() - start < TIMEOUT_S
    assert rank0.returncode == 1, rank0.stderr[-3000:]
    assert "rank 0 of 2 stopped: a collective failed, most likely because another rank stopped" in rank0.stderr
    if how == "kill":
        assert rank1.returncode == -9
    else:
        assert rank1.returncode == 2
        assert "error on rank 1 of 2: deliberate failure" in rank1.stderr


# ----------------------------------------------------------------------------------------------------------
# Resume and the CLI under torchrun


@pytest.mark.slow
def test_resume_under_torchrun_after_a_kill_is_bit_exact(tmp_path):
    tiny = [*TINY_OVERRIDES, "meta.mode=exact"]
    straight = torchrun(["-m", "dnet_fast", "train", *tiny, f"run.out_dir={tmp_path / 'a'}"])
    assert straight.returncode == 0, straight.stderr[-4000:]
    assert straight.stdout.count("| test |") == 1, straight.stdout  # the results table, printed by rank 0 only
    # 2 iterations per rank and epoch: rank 1 dies at its 3rd iteration, in epoch 2, after epoch 1's checkpoint.
    killed = torchrun([str(WORKER), "fit", *tiny, f"run.out_dir={tmp_path / 'b'}", "--kill-rank", "1",
                       "--kill-step", "3"])
    assert killed.returncode != 0
    assert load_checkpoint(tmp_path / "b" / "last.pt")["epoch"] == 1
    resumed = torchrun(["-m", "dnet_fast", "train", *tiny, f"run.out_dir={tmp_path / 'b'}", "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-4000:]

    a = load_checkpoint(tmp_path / "a" / "last.pt")
    b = load_checkpoint(tmp_path / "b" / "last.pt")
    for key, value in flatten_state({k: v for k, v in a.items() if k != "config"}):
        other = dict(flatten_state({k: v for k, v in b.items() if k != "config"}))[key]
        assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, key
    assert (tmp_path / "a" / "history.jsonl").read_bytes() == (tmp_path / "b" / "history.jsonl").read_bytes()
    results = [(tmp_path / r / "results.json").read_text() for r in ("a", "b")]
    assert json.loads(results[0])["test"] == json.loads(results[1])["test"]
    # the 2-rank evaluation (counts summed over ranks) is the one-process evaluation of the checkpoint
    from dnet_fast.evaluation import evaluate_checkpoint

    alone = evaluate_checkpoint(tmp_path / "a" / "last.pt", device="cpu")
    assert alone["per_class"] == json.loads(results[0])["test"]["per_class"]
    # any world size loads the checkpoint: one more epoch on one process
    more = fit(load_config(None, [*tiny, "optim.epochs=3", f"run.out_dir={tmp_path / 'a'}"]), resume=True)
    assert more["epochs_done"] == 3
    info = json.loads((tmp_path / "a" / "distributed.json").read_text())
    assert (info["world_size"], info["backend"], info["global_batch"]) == (2, "gloo", 32)
    # rank 0 alone writes: one line per logged step, one history row per refresh
    steps = [json.loads(line)["step"] for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == sorted(set(steps))


# ----------------------------------------------------------------------------------------------------------
# In-process checks (no second process)


def test_local_collective_returns_its_inputs():
    t = [torch.ones(3), None]
    assert LOCAL.mean(t) is t
    assert LOCAL.mean_keep_graph(t) is t
    assert LOCAL.summed(t[0])[0] is t[0]
    assert LOCAL.shard(t) is t
    stats = {"loss": torch.tensor(1.0)}
    assert LOCAL.mean_scalars(stats) is stats
    assert LOCAL.stream_index(7) == 7
    assert (LOCAL.distributed, LOCAL.is_main) == (False, True)


def test_mwn_refuses_torchrun_with_a_reason():
    from dnet_fast.meta import META_MODES
    from tests.helpers import TinyNet, meta_config

    model = TinyNet().double()
    meta = META_MODES.get("mwn")(meta_config("mwn"), model, worker.CrossEntropy(),
                                 torch.optim.SGD(model.parameters(), lr=0.1), 5)
    with pytest.raises(ValueError, match=r"meta\.mode=mwn cannot run under torchrun: its weights"):
        meta.use_collective(Collective(rank=0, world_size=2, group=object()))


def test_a_subclass_of_a_supported_mode_must_declare_its_own_support():
    from dnet_fast.meta import ExactMode
    from tests.helpers import TinyNet, meta_config

    class Variant(ExactMode):
        pass

    model = TinyNet().double()
    meta = Variant(meta_config("exact"), model, worker.CrossEntropy(), torch.optim.SGD(model.parameters(), lr=0.1), 5)
    with pytest.raises(ValueError, match="does not declare torchrun support"):
        meta.use_collective(Collective(rank=0, world_size=2, group=object()))


def test_sync_bn_is_refused_where_it_cannot_work():
    from dnet_fast.models import build_model

    fake = Collective(rank=0, world_size=2, group=object())
    cfg = load_config(None, ["model.backbone=resnet20", "model.width=4", "model.sync_bn=true", "meta.mode=driver"])
    model = build_model(cfg.model, 5)
    with pytest.raises(ValueError, match="SyncBatchNorm runs on GPUs only"):
        distributed.prepare_model(model, cfg, fake)
    assert distributed.prepare_model(model, cfg, LOCAL) is model  # one process: nothing to synchronise


def test_rank_meta_batches_never_overlap_and_cover_the_stream():
    labels = np.repeat(np.arange(10), 6)
    sampler = MetaBatchSampler(labels, 10, seed=3)
    world, m = 4, 5
    for step in range(3):
        ranks = [Collective(rank=r, world_size=world, group=object()) for r in range(world)]
        batches = [sampler.batch(c.stream_index(step), m) for c in ranks]
        union = np.concatenate(batches)
        assert len(set(union.tolist())) == world * m  # no sample drawn twice within an iteration
        np.testing.assert_array_equal(union, sampler.batches(step * world, world, m).ravel())


@pytest.mark.parametrize("kind", ["uniform", "class_aware", "sqrt"])
def test_rank_shards_of_an_epoch_make_the_single_process_batches(kind):
    from dnet_fast.sampling import epoch_order

    labels = np.repeat(np.arange(5), [40, 20, 10, 6, 4])
    one = epoch_order(labels, kind, seed=3, epoch=2)
    world, b = 4, 5
    shards = [epoch_order(labels, kind, seed=3, epoch=2, rank=r, world_size=world) for r in range(world)]
    for k in range(len(labels) // (world * b)):
        union = np.concatenate([shard[k * b : (k + 1) * b] for shard in shards])
        np.testing.assert_array_equal(np.sort(union), np.sort(one[k * world * b : (k + 1) * world * b]))


def test_single_process_fit_writes_no_distributed_file(tiny_overrides, tmp_path):
    assert not distributed.launched()
    fit(load_config(None, [*tiny_overrides, "meta.mode=off", "optim.epochs=1"]), stop_after=1)
    assert not (tmp_path / "run" / "distributed.json").exists()


@pytest.mark.slow
def test_distributed_benchmark_quick_smoke(tmp_path):
    from benchmarks import runner

    quick = ["--quick", "--cpu", "--threads", "1", "--repeats", "1", "--warmup", "0"]
    assert runner.main([*quick, "--only", "distributed", "--out", str(tmp_path)]) == 0
    (point,) = json.loads((tmp_path / "results.json").read_text())["benchmarks"][0]["points"]
    assert "error" not in point, point.get("error")
    assert set(point["variants"]) == {"off", "off_ddp_w1", "off_ddp_w2", "exact", "exact_ddp_w1", "exact_ddp_w2"}
    assert point["variants"]["exact_ddp_w2"]["metrics"]["world_size"] == 2


@pytest.fixture
def gloo_world1():
    """A Gloo group of one rank in this process, made by ``init_from_env`` from torchrun's variables."""
    with world_of_one(torch.device("cpu"), 60) as collective:
        yield collective


@pytest.mark.parametrize(("mode", "grad"), [("off", "jvp"), ("driver", "jvp"), ("exact", "jvp"),
                                            ("exact", "double_backward")])
def test_ddp_world1_stack_equals_the_single_process_stack_bit_for_bit(gloo_world1, mode, grad):
    """build_stack's torchrun path on one rank (DDP, BatchNorm model): every reduction divides by 1."""
    from dnet_fast.stack import build_stack

    cfg = load_config(None, ["model.backbone=resnet20", "model.width=4", f"meta.mode={mode}", f"meta.grad={grad}",
                             "meta.meta_batch=6", "diffnet.hidden=8", "diffnet.lr=0.01", "optim.lr=0.05"])
    counts = np.array([30, 12, 6, 3, 2])
    stacks = [build_stack(cfg, counts, "cpu", collective=c) for c in (LOCAL, gloo_world1)]
    assert isinstance(stacks[1].meta.forward, torch.nn.parallel.DistributedDataParallel)
    g = torch.Generator().manual_seed(5)
    for _ in range(3):
        x, y = torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 5, (8,), generator=g)
        mb = torch.randn(6, 3, 8, 8, generator=g), torch.arange(6) % 5
        for stack in stacks:
            stack.meta.set_class_accuracy(torch.tensor([0.9, 0.5, 0.4, 0.2, 0.1]))
            stack.step.step(x, y, mb)
    a, b = (dict(flatten_state(s.meta.state_dict())) for s in stacks)
    for key, value in a.items():
        assert torch.equal(value, b[key]) if isinstance(value, torch.Tensor) else value == b[key], key
