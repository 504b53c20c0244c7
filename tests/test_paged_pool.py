"""The paged KV pool of a torch target (runners/torch_pool.py) on tiny random models: fused rows equal rows
decoded alone bit for bit, rollback, block accounting, speculative decoding through the stepper, the
scheduler on a torch target, and the models it refuses."""

import threading

import numpy as np
import pytest

from tests.fused import run_together
from tests.prompts import PROMPTS
from tests.toy import ByteTokenizer, tiny_llama
from verispec.drafters.ngram import NgramDrafter
from verispec.engine import Engine, SpeculativeConfig, Stats
from verispec.errors import InvalidParameter
from verispec.runners.torch import TorchRunner
from verispec.sampling import SamplingParams
from verispec.runners.pool import PoolUnsupported
from verispec.runners.torch_pool import BLOCK, PagedPool
from verispec.runners.pool import PoolFull


def tiny_qwen2(seed: int = 0, **config):
    """A random Qwen2ForCausalLM (attention biases; with use_sliding_window=True, sliding layers)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         attn_implementation="sdpa", **config)
    return Qwen2ForCausalLM(config).float().eval()


def tiny_gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
                              max_position_embeddings=512, attn_implementation="sdpa")
    return Gemma3ForCausalLM(config).float().eval()


def _runner(model, name: str = "tiny") -> TorchRunner:
    return TorchRunner(model, ByteTokenizer(), name, n_ctx=512)


@pytest.fixture(scope="module")
def runner():
    return _runner(tiny_llama(0, scale=30))


def _prefill(pool, seq: int, tokens: list[int]) -> None:
    pool.decode([seq] * len(tokens), tokens, [False] * (len(tokens) - 1) + [True])


def _orders(a: list[int], b: list[int]) -> dict[str, list[tuple[int, int]]]:
    """Rows (seq, token) of sequences 0 and 1 in one decode: one after the other, and interleaved."""
    rows_a, rows_b = [(0, t) for t in a], [(1, t) for t in b]
    mixed = [row for pair in zip(rows_a, rows_b) for row in pair] + rows_a[len(b) :] + rows_b[len(a) :]
    return {"a then b": rows_a + rows_b, "b then a": rows_b + rows_a, "interleaved": mixed}


# -- exactness ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_a, n_b", [(1, 1), (1, 3), (2, 5), (4, 4), (5, 2), (7, 10)])
def test_rows_fused_with_another_sequence_equal_rows_decoded_alone(runner, n_a, n_b):
    """Whatever the other sequence's rows and the padding (totals 2..17 rows), each sequence's logits
    are bit-identical to its rows decoded alone; wanting only some rows changes none of them."""
    pool = PagedPool(runner, 256, 2)
    prompts = [runner.tokenizer.encode(PROMPTS[0])[:21], runner.tokenizer.encode(PROMPTS[7])[:13]]
    rows = [[5 + i for i in range(n_a)], [40 + i for i in range(n_b)]]
    for seq, prompt in enumerate(prompts):
        _prefill(pool, seq, prompt)
    alone = []
    for seq in (0, 1):
        alone.append(pool.decode([seq] * len(rows[seq]), rows[seq], [True] * len(rows[seq])).copy())
        pool.drop(seq, len(prompts[seq]))
    for name, order in _orders(*rows).items():
        seqs, tokens = [s for s, _ in order], [t for _, t in order]
        for want in ([True] * len(order), [i % 2 == 0 for i in range(len(order))]):
            out = pool.decode(seqs, tokens, want)
            kept = [s for s, w in zip(seqs, want) if w]  # the sequence of each returned row
            for seq in (0, 1):
                mine = out[[i for i, s in enumerate(kept) if s == seq]]
                expected = alone[seq][[w for s, w in zip(seqs, want) if s == seq]]
                assert np.array_equal(mine, expected), f"{name}, seq {seq}: differs by {np.abs(mine - expected).max()}"
                pool.drop(seq, len(prompts[seq]))
    assert pool.padded > 0 and pool.compactions == 0


@pytest.mark.parametrize("make", [lambda: tiny_llama(0, scale=30), lambda: tiny_qwen2(0)], ids=["llama", "qwen2"])
def test_pool_logits_match_the_solo_runner(make):
    """Scattered blocks (two sequences growing in turn), GQA, positions: the pool computes the model the
    solo runner computes (to float rounding: the solo runner's row counts are not padded)."""
    solo = _runner(make())
    prompt = solo.tokenizer.encode(PROMPTS[3])[:40]
    expected = np.concatenate([solo.forward(prompt[:23]), solo.forward(prompt[23:26]), solo.forward(prompt[26:])])
    pool = PagedPool(solo, 256, 2)
    _prefill(pool, 1, [7, 8, 9])
    got = [pool.decode([0] * 23, prompt[:23], [True] * 23).copy()]
    _prefill(pool, 1, list(range(10, 40)))  # sequence 1 takes the next blocks: sequence 0's are not contiguous
    mixed = [(0, prompt[23]), (1, 5), (0, prompt[24]), (1, 6), (0, prompt[25])]
    got.append(pool.decode([s for s, _ in mixed], [t for _, t in mixed], [s == 0 for s, _ in mixed]))
    got.append(pool.decode([0] * 14, prompt[26:], [True] * 14))
    got = np.concatenate(got)
    assert pool._tables == [[1, 2, 5], [0, 3, 4]]  # lowest free block first
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    assert (got.argmax(1) == expected.argmax(1)).all()
    solo.reset()
    assert np.array_equal(solo.forward(prompt[:23]), expected[:23])  # the module's own attention is back


def test_rollback_redecode_and_blocks_follow_live_tokens(runner):
    pool = PagedPool(runner, 4 * BLOCK, 2)

    def in_blocks() -> int:
        return sum(-(-n // BLOCK) * BLOCK for n in pool.live)

    prompt = runner.tokenizer.encode(PROMPTS[5])[:12]
    _prefill(pool, 0, prompt)
    verify = [40, 41, 42, 43, 44, 45]
    first = pool.decode([0] * 6, verify, [True] * 6).copy()
    assert pool.live[0] == 18 and pool.used_cells() == 2 * BLOCK == in_blocks()
    pool.drop(0, 12)  # a rejected draft: a position change, and the second block goes back
    assert pool.live[0] == 12 and pool.used_cells() == BLOCK == in_blocks()
    pool.decode([0, 0], [50, 51], [True, True])  # other tokens in the cells, rolled back in turn
    pool.drop(0, 12)
    assert np.array_equal(pool.decode([0] * 6, verify, [True] * 6), first)
    _prefill(pool, 1, list(range(3, 3 + 30)))
    assert pool.used_cells() == 4 * BLOCK == in_blocks()
    with pytest.raises(PoolFull):
        pool.decode([0] * 15, list(range(60, 75)), [True] * 15)  # sequence 0 would need a third block
    assert pool.live[0] == 18 and pool.used_cells() == 4 * BLOCK  # nothing changed
    pool.release(1)
    assert pool.used_cells() == 2 * BLOCK == in_blocks()
    pool.release(0)
    assert pool.used_cells() == 0 and sorted(pool._free) == list(range(4))


def test_reservations_take_whole_blocks(runner):
    pool = PagedPool(runner, 4 * BLOCK, 2)
    assert pool.reserve(0, BLOCK + 1)  # two blocks
    assert pool.free_cells() == 2 * BLOCK
    assert not pool.reserve(1, 2 * BLOCK + 1)
    assert pool.reserve(1, 2 * BLOCK)
    assert pool.reserve(0, BLOCK)  # shrinking one's own reservation always fits
    pool.release(0)
    assert pool.free_cells() == 2 * BLOCK


def test_a_preempted_sequence_is_swapped_out_and_back_and_its_logits_do_not_change(runner):
    """Preemption frees a sequence's blocks (another sequence then writes into them) and resume writes its
    keys and values back into other blocks, sharing its cached prompt prefix: its next rows' logits equal
    those of a sequence never preempted, bit for bit."""
    prompt, after = list(range(3, 43)), [60, 61, 62]

    def run(preempt: bool) -> np.ndarray:
        pool = PagedPool(runner, 5 * BLOCK, 2, prefix_entries=1)
        _prefill(pool, 0, prompt)
        pool.remember_prompt(0, prompt)
        pool.decode([0] * 8, list(range(44, 52)), [True] * 8)  # 48 cells: 3 blocks
        if preempt:
            saved = pool.preempt(0)
            assert (saved.held, saved.prompt_len, pool.live[0], pool.reserved[0]) == (48, 40, 0, 0)
            assert pool.cached_cells() == 32  # the prompt's 2 whole blocks stay cached, the third is free
            _prefill(pool, 1, list(range(100, 164)))  # 4 blocks: the freed one and the cache's are overwritten
            assert pool.prefixes.evictions == 1
            pool.release(1)
            _prefill(pool, 1, list(range(3, 20)))  # another prompt in the lowest blocks
            pool.resume(0, saved)
            assert pool.live[0] == 48 and pool.swapped_out == 48
            assert pool._tables[0][0] != 0  # its cells now lie elsewhere
            pool.release(1)
        return pool.decode([0] * 3, after, [True] * 3).copy()

    assert np.array_equal(run(preempt=True), run(preempt=False))


def test_resume_shares_the_cached_prompt_prefix_back(runner):
    pool = PagedPool(runner, 8 * BLOCK, 1, prefix_entries=1)
    prompt = list(range(3, 43))
    _prefill(pool, 0, prompt)
    pool.remember_prompt(0, prompt)
    before = pool.decode([0, 0], [44, 45], [True, True]).copy()
    pool.drop(0, 40)
    saved = pool.preempt(0)
    pool.resume(0, saved)
    assert pool.prefixes.hits == 1 and pool.used_cells() == 3 * BLOCK  # 2 blocks shared back, 1 written
    assert np.array_equal(pool.decode([0, 0], [44, 45], [True, True]), before)


# -- through the stepper and the scheduler --------------------------------------------------------------


def test_speculative_through_the_stepper_equals_plain_greedy(runner):
    """Plain and n-gram speculative greedy requests on one pool, fused: the same tokens, and the same
    as the solo runner's plain greedy."""
    from verispec.runners.pool import SequenceView

    pool = PagedPool(runner, 512, 3)
    assert pool.fuse_rows == pool.n_batch  # the torch pool's default: all of a step's rows in one decode
    params = SamplingParams(max_tokens=48, ignore_eos=True)
    prompt = runner.tokenizer.encode("abc abc abc abc")
    specs = [(None, SpeculativeConfig()), (NgramDrafter(), SpeculativeConfig(draft="ngram", draft_tokens=4)),
             (NgramDrafter(), SpeculativeConfig(draft="ngram", draft_tokens=2))]
    stats = [Stats() for _ in specs]
    for seq in range(3):
        assert pool.reserve(seq, 128)
    outs = run_together(pool, {seq: Engine(SequenceView(pool, seq, 512), *specs[seq]).steps(prompt, params, stats[seq])
                               for seq in range(3)})
    runner.reset()
    solo = [t for new in Engine(runner).generate(prompt, params) for t in new]
    assert outs[0] == solo
    assert outs[1] == solo and outs[2] == solo
    assert stats[1].accepted > 0 and stats[2].accepted > 0
    assert max(pool.pass_seconds) > 5  # rows of several requests went into one decode


def _collect(scheduler, jobs) -> list[str]:
    """Submit the jobs at once; the text each one streamed, once all are done."""
    done = [threading.Event() for _ in jobs]
    texts = [[] for _ in jobs]
    for i, job in enumerate(jobs):
        def sink(event, i=i):
            if event.kind == "text":
                texts[i].append(event.text)
            elif event.kind == "error":
                texts[i].append(f"<error {event.error}>")
            if event.kind in ("done", "error"):
                done[i].set()
        job.sink = sink
    for job in jobs:
        scheduler.submit(job)
    for event in done:
        assert event.wait(120)
    return ["".join(t) for t in texts]


def test_pooled_scheduler_on_a_torch_target_equals_alone(runner):
    """Concurrent greedy requests (plain and pinned n-gram drafting) on the scheduler's pool of a torch
    target: each streams the text it streams alone, which is the solo runner's text."""
    from verispec.runners.torch_pool import PagedPool as Pool
    from verispec.serve.scheduler import Scheduler
    from verispec.serve.scheduler import Sequence as Job

    params = SamplingParams(max_tokens=40, ignore_eos=True)
    prompts = [runner.tokenizer.encode(p) for p in (PROMPTS[0], "abc abc abc abc", PROMPTS[7], PROMPTS[12])]
    specs = [(None, SpeculativeConfig()), ("ngram", SpeculativeConfig(draft="ngram", draft_tokens=3)),
             ("ngram", SpeculativeConfig(draft="ngram", draft_tokens=2)), (None, SpeculativeConfig())]

    def jobs():
        return [Job(tokens=p, params=params, spec=spec, draft=draft, pinned=True)
                for p, (draft, spec) in zip(prompts, specs)]

    scheduler = Scheduler(runner, SpeculativeConfig(), None, max_batch=4, n_ctx=256)
    try:
        assert isinstance(scheduler.pool, Pool) and scheduler.pool.fuse_rows == scheduler.pool.n_batch
        alone = [_collect(scheduler, [job])[0] for job in jobs()]
        together = _collect(scheduler, jobs())
        assert max(scheduler.pool.pass_seconds) > 4  # more rows in one decode than any request sends
        assert sum(scheduler.pool.live) == 0 and scheduler.pool.used_cells() == scheduler.pool.cached_cells()  # released
        assert scheduler.pool.prefixes.hits > 0  # the second run of a prompt shares the first one's blocks
    finally:
        scheduler.close()
    assert together == alone
    for prompt, text in zip(prompts, alone):
        runner.reset()
        solo = [t for new in Engine(runner).generate(prompt, params) for t in new]
        assert text == runner.tokenizer.decode(solo)


def test_requests_preempted_on_a_torch_target_resume_and_write_what_they_write_alone(runner, monkeypatch):
    """KV on demand on the paged pool: three requests fit a 256-cell pool at admission but not at their peak,
    so the newest is preempted (swapped out) and resumed; each streams what it streams alone, drafting
    (n-gram, K pinned) or not, and nothing stays reserved."""
    from verispec.serve import scheduler as scheduling
    from verispec.serve.scheduler import Scheduler
    from verispec.serve.scheduler import Sequence as Job

    monkeypatch.setattr(scheduling, "RESERVE_AHEAD", 16)  # grow (and run out) sooner
    params = SamplingParams(max_tokens=90, ignore_eos=True)
    prompts = [runner.tokenizer.encode(p)[:40] for p in (PROMPTS[0], "abc abc abc abc " * 3, PROMPTS[7])]
    specs = [(None, SpeculativeConfig()), ("ngram", SpeculativeConfig(draft="ngram", draft_tokens=3)), (None, SpeculativeConfig())]

    def jobs():
        return [Job(tokens=p, params=params, spec=spec, draft=draft, pinned=True)
                for p, (draft, spec) in zip(prompts, specs)]

    scheduler = Scheduler(runner, SpeculativeConfig(), None, max_batch=3, n_ctx=256, pool_cells=256)
    try:
        assert scheduler.pool.preemptible
        alone = [_collect(scheduler, [job])[0] for job in jobs()]
        assert scheduler.metrics.preemptions._value.get() == 0
        together = _collect(scheduler, jobs())
        assert scheduler.metrics.preemptions._value.get() > 0 and scheduler.pool.swapped_out > 0
        assert sum(scheduler.pool.reserved) == 0 and sum(scheduler.pool.live) == 0
    finally:
        scheduler.close()
    assert together == alone


def test_the_memory_check_counts_the_worst_case_of_swapped_out_cells_on_the_cpu(runner):
    """Preemption copies a request's cells out into the same RAM: at worst every slot but one, each holding a whole
    context. The check counts that, says so when it does not fit, and what it suggests fits."""
    from verispec.serve.memory import InsufficientMemory, check, plan_server

    plan = plan_server(runner, None, 4, 256, pool=1024)
    swapped = {name: size for name, size in plan.parts().items() if "swapped" in name}
    assert list(swapped.values()) == [3 * 256 * runner.kv_bytes_per_token()]
    assert plan.needed() == 1024 * runner.kv_bytes_per_token() + 3 * 256 * runner.kv_bytes_per_token()
    with pytest.raises(InsufficientMemory, match="swapped KV") as err:
        check(plan, plan.needed() - 1)
    slots = int(str(err.value).split("--max-batch ")[2].split()[0])  # "What would fit: --max-batch N at --ctx 256"
    check(plan.with_(slots=slots), plan.needed() - 1)


def test_torch_requests_preempted_over_http_resume_and_write_what_they_write_alone(runner, monkeypatch):
    """The same through the real server and the `openai` client: the paged pool swaps the newest request's cells
    out and back, and each request, drafting (n-gram, K pinned) or not, writes exactly what it writes alone."""
    from concurrent.futures import ThreadPoolExecutor

    from tests.test_server import _serving
    from verispec.api import Model
    from verispec.serve import ServeConfig
    from verispec.serve import scheduler as scheduling

    monkeypatch.setattr(scheduling, "RESERVE_AHEAD", 16)  # grow (and run out) sooner
    prompts = [PROMPTS[0][:40], "abc abc abc abc " * 3, PROMPTS[7][:40]]
    drafts = [{"draft": "none"}, {"draft": "ngram", "draft_tokens": 3}, {"draft": "none"}]
    with _serving(Model(runner, "torch"), ServeConfig(model="tiny", max_batch=3, ctx=256, kv_pool=256,
                                                       api_key="k")) as server:
        client = server.client("k")

        def complete(i: int) -> tuple[str, int, int]:
            out = client.completions.create(model="tiny", prompt=prompts[i], max_tokens=90, temperature=0,
                                            extra_body={"speculative": drafts[i]})
            return out.choices[0].text, out.usage.completion_tokens, out.model_extra["speculative"]["drafted"]

        alone = [complete(i) for i in range(3)]
        assert server.metric("verispec_preemptions_total") == 0
        with ThreadPoolExecutor(3) as pool:
            together = list(pool.map(complete, range(3)))
        assert server.metric("verispec_preemptions_total") > 0 and server.server.scheduler.pool.swapped_out > 0
        assert server.wait_idle()["active"] == 0 and sum(server.server.scheduler.pool.reserved) == 0
    assert together == alone
    assert together[1][2] > 0  # pinned K drafts


@pytest.mark.real
def test_smollm2_fused_rows_equal_alone_and_match_the_solo_runner(smol_torch):
    """The same on a real model (SmolLM2-135M, 30 layers, GQA 9/3): bit-identical fused rows, solo-close logits."""
    prompts = [smol_torch.tokenizer.encode(PROMPTS[i]) for i in (0, 9)]
    smol_torch.reset()
    expected = smol_torch.forward(prompts[0])
    pool = PagedPool(smol_torch, 512, 2)
    try:
        got = pool.decode([0] * len(prompts[0]), prompts[0], [True] * len(prompts[0])).copy()
        _prefill(pool, 1, prompts[1])
        alone = pool.decode([0, 0, 0], [11, 22, 33], [True] * 3).copy()
        pool.drop(0, len(prompts[0]))
        fused = pool.decode([1, 0, 0, 0, 1], [44, 11, 22, 33, 55], [True] * 5)
    finally:
        pool.close()
    np.testing.assert_allclose(got, expected, atol=2e-3, rtol=0)
    assert (got.argmax(1) == expected.argmax(1)).mean() > 0.95  # near-ties may flip
    assert np.array_equal(fused[1:4], alone)


# -- refusals and memory ----------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [lambda: tiny_qwen2(0, use_sliding_window=True, sliding_window=8, max_window_layers=0),
                                  tiny_gemma3], ids=["qwen2-sliding", "gemma3"])
def test_sliding_window_models_are_refused(make):
    from verispec.api import Model
    from verispec.serve import ServeConfig
    from verispec.serve.app import _scheduler
    from verispec.serve.metrics import Metrics
    from verispec.runners.context_pool import ContextPool

    runner = _runner(make(), "sliding")
    with pytest.raises(InvalidParameter, match="sliding"):
        PagedPool(runner, 256, 2)
    base = Model(target=runner, backend="torch")
    with pytest.raises(PoolUnsupported, match="--kv-pool 0"):
        _scheduler(base, ServeConfig(model="sliding", max_batch=1, ctx=256, kv_pool=256), Metrics())
    fallback = _scheduler(base, ServeConfig(model="sliding", max_batch=1, ctx=256), Metrics())
    try:
        assert isinstance(fallback.pool, ContextPool)  # per-slot contexts, as with --kv-pool 0
    finally:
        fallback.close()


def test_pool_memory_is_checked_before_it_is_allocated(runner, monkeypatch):
    from verispec.serve.memory import InsufficientMemory

    per_token = 2 * 2 * 16 * 2 * 4  # tiny_llama: 2 layers x 2 KV heads x 16 dims x K+V x fp32
    monkeypatch.setenv("VERISPEC_MEMORY_AVAILABLE", str(1000 * per_token))
    with pytest.raises(InsufficientMemory, match=r"--kv-pool 4096 needs .* What would fit: --kv-pool 768"):
        PagedPool(runner, 4096, 2)
    PagedPool(runner, 768, 2).close()


def test_on_a_gpu_the_gpus_free_memory_is_what_counts(monkeypatch):
    """A model on CUDA puts its caches in GPU memory: the check reads torch.cuda.mem_get_info, not host RAM."""
    import torch

    from verispec.serve import memory

    monkeypatch.delenv("VERISPEC_MEMORY_AVAILABLE", raising=False)
    asked = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: asked.append(device) or (3 * memory.GiB, 80 * memory.GiB))
    assert memory.available_bytes("cuda:0") == 3 * memory.GiB and asked == [torch.device("cuda:0")]
    assert memory.available_bytes("cpu") != 3 * memory.GiB and len(asked) == 1  # host RAM for the CPU


@pytest.mark.parametrize("kv_pool", [True, False], ids=["pool", "per-slot"])
def test_a_torch_draft_models_cache_is_counted_before_the_server_starts(runner, monkeypatch, kv_pool):
    """A torch draft keeps a cache per slot beside the target's pool (or beside each slot's context):
    the start-up check counts it, so a server that fits the target alone but not the draft is refused."""
    from verispec.drafters.draft_model import ModelDrafter
    from verispec.serve.memory import InsufficientMemory
    from verispec.serve.scheduler import Scheduler

    per_token = 2 * 2 * 16 * 2 * 4  # tiny_llama: 2 layers x 2 KV heads x 16 dims x K+V x fp32
    draft = ModelDrafter(_runner(tiny_llama(1), "tiny-draft"))
    spec = SpeculativeConfig(draft="tiny-draft")

    def make():
        return Scheduler(runner, spec, draft, max_batch=2, n_ctx=256, pool_cells=None if kv_pool else 0)
    target_alone = 2 * 256 * per_token  # a 512-cell pool, or 2 contexts of 256
    target_alone += 256 * per_token if kv_pool else 0  # and the pool's swapped-out cells at worst: 1 slot's context
    monkeypatch.setenv("VERISPEC_MEMORY_AVAILABLE", str(target_alone + per_token * 256))
    with pytest.raises(InsufficientMemory, match=r"draft KV \(2 x 256 tokens x 0\.5 KiB\) 0 MiB") as err:
        make()
    assert "What would fit: --max-batch 1" in str(err.value)
    monkeypatch.setenv("VERISPEC_MEMORY_AVAILABLE", str(target_alone + 2 * 256 * per_token))
    make().close()


def test_a_cached_prompt_prefix_shares_whole_blocks_and_changes_no_logit(runner):
    """A prompt that starts like an earlier request's shares that request's whole blocks: its logits (prompt
    and decode rows) equal those of a pool without a cache; a rollback into a shared block copies the block
    first (the cached prefix stays intact); a pool short of blocks evicts the cache instead of refusing."""
    from verispec.engine import Forward

    first, second, other = list(range(3, 43)), list(range(3, 43)) + list(range(50, 70)), list(range(70, 122))

    def request(pool, prompt) -> np.ndarray:
        out = []

        def passes():
            for forward in [Forward(prompt, all_logits=False)] + [Forward([t]) for t in (5, 6, 7)]:
                out.append(np.array((yield forward)))

        assert pool.reserve(0, len(prompt) + 8)
        run_together(pool, {0: passes()})
        pool.release(0)
        return np.concatenate(out)

    cold = request(PagedPool(runner, 256, 1), second)
    pool = PagedPool(runner, 256, 1, prefix_entries=1)
    request(pool, first)
    assert len(pool.prefixes) == 1 and pool.cached_cells() == 32  # 40 prompt tokens: 2 whole blocks
    hit = request(pool, second)
    assert (pool.prefixes.hits, pool.prefixes.tokens_saved) == (1, 32) and pool.cached_cells() == 48  # replaced
    assert pool.reserve(0, 80) and pool.adopt_prefix(0, second) == 48
    pool.drop(0, 20)  # into the second shared block: copied before the sequence writes into it
    pool.release(0)
    again = request(pool, second)
    assert pool.prefixes.hits == 3
    for warm in (hit, again):
        assert np.array_equal(cold, warm), f"differs by {np.abs(cold - warm).max()}"
    small = PagedPool(runner, 64, 1, prefix_entries=1)
    request(small, first)
    request(small, other)  # 52 + 3 tokens need all 4 blocks: the cached prefix goes
    assert small.prefixes.evictions == 1 and small.used_cells() == small.cached_cells()
