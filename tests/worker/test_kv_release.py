"""Free KV blocks give their memory back to the OS (issue 17, failure 7: the server's RSS climbed towards the
whole KV budget and never came down). Residency is read from the kernel (mincore), not from our bookkeeping."""
from __future__ import annotations

import ctypes
import mmap
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tokenloom.config import CacheConfig
from tokenloom.core.block_pool import BlockPool
from tokenloom.sampling_params import SamplingParams
from tokenloom.worker.kv_cache import KVCache

_LIBC = ctypes.CDLL(None, use_errno=True)


def resident_pages(t: torch.Tensor) -> np.ndarray:
    """Per page of the tensor's memory: 1 if the kernel has it in RAM."""
    page = mmap.PAGESIZE
    start = t.data_ptr() // page * page
    stop = t.data_ptr() + t.numel() * t.element_size()
    n = -(-(stop - start) // page)
    vec = (ctypes.c_ubyte * n)()
    assert _LIBC.mincore(ctypes.c_void_p(start), ctypes.c_size_t(n * page), vec) == 0, ctypes.get_errno()
    return np.frombuffer(vec, dtype=np.uint8) & 1


def test_block_pool_trim_releases_blocks_idle_for_a_whole_epoch():
    pool = BlockPool(8)
    a, b, c = pool.take(), pool.take(), pool.take()
    pool.register(a, 111)
    pool.register(b, 222)
    for blk in (a, b, c):
        pool.release(blk)
    assert pool.num_resident == 3
    assert pool.trim(keep_cached=0) == []  # freed in this epoch: may be wanted again at once
    d = pool.take()  # the uncached free block is reused first (its memory is resident)
    assert d == c
    released = pool.trim(keep_cached=1)  # b (cached, most recent) is kept; a is forgotten and released
    assert released == [a] and pool.lookup(111) is None and pool.lookup(222) == b
    assert pool.num_resident == 2 and not pool.resident[a]
    assert list(pool.free)[-1] == a  # given-back memory is reused after every resident block
    pool.release(d)
    assert pool.trim(keep_cached=0) == [b]  # no longer kept; d was freed in this epoch
    assert pool.trim(keep_cached=0) == [d]
    assert pool.num_resident == 0 and pool.lookup(222) is None
    pool.check_invariants([])


def test_release_blocks_returns_whole_pages_and_keeps_neighbours():
    cfg = SimpleNamespace(num_layers=3, num_kv_heads=2, head_dim=64)  # a block is 4 KiB per [layer, k/v] plane
    cache = KVCache(cfg, CacheConfig(block_size=8), 256, torch.float32, torch.device("cpu"))
    assert resident_pages(cache.tensor).sum() <= 2  # calloc: nothing touched yet
    cache.tensor.normal_()
    before = cache.tensor.clone()
    pages = resident_pages(cache.tensor)
    assert pages.mean() > 0.99
    freed = list(range(10, 100)) + [150, 152]
    released = cache.release_blocks(freed)
    assert released == 3 * 2 * (90 + 2) * 4096  # every page of each freed block, in every plane
    after = resident_pages(cache.tensor)
    assert pages.sum() - after.sum() == released // mmap.PAGESIZE
    slots = cache.tensor.view(3, 2, 256, 8, 2, 64)
    kept = [b for b in range(256) if b not in freed]
    assert torch.equal(slots[:, :, kept], before.view(3, 2, 256, 8, 2, 64)[:, :, kept])  # neighbours untouched
    assert not slots[:, :, freed].any()  # released slots read as zeros, as never-written ones do


def test_unaligned_blocks_release_only_pages_wholly_inside_free_runs():
    cfg = SimpleNamespace(num_layers=1, num_kv_heads=3, head_dim=64)  # 16 slots x 3 x 64 x 2 B = 1.5 pages
    cache = KVCache(cfg, CacheConfig(block_size=16), 64, torch.bfloat16, torch.device("cpu"))
    cache.tensor.fill_(1.0)
    released = cache.release_blocks([5, 6, 7, 20])
    slots = cache.tensor.view(1, 2, 64, 16, 3, 64)
    others = [b for b in range(64) if b not in (5, 6, 7, 20)]
    assert (slots[:, :, others] == 1).all()  # a page shared with a block in use is never given back
    assert released > 0 and released % mmap.PAGESIZE == 0
    assert released <= 2 * 4 * 6144


def test_pages_on_the_border_of_blocks_released_in_different_trims_go_too():
    """A block of 16 tokens x 3 heads x 64 dims in bf16 is 6 KiB per plane, so pages straddle blocks. Blocks 10 and
    11 freed and trimmed apart: the page they share must go once both are empty (it used to stay for good, and a
    server's resident KV crept up by these pages load after load)."""
    cfg = SimpleNamespace(num_layers=2, num_kv_heads=3, head_dim=64)
    cache = KVCache(cfg, CacheConfig(block_size=16), 64, torch.bfloat16, torch.device("cpu"))
    pool = BlockPool(64)
    blocks = [pool.take() for _ in range(64)]
    cache.tensor.normal_()
    assert cache.blocks_per_page == 1
    for block in (10, 11):
        pool.release(blocks[block])
        assert pool.trim(keep_cached=0) == []
        released = pool.trim(keep_cached=0)
        assert released == [block]
        cache.release_blocks(pool.unbacked_around(released, cache.blocks_per_page))
    plane = cache.tensor[0, 0]
    block_bytes = plane.numel() * plane.element_size() // 64
    pages = resident_pages(plane)
    first, last = -(-10 * block_bytes // mmap.PAGESIZE), 12 * block_bytes // mmap.PAGESIZE
    assert last - first == 3  # three whole pages lie inside blocks 10..11, the middle one on their border
    assert pages[first:last].sum() == 0, pages[first - 1:last + 1]
    assert pages[first - 1] == 1 and pages[last] == 1  # the pages shared with blocks 9 and 12 stay
    assert pool.unbacked_around([20], 4) == [20]  # neighbours holding data are never named


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
def test_engine_gives_back_kv_memory_at_rest_and_outputs_do_not_change(tiny_llama, kv_cache_dtype):
    from tokenloom import LLM

    path, _ = tiny_llama
    llm = LLM(str(path), dtype="float32", max_model_len=1024, kv_cache_memory=32 << 20, max_num_seqs=16,
              kv_cache_dtype=kv_cache_dtype, kv_release_interval_s=3600, kv_keep_cached_bytes=64 << 10)
    eng = llm.engine
    kv = eng.executor.runner.cache.tensor
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    prompts = [[1 + (i * 7 + j) % 300 for j in range(600)] for i in range(24)]
    first = [o.outputs[0].token_ids for o in llm.generate(prompts[:3], greedy)]
    llm.generate(prompts, greedy)
    loaded = resident_pages(kv).sum() * mmap.PAGESIZE
    assert eng.stats().kv_resident_bytes >= 24 * 600 * kv.numel() * kv.element_size() // kv.shape[2] * 0.9
    assert eng.release_free_memory(force=True) == 0  # every block was used in this epoch
    released = eng.release_free_memory(force=True)
    rest = resident_pages(kv).sum() * mmap.PAGESIZE
    st = eng.stats()
    assert released > 0.8 * loaded and rest < 0.1 * loaded
    assert st.kv_resident_bytes <= (64 << 10) + eng.executor.kv_block_bytes and st.kv_released_bytes == released
    again = [o.outputs[0].token_ids for o in llm.generate(prompts[:3], greedy)]
    assert again == first  # the same greedy tokens over memory that came back as zeros
    assert eng.stats().steps > 0 and eng.kv_cache_manager.num_used_blocks == 0


def test_idle_engine_drops_the_samplers_vocabulary_buffers(tiny_llama):
    """The sampler keeps [rows, vocabulary] buffers as wide as the widest step it met (64 rows of a 128k vocabulary
    are 32 MiB each); an engine at rest drops them, and a later step works as before."""
    from tokenloom import LLM

    path, _ = tiny_llama
    llm = LLM(str(path), dtype="float32", max_model_len=256, kv_release_interval_s=3600)
    eng = llm.engine
    params = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=4, logprobs=3, seed=1)
    first = [o.outputs[0].token_ids for o in llm.generate([[5, 6, 7]] * 6, params)]
    ws = eng.executor.runner.sampler.ws
    assert ws._bufs, "the sampler kept no buffers: this test checks nothing"
    eng.release_free_memory(force=True)
    assert not ws._bufs
    assert [o.outputs[0].token_ids for o in llm.generate([[5, 6, 7]] * 6, params)] == first
