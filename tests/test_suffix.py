"""The suffix drafter, its index and its global history: lossless drafting, drafts from earlier requests, trees,
the memory bound, persistence, per-key isolation and thread safety. Toy targets (tests/toy.py) only."""

import logging
import threading

import numpy as np
import pytest

from tests.toy import TableRunner
from verispec.drafters.cascade import CascadeDrafter
from verispec.drafters.draft_model import ModelDrafter
from verispec.drafters.suffix import SuffixDrafter
from verispec.drafters.suffix_index import KEY_LENGTHS, SEP, SuffixIndex, continuation_trie
from verispec.drafters.suffix_store import SuffixStore
from verispec.drafters.tree_growth import TreeShape, grow_tree
from verispec.engine import Engine, SpeculativeConfig, Stats
from verispec.errors import InvalidParameter
from verispec.sampling import SamplingParams

VOCAB = 12
WIDE = 200  # a vocabulary whose greedy walks rarely repeat within a request: drafts must come from earlier ones


def run(engine: Engine, prompt: list[int], params: SamplingParams) -> tuple[list[int], Stats]:
    stats = Stats()
    return [t for step in engine.generate(prompt, params, stats) for t in step], stats


def _brute_longest(docs: list[list[int]], pattern: list[int]) -> int:
    flat = [t for d in docs for t in d + [SEP]]
    best = 0
    for end in range(len(flat) - 1):
        if flat[end] == SEP or flat[end + 1] == SEP:
            continue  # an occurrence counts once a token of its document follows it
        m = 0
        while m < min(len(pattern), 32) and end - m >= 0 and flat[end - m] == pattern[-1 - m]:
            m += 1
        best = max(best, m)
    return best if best >= min(KEY_LENGTHS) else 0


@pytest.mark.parametrize("seed", range(30))
def test_the_index_finds_the_longest_match_through_adds_and_evictions(seed):
    rng = np.random.default_rng(seed)
    index, docs = SuffixIndex(), []
    for _ in range(30):
        if docs and rng.random() < 0.4:
            index.evict_oldest()
            docs.pop(0)
        else:
            docs.append(rng.integers(0, 4, rng.integers(0, 60)).tolist())
            index.add_document(docs[-1])
        pattern = rng.integers(0, 4, rng.integers(1, 40))
        match = index.match(pattern)
        assert (match.length if match else 0) == _brute_longest(docs, pattern.tolist())
        if match:
            assert (index.continuations(match.ends, 4)[:, 0] != SEP).all()
    assert [index.document(i).tolist() for i in range(index.documents)] == docs


@pytest.mark.parametrize("seed", range(30))
def test_a_growing_and_cut_context_is_indexed_as_if_built_at_once(seed):
    rng = np.random.default_rng(seed)
    index, context = SuffixIndex(), []
    for _ in range(12):
        if context and rng.random() < 0.4:
            keep = int(rng.integers(0, len(context) + 1))
            index.truncate(keep)
            context = context[:keep]
        new = rng.integers(0, 4, rng.integers(0, 7)).tolist()
        index.extend(new)
        context += new
    rebuilt = SuffixIndex()
    rebuilt.extend(context)
    assert index._ends == rebuilt._ends and index.positions == rebuilt.positions


def test_the_continuation_trie_counts_each_prefix():
    rows = np.array([[1, 2, 3], [1, 2, 4], [1, 5, SEP], [1, 2, 3], [7, SEP, SEP]])
    trie = continuation_trie(rows)
    paths = {}
    for node in range(1, len(trie.tokens)):
        path, n = [], node
        while n > 0:
            path.append(int(trie.tokens[n]))
            n = int(trie.parents[n])
        paths[tuple(path[::-1])] = int(trie.counts[node])
    assert paths == {(1,): 4, (1, 2): 3, (1, 2, 3): 2, (1, 2, 4): 1, (1, 5): 1, (7,): 1}
    assert trie.counts[0] == 5 and all(trie.parents[n] < n for n in range(1, len(trie.tokens)))


# -- drafting ----------------------------------------------------------------------------------------


def _drafters(store: SuffixStore, seed: int) -> dict:
    return {
        "chain": (SuffixDrafter(store), SpeculativeConfig(draft="suffix")),
        "chain k6": (SuffixDrafter(store), SpeculativeConfig(draft="suffix", draft_tokens=6)),
        "branches": (SuffixDrafter(store), SpeculativeConfig(draft="suffix", draft_tokens=5, tree_width=3)),
        "dynamic tree": (SuffixDrafter(store), SpeculativeConfig(draft="suffix", tree="dynamic", tree_budget=12)),
        "cascade": (CascadeDrafter([SuffixDrafter(store), ModelDrafter(TableRunner(VOCAB, seed + 1000, name="m"))], VOCAB),
                    SpeculativeConfig(draft="cascade", draft_tokens=5)),
    }


@pytest.mark.parametrize("seed", range(12))
def test_greedy_suffix_drafting_writes_plain_decodings_tokens_and_drafts(seed):
    target = TableRunner(VOCAB, seed)
    rng = np.random.default_rng(seed)
    params = SamplingParams(max_tokens=60, ignore_eos=True)
    store = SuffixStore()
    for label, (drafter, spec) in _drafters(store, seed).items():
        for _ in range(2):  # the second time, the global history holds the first time's output too
            prompt = rng.integers(0, VOCAB, 16).tolist()
            plain, _ = run(Engine(target), prompt, params)
            out, stats = run(Engine(target, drafter, spec), prompt, params)
            assert out == plain, label
            assert stats.drafted > 0 and stats.accepted > 0, label
            assert all(1 <= n <= d + 1 for n, d in zip(stats.accepted_lengths, stats.draft_lengths)), label


@pytest.mark.parametrize("seed", range(4))
def test_seeded_sampling_with_suffix_drafts_writes_what_plain_sampling_writes(seed):
    target = TableRunner(VOCAB, seed, sharpness=3.0)
    prompt = np.random.default_rng(seed).integers(0, VOCAB, 16).tolist()
    params = SamplingParams(max_tokens=50, temperature=0.8, seed=seed, ignore_eos=True)
    plain, _ = run(Engine(target), prompt, params)
    out, stats = run(Engine(target, SuffixDrafter(SuffixStore()), SpeculativeConfig(draft="suffix", draft_tokens=4)),
                     prompt, params)
    assert out == plain and stats.drafted > 0


def test_a_request_repeating_an_earlier_ones_output_drafts_long_from_the_global_history():
    target = TableRunner(WIDE, 3)
    params = SamplingParams(max_tokens=48, ignore_eos=True)
    spec = SpeculativeConfig(draft="suffix", draft_tokens=16)  # fixed K: the adaptive one learns from timings
    first, second = [5, 17, 42, 99, 7, 3], [150, 120, 7, 3]  # same last two tokens: the same continuation
    store = SuffixStore()
    out_first, cold = run(Engine(target, SuffixDrafter(store), spec), first, params)
    assert store.requests == 1
    out_second, warm = run(Engine(target, SuffixDrafter(store), spec), second, params)
    assert out_second == out_first == run(Engine(target), second, params)[0]
    assert cold.accepted < 5  # nothing repeats within the first request
    assert warm.accepted >= 36 and warm.target_passes <= 10 and max(warm.draft_lengths) >= 8
    _, fresh = run(Engine(target, SuffixDrafter(SuffixStore()), spec), second, params)
    assert fresh.accepted < 5  # the same request with an empty history


def test_tokens_of_one_keys_requests_are_never_drafted_for_another_key():
    secret = [200 + i for i in range(40)]  # tokens no other request contains
    store = SuffixStore()
    prefix = list(range(20, 40))  # 20 tokens matched: drafts of up to 20
    store.add("key-a", prefix + secret)
    context = [1, 2] + prefix
    for k in (4, 16):
        assert SuffixDrafter(store, history="key-b").propose(context, k).tokens == []
        assert SuffixDrafter(store, history="key-a").propose(context, k).tokens == secret[:k]
    drafter = SuffixDrafter(store, history="key-b")
    assert drafter.propose_branches(context, 8, 4) == []
    assert drafter.expand(context, 4).tokens == []
    assert not any(set(b) & set(secret) for b in SuffixDrafter(store, "").propose_branches(context, 8, 4))


# -- trees -------------------------------------------------------------------------------------------


def test_the_speculation_tree_follows_frequencies_and_is_a_chain_when_the_history_agrees():
    store = SuffixStore()
    for tail in ([7, 8, 9], [7, 8, 9], [7, 8, 9], [7, 5, 6], [4, 4, 4]):
        store.add("", [1, 2, 3] + tail)
    drafter = SuffixDrafter(store, min_prob=0.2)
    assert drafter.propose([9, 1, 2, 3], 3).tokens == [7, 8, 9]
    branches = drafter.propose_branches([9, 1, 2, 3], 3, 4)
    assert branches[0] == [7, 8, 9] and sorted(branches[1:]) == [[4, 4, 4], [7, 5, 6]]  # the most frequent first
    assert SuffixDrafter(store, min_prob=0.5).propose_branches([9, 1, 2, 3], 3, 4) == [[7, 8, 9]]  # one path: a chain
    candidates = drafter.expand([9, 1, 2, 3], 4)
    assert candidates.tokens == [7, 4] and np.allclose(candidates.probs, [0.8, 0.2])
    assert drafter.expand([9, 1, 2, 3, 7], 4).tokens == [8, 5]
    tree = grow_tree(drafter, [9, 1, 2, 3], TreeShape.parse("dynamic"), budget=8, expansions=8)
    assert tree.tokens[:4] == [3, 7, 8, 9] and set(tree.tokens[4:]) == {5, 6, 4}


def test_a_short_match_earns_a_short_draft():
    store = SuffixStore()
    store.add("", list(range(20, 60)))
    drafter = SuffixDrafter(store, factor=1.0)
    assert drafter.propose([1, 20, 21], 16).tokens == [22, 23]  # 2 tokens matched: 2 drafted
    assert drafter.propose([1] + list(range(20, 30)), 16).tokens == list(range(30, 40))
    assert SuffixDrafter(store, factor=2.0).propose([1, 20, 21], 16).tokens == [22, 23, 24, 25]


@pytest.mark.parametrize("seed", range(6))
def test_trees_from_the_suffix_history_verify_to_plain_decoding(seed):
    target = TableRunner(VOCAB, seed, sharpness=0.5)  # flat: continuations vary, trees branch
    params = SamplingParams(max_tokens=50, ignore_eos=True)
    store = SuffixStore()
    rng = np.random.default_rng(seed)
    for _ in range(3):
        run(Engine(target, SuffixDrafter(store), SpeculativeConfig(draft="suffix")), rng.integers(0, VOCAB, 8).tolist(),
            params)
    prompt = rng.integers(0, VOCAB, 8).tolist()
    plain, _ = run(Engine(target), prompt, params)
    for spec in (SpeculativeConfig(draft="suffix", tree="dynamic", tree_budget=16),
                 SpeculativeConfig(draft="suffix", tree="static:3,2,2,1", tree_budget=16),
                 SpeculativeConfig(draft="suffix", draft_tokens=6, tree_width=4)):
        out, stats = run(Engine(target, SuffixDrafter(store), spec), prompt, params)
        assert out == plain, spec
        assert stats.drafted > stats.target_passes  # trees: more than one node per pass on average


# -- the global history: memory, persistence, threads -------------------------------------------------


def test_the_memory_limit_holds_and_evicts_the_oldest_requests_first():
    store = SuffixStore(memory_mib=0.25)
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 5000, 300).tolist() for _ in range(400)]
    for doc in docs:
        store.add("", doc)
        assert store.nbytes <= store.limit_bytes
    assert 0 < store.requests < 400 and store.evicted == 400 - store.requests
    drafter = SuffixDrafter(store)
    assert drafter.propose([1] + docs[-1][:10], 4).tokens == docs[-1][10:14]  # the newest are kept
    assert drafter.propose([1] + docs[0][:10], 4).tokens == []  # the oldest are gone


def test_the_memory_estimate_is_close_to_what_python_allocates():
    import tracemalloc

    rng = np.random.default_rng(1)
    docs = [rng.integers(0, 30000, 500).tolist() for _ in range(200)]
    tracemalloc.start()
    index = SuffixIndex()
    for doc in docs:
        index.add_document(doc)
    used = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert 0.8 * used <= index.nbytes <= 1.5 * used


@pytest.mark.parametrize("limit", [0, -1, float("nan")])
def test_a_memory_limit_that_is_not_positive_is_refused(limit):
    with pytest.raises(InvalidParameter, match="> 0 MiB"):
        SuffixStore(memory_mib=limit)


def test_the_history_survives_a_restart(tmp_path):
    path = tmp_path / "suffix.bin"
    store = SuffixStore(path=path, fingerprint="v1", n_vocab=100)
    store.add("a", [1, 2, 3, 4, 5, 6])
    store.add("b", [1, 2, 9, 9, 9])
    store.add("a", [7, 8, 10, 11])
    store.close()
    again = SuffixStore(path=path, fingerprint="v1", n_vocab=100)
    assert again.requests == 3 and again.nbytes == store.nbytes
    assert SuffixDrafter(again, "a").propose([0, 1, 2], 4).tokens == [3, 4]
    assert SuffixDrafter(again, "b").propose([0, 1, 2], 4).tokens == [9, 9]
    assert SuffixDrafter(again, "a").propose([0, 7, 8], 4).tokens == [10, 11]
    again.close()


def _damaged(tmp_path, how: str):
    path = tmp_path / "suffix.bin"
    store = SuffixStore(path=path, fingerprint="v1", n_vocab=100)
    store.add("", list(range(50)))
    store.close()
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        path.write_bytes(bytes(range(256)) * 10)
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "foreign npz":
        np.savez(open(path, "wb"), meta=np.frombuffer(b'{"format": "something else"}', np.uint8))
    elif how == "text":
        path.write_text("hello")
    return path


@pytest.mark.parametrize("how", ["truncated", "garbage", "empty", "foreign npz", "text"])
def test_a_damaged_cache_file_is_reported_in_one_line_and_ignored(tmp_path, caplog, how):
    path = _damaged(tmp_path, how)
    with caplog.at_level(logging.WARNING, logger="verispec.suffix"):
        store = SuffixStore(path=path, fingerprint="v1", n_vocab=100)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0] and str(path) in warnings[0] and "empty" in warnings[0]
    assert store.requests == 0
    store.add("", [1, 2, 3])
    store.close()  # a later save replaces the damaged file
    assert SuffixStore(path=path, fingerprint="v1", n_vocab=100).requests == 1


def test_a_cache_from_another_tokenizer_is_ignored(tmp_path, caplog):
    path = tmp_path / "suffix.bin"
    store = SuffixStore(path=path, fingerprint="v1", n_vocab=100)
    store.add("", [1, 2, 3, 4])
    store.close()
    with caplog.at_level(logging.WARNING, logger="verispec.suffix"):
        assert SuffixStore(path=path, fingerprint="v2", n_vocab=100).requests == 0
        assert SuffixStore(path=path, fingerprint="v1", n_vocab=3).requests == 0  # token ids beyond its vocabulary
    assert "another tokenizer" in caplog.text and "outside the vocabulary" in caplog.text


def test_an_unwritable_cache_path_is_a_one_line_error(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("")
    with pytest.raises(InvalidParameter, match="cannot write") as err:
        SuffixStore(path=blocked / "sub" / "suffix.bin")
    assert "\n" not in str(err.value)
    with pytest.raises(InvalidParameter, match="directory"):
        SuffixStore(path=tmp_path)


def test_the_history_is_saved_at_an_interval(tmp_path):
    path = tmp_path / "suffix.bin"
    store = SuffixStore(path=path, save_every=0.05)
    try:
        store.add("", [1, 2, 3, 4])
        deadline = threading.Event()
        for _ in range(100):
            if path.exists():
                break
            deadline.wait(0.02)
        assert path.exists()
    finally:
        store.close()
    assert SuffixStore(path=path, save_every=0).requests == 1


def test_drafting_while_other_threads_add_requests():
    store = SuffixStore(memory_mib=0.5)
    rng = np.random.default_rng(2)
    docs = [rng.integers(0, 50, 200).tolist() for _ in range(300)]
    errors = []

    def add(part):
        try:
            for doc in part:
                store.add(str(len(doc) % 2), doc)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=add, args=(docs[i::3],)) for i in range(3)]
    for t in threads:
        t.start()
    drafter = SuffixDrafter(store, "0")
    while any(t.is_alive() for t in threads):
        drafter.begin([1], SamplingParams(), None)
        drafter.propose(rng.integers(0, 50, 64).tolist(), 8)
    for t in threads:
        t.join()
    assert not errors and store.nbytes <= store.limit_bytes
    assert store.requests + store.evicted == 300


# -- the Model and the server ------------------------------------------------------------------------


def _tiny_model(**fields):
    from tests.toy import tiny_runner
    from verispec.api import Model

    return Model(tiny_runner(0, scale=8.0), "torch", SpeculativeConfig(draft="suffix"), **fields)


def test_a_models_requests_share_one_history_that_a_cache_file_keeps_across_restarts(tmp_path):
    path = tmp_path / "history.bin"
    params = SamplingParams(max_tokens=30)
    spec = SpeculativeConfig(draft="suffix", draft_tokens=8)
    model = _tiny_model(suffix_cache=str(path))
    plain = model.generate("hello world, hello", params, spec=SpeculativeConfig())
    first = model.generate("hello world, hello", params, spec=spec)
    second = model.generate("hello world, hello", params, spec=spec)
    assert first.tokens == second.tokens == plain.tokens
    assert second.stats.accepted > first.stats.accepted and model.suffix_store.requests == 2
    model.close()
    restarted = _tiny_model(suffix_cache=str(path))
    assert restarted.suffix_store.requests == 2
    again = restarted.generate("hello world, hello", params, spec=spec)
    assert again.tokens == plain.tokens and again.stats.accepted >= second.stats.accepted
    restarted.close()


def test_load_refuses_a_memory_limit_that_is_not_positive():
    from verispec.api import load

    with pytest.raises(InvalidParameter, match="> 0 MiB"):
        load("tiny", suffix_memory_mib=0)  # refused before any model file is looked for


@pytest.fixture(scope="module")
def tiny_server():
    from starlette.testclient import TestClient

    from verispec.serve import ServeConfig, Server, create_app

    base = _tiny_model()
    server = Server(base, ServeConfig(model="tiny", max_batch=2, ctx=256))
    with TestClient(create_app(server)) as client:
        yield server, client
    server.close()
    base.close()


def _complete(client, key: str, **speculative) -> dict:
    body = {"model": "tiny", "prompt": "hello world, hello", "max_tokens": 40, "temperature": 0.0,
            "speculative": {"draft": "suffix", "draft_tokens": 8, **speculative}}
    response = client.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 200, response.text
    return response.json()


def test_a_server_drafts_from_each_keys_own_earlier_requests(tiny_server):
    server, client = tiny_server
    server.scheduler.suffix_store.clear()
    first_a, second_a, first_b = (_complete(client, key) for key in ("key-a", "key-a", "key-b"))
    texts = {r["choices"][0]["text"] for r in (first_a, second_a, first_b)}
    plain = server.base.generate("hello world, hello", SamplingParams(max_tokens=40), spec=SpeculativeConfig())
    assert len(texts) == 1 and texts == {plain.text}
    spec_a1, spec_a2, spec_b = (r["speculative"] for r in (first_a, second_a, first_b))
    assert spec_a2["draft"] == "suffix" and spec_a2["accepted"] > spec_a1["accepted"]
    assert spec_b["drafted"] == spec_a1["drafted"] and spec_b["accepted"] == spec_a1["accepted"]  # key A's are not B's
    for spec in (spec_a1, spec_a2, spec_b):
        assert sum(spec["drafted_at_position"]) == spec["drafted"]
        assert sum(spec["accepted_at_position"]) == spec["accepted"]
    assert server.scheduler.suffix_store.requests == 3
    metrics = client.get("/metrics").text
    assert "verispec_suffix_history_requests 3.0" in metrics and "verispec_accepted_at_position" in metrics


def test_a_server_offers_suffix_drafting_and_says_so_for_an_unknown_draft(tiny_server):
    _, client = tiny_server
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 4, "speculative": {"draft": "nonsense"}}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 400 and "suffix" in response.json()["error"]["message"]
    assert client.get("/health").json()["draft"] == "suffix"


# -- auto ----------------------------------------------------------------------------------------------


def _stats(generated: int, seconds: float) -> Stats:
    return Stats(generated=generated, verify_seconds=seconds * 0.8, draft_seconds=seconds * 0.2)


def test_auto_tries_each_drafter_then_keeps_the_fastest_and_explores_the_others():
    from verispec.serve.draft_choice import AutoChoice

    auto = AutoChoice(["suffix", "model", "cascade"], warmup=2, explore_every=4)
    speed = {"suffix": 50.0, "model": 20.0, "cascade": 35.0}  # tokens per second of drafting + verification
    warm = [auto.choose() for _ in range(6)]
    assert sorted(warm) == sorted(["suffix", "model", "cascade"] * 2)
    for key in warm:
        auto.record(key, _stats(100, 100 / speed[key]))
    later = [auto.choose() for _ in range(16)]
    assert later.count("suffix") == 12 and {"model", "cascade"} <= set(later)
    speed["suffix"] = 5.0  # the traffic changed: suffix lookup stops finding drafts
    for _ in range(10):
        auto.record("suffix", _stats(100, 100 / speed["suffix"]))
        auto.record("cascade", _stats(100, 100 / speed["cascade"]))
    assert auto.best() == "cascade"
    auto.record("model", _stats(3, 0.001))  # too short to say anything
    assert auto.rates["model"] == pytest.approx(20.0)


def test_an_auto_server_picks_per_request_among_suffix_the_model_and_their_cascade():
    from starlette.testclient import TestClient

    from tests.toy import tiny_runner
    from verispec.serve import ServeConfig, Server, create_app

    base = _tiny_model()
    base.spec = SpeculativeConfig(draft="auto")
    base._drafters["auto"] = ModelDrafter(tiny_runner(0, scale=8.0))  # what auto found: a model sharing the vocabulary
    server = Server(base, ServeConfig(model="tiny", max_batch=2, ctx=256))
    try:
        assert server.scheduler.cascade == ("suffix", "model") and server.scheduler.auto.candidates == [
            "suffix", "model", "cascade"]
        with TestClient(create_app(server)) as client:
            assert client.get("/health").json()["draft"] == "auto"
            drafts = []
            for _ in range(7):
                body = {"model": "tiny", "prompt": "hello world, hello", "max_tokens": 24, "temperature": 0.0}
                response = client.post("/v1/completions", json=body).json()
                drafts.append(response["speculative"]["draft"])
        assert set(drafts[:6]) == {"suffix", "tiny-0", "cascade:suffix,tiny-0"}
        assert set(server.scheduler.auto.rates) == {"suffix", "model", "cascade"}
    finally:
        server.close()
        base.close()


def test_drafting_for_sixteen_requests_takes_well_under_a_millisecond_per_request_step():
    import time

    rng = np.random.default_rng(0)
    phrases = rng.integers(0, 32000, (2000, 20))  # repetitive text: documents are sequences of common phrases

    def text(n: int) -> list[int]:
        return phrases[rng.integers(0, 2000, n)].ravel().tolist()

    store = SuffixStore()
    for _ in range(500):
        store.add("", text(15))
    drafters, contexts = [SuffixDrafter(store) for _ in range(16)], [text(50) for _ in range(16)]
    for drafter, context in zip(drafters, contexts):
        drafter.begin(context, SamplingParams(), None)
        drafter.propose(context, 12)  # the prompt is indexed at the first step
    seconds = []
    for _ in range(30):
        for drafter, context in zip(drafters, contexts):
            t0 = time.perf_counter()
            draft = drafter.propose(context, 12)
            seconds.append(time.perf_counter() - t0)
            context += draft.tokens[:3] + [int(rng.integers(0, 32000))]  # some accepted, then the target's own
    assert np.mean(seconds) < 1e-3, f"{np.mean(seconds) * 1e3:.3f} ms per request-step"


def test_a_server_runs_suffix_lookup_alone_or_in_a_cascade_with_n_grams_or_one_draft_model():
    from verispec.drafters.ngram import NgramDrafter
    from verispec.serve.scheduler import served_drafters

    store, model = SuffixStore(), ModelDrafter(TableRunner(8))
    assert served_drafters(SuffixDrafter(store)) == (None, None)
    assert served_drafters(CascadeDrafter([SuffixDrafter(store), model], 8)) == (model, ("suffix", "model"))
    assert served_drafters(CascadeDrafter([SuffixDrafter(store), NgramDrafter()], 8)) == (None, ("suffix", "ngram"))
