"""The shared KV pool, fused verification, the goodput planner and the start-up memory check,
on SmolLM2-135M (llama.cpp). Exactness is checked bit for bit against solo runs."""

import threading

import numpy as np
import pytest

from tests.prompts import PROMPTS
from verispec.engine import Engine, SpeculativeConfig, Stats
from verispec.sampling import SamplingParams

pytestmark = pytest.mark.real

MODEL = "smollm2-135m"


@pytest.fixture(scope="module")
def smol(smol_source):
    import verispec

    model = verispec.load(MODEL, n_ctx=1024, n_threads=2)
    yield model
    model.close()


def _pool(smol, cells: int, seqs: int, fuse_rows: int = 3, prefill_chunk: int | None = None):
    from verispec.serve.fuser import Fuser
    from verispec.serve.pool import KvPool

    pool = KvPool(smol.target, cells, seqs)
    return pool, Fuser(pool, fuse_rows, prefill_chunk)


def _drive(fuser, jobs) -> None:
    """Run each job (a function of nothing) in its own thread while this thread ticks the fuser."""
    errors = []

    def wrap(seq, job):
        try:
            job()
        except BaseException as exc:  # surfaced below
            errors.append(exc)
        finally:
            fuser.detach(seq)

    threads = []
    for seq, job in enumerate(jobs):
        fuser.attach(seq)
        threads.append(threading.Thread(target=wrap, args=(seq, job)))
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        fuser.tick(0.01)
    if errors:
        raise errors[0]


# -- exactness ---------------------------------------------------------------------------------------


def test_rows_of_different_requests_in_one_decode_equal_solo_rows(smol):
    """A 3-row decode holding rows of three sequences gives each row the logits of a solo pass, bit for bit."""
    runner = smol.target
    prompts = [smol.prompt_tokens(p) for p in PROMPTS[:3]]
    nexts = [11, 22, 33]
    solo = []
    for prompt, tok in zip(prompts, nexts):
        runner.reset()
        runner.forward(prompt, all_logits=False)
        solo.append(runner.forward([tok]).copy())
    pool, _ = _pool(smol, 1024, 3)
    try:
        for seq, prompt in enumerate(prompts):
            pool.reserve(seq, 512)
            pool.decode([seq] * len(prompt), prompt, [False] * (len(prompt) - 1) + [True])
        fused = pool.decode([0, 1, 2], nexts, [True, True, True]).copy()
    finally:
        pool.close()
    for i in range(3):
        assert np.array_equal(fused[i], solo[i][0]), f"row {i} differs by {np.abs(fused[i] - solo[i][0]).max()}"


def test_concurrent_speculative_requests_equal_solo_through_compactions(smol):
    """Plain and n-gram speculative requests (several K) fused on a pool too small to hold all their
    cells without compaction (sequence 3 serves three requests in a row, the others hold theirs): each
    greedy output equals its solo plain output, through compactions and padded one-row decodes."""
    from verispec.drafters.ngram import NgramDrafter
    from verispec.serve.pool import SeqRunner

    params = SamplingParams(max_tokens=64)
    texts = [[PROMPTS[2]], [PROMPTS[0] * 6], [PROMPTS[4]], [PROMPTS[7], PROMPTS[8], PROMPTS[9]]]
    prompts = [[smol.prompt_tokens(t) for t in seq_texts] for seq_texts in texts]
    ks = [0, 3, 2, 0]
    solo = [[[t for new in Engine(smol.target).generate(p, params) for t in new] for p in ps] for ps in prompts]
    pool, fuser = _pool(smol, 512, 4)
    outs: list = [[] for _ in range(4)]

    def job(seq: int):
        def run():
            runner = SeqRunner(pool, seq, fuser, 1024)
            for prompt in prompts[seq]:
                assert pool.reserve(seq, max(len(p) for p in prompts[seq]) + 72)
                drafter = NgramDrafter() if ks[seq] else None
                spec = SpeculativeConfig(draft="ngram" if ks[seq] else None, draft_tokens=ks[seq])
                outs[seq].append([t for new in Engine(runner, drafter, spec).generate(prompt, params) for t in new])
                with pool.lock:
                    pool.drop(seq, 0)
        return run

    try:
        _drive(fuser, [job(i) for i in range(4)])
        assert pool.compactions > 0 and pool.padded > 0  # both exactness mechanisms were exercised
        assert max(fuser.pass_seconds) <= 3  # never more than 3 rows per decode
    finally:
        pool.close()
    assert outs == solo


def test_chunked_prefill_lets_others_decode(smol):
    """A long prompt prefilled in 32-token chunks: a short request decodes several tokens meanwhile."""
    pool, fuser = _pool(smol, 2048, 2, prefill_chunk=32)
    long_prompt = smol.prompt_tokens(PROMPTS[0] * 12)
    assert len(long_prompt) > 6 * 32
    events = []

    def long_job():
        pool.reserve(0, 1024)
        fuser.run(0, long_prompt, all_logits=False)
        events.append("long prefilled")

    def short_job():
        pool.reserve(1, 1024)
        fuser.run(1, smol.prompt_tokens(PROMPTS[1]), all_logits=False)
        for tok in (5, 6, 7, 8):
            fuser.run(1, [tok], all_logits=True)
            events.append("short step")

    try:
        _drive(fuser, [long_job, short_job])
    finally:
        pool.close()
    assert events.index("long prefilled") >= 3, events


# -- goodput planner ------------------------------------------------------------------------------------


def _stats(drafted: int, accepted: int, steps: int = 20) -> Stats:
    stats = Stats()
    for _ in range(steps):
        stats.record_step(drafted, accepted, 0.0, 0.0)
    return stats


def test_goodput_planner_drafts_alone_and_stops_when_the_batch_is_full():
    from verispec.serve.goodput import Candidate, GoodputPolicy

    policy = GoodputPolicy(fuse_rows=3)
    policy.pass_seconds.update({1: 0.010, 2: 0.0125, 3: 0.015})
    good = lambda: Candidate(_stats(3, 3), k_max=8, fixed=False)  # noqa: E731 - always accepted
    alone = policy.plan([good()])
    assert 1 <= alone[0] <= 2  # rows 2 and 3 ride in the same decode almost for free
    assert policy.predicted > 1 / 0.010
    assert policy.plan([good() for _ in range(6)]) == [0] * 6  # chunks full of plain rows: drafting cannot pay
    bad = Candidate(_stats(3, 0), k_max=8, fixed=False)
    assert policy.plan([bad]) == [0]
    plain = Candidate(Stats(), k_max=0, fixed=False)
    pinned = Candidate(_stats(4, 4), k_max=4, fixed=True)
    assert policy.plan([plain, pinned]) == [0, 4]  # a pinned K is planned as it is


# -- memory check --------------------------------------------------------------------------------------


def test_kv_bytes_per_token_equals_llama_cpp_kv_buffer(smol):
    from verispec.runners.llamacpp import context_buffers, kv_bytes_per_token

    per_token = kv_bytes_per_token(smol.target)
    assert per_token == 30 * 3 * (64 + 64) * 2  # SmolLM2-135M: 30 layers, 3 KV heads of 64, f16 K and V
    assert context_buffers(smol.target, 1024)["KV"] * (1 << 20) == per_token * 1024


def test_memory_check_counts_the_draft_and_says_what_fits(smol_source):
    import verispec
    from verispec.serve.memory import GiB, InsufficientMemory, MemoryPlan, check, measure

    base = verispec.load(MODEL, n_ctx=512, draft=MODEL, n_threads=1)
    try:
        target = measure(base.target, 5)
        draft = measure(base.drafter(MODEL).runner, 33)
        plan = MemoryPlan(target, draft, slots=8, ctx=8192)
        with_draft, without = plan.needed(), MemoryPlan(target, None, 8, 8192).needed()
        assert with_draft - without >= 8 * 8192 * draft.kv_per_token  # the draft's KV is counted
        available = with_draft // 3
        with pytest.raises(InsufficientMemory) as err:
            check(plan, available)
        message = str(err.value)
        assert "draft KV" in message and f"{available / GiB:.2f} GiB is available" in message
        slots = int(message.split("--max-batch ")[2].split()[0])  # "... What would fit: --max-batch N at --ctx 8192"
        assert plan.with_(slots=slots).needed() <= available < plan.with_(slots=slots + 1).needed()
        check(plan.with_(slots=slots), available)  # the suggestion passes
        pooled = MemoryPlan(target, None, 8, 8192, pool=8 * 8192)
        assert pooled.needed() < without  # one set of compute buffers instead of eight
    finally:
        base.close()


def test_server_refuses_to_start_when_memory_is_short(smol_source, monkeypatch):
    import verispec
    from verispec.serve import ServeConfig, Server
    from verispec.serve.memory import InsufficientMemory

    monkeypatch.setenv("VERISPEC_MEMORY_AVAILABLE", "200M")
    base = verispec.load(MODEL, n_ctx=512, n_threads=1)
    try:
        for pool in (None, 0):
            with pytest.raises(InsufficientMemory, match="What would fit"):
                Server(base, ServeConfig(model=MODEL, max_batch=16, ctx=8192, kv_pool=pool))
        monkeypatch.setenv("VERISPEC_MEMORY_AVAILABLE", "8G")
        Server(base, ServeConfig(model=MODEL, max_batch=2, ctx=1024)).close()
    finally:
        base.close()
