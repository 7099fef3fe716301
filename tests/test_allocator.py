"""segformer.allocator: large tensors reuse the heap instead of fresh pages (counted as page faults, not time)."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

from segformer import allocator

# A child process: allocate, touch and free 24 MiB tensors (a stage-1 activation's size), 4 at a time, ten
# rounds, in a thread (as a server's inference worker would); report the minor page faults of the last five
# rounds (the heap settles within three or four) and how much the resident size grew after the first.
# Fresh pages fault once per 4 KiB page.
CHILD = r"""
import json, resource, sys, threading, torch
from segformer.allocator import tune_allocator
tuned = tune_allocator() if sys.argv[1] == "tune" else False
faults, rss = [], []
def work():
    for _ in range(10):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        xs = [torch.ones(6, 1024, 1024) for _ in range(4)]  # 4 x 24 MiB, written once
        del xs
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        rss.append(int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) * 1024)
t = threading.Thread(target=work)
t.start()
t.join()
print(json.dumps({"tuned": tuned, "faults": faults[5:], "growth": rss[-1] - rss[0]}))
"""
PAGES = 4 * 24 * 1024 * 1024 // 4096  # 24,576 pages of 4 KiB per round


def child(mode: str, env: dict[str, str] | None = None) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the settings are glibc's; elsewhere a no-op")
def test_tuned_allocator_reuses_freed_blocks_across_threads():
    default, tuned = child("default"), child("tune")
    assert default["tuned"] is False and tuned["tuned"] is True
    # glibc's defaults in a thread: its arena cannot hold 96 MiB, so blocks keep coming as fresh mappings
    assert sum(default["faults"]) > PAGES // 2
    # tuned: the blocks return to the heap and are reused; over five rounds, less than a third of one round's
    # pages (the heap may still settle in a round: 0 to 6,144 faults seen; the defaults: 12,288 or more)
    assert sum(tuned["faults"]) < PAGES // 3
    # what it costs: freed memory kept for reuse, bounded by the trim threshold plus one round's blocks
    assert tuned["growth"] <= allocator.TRIM_THRESHOLD + PAGES * 4096


def test_system_setting_turns_it_off(monkeypatch):
    import os

    env = dict(os.environ, SEGFORMER_MALLOC="system")
    assert child("tune", env)["tuned"] is False


# ReusableBuffer: a batch's logits, handed out again only once nobody holds them. The thresholds are patched so
# that small tensors count as large ones (the rule is about sizes, not about these tests' memory).
@pytest.fixture
def buffer(monkeypatch):
    monkeypatch.setattr(allocator, "MMAP_THRESHOLD", 64)
    monkeypatch.setattr(allocator, "TRIM_THRESHOLD", 1 << 20)
    monkeypatch.delenv(allocator.ENV, raising=False)
    return allocator.ReusableBuffer()


def test_a_dropped_output_is_handed_out_again(buffer):
    import torch

    first = buffer.empty((2, 3, 8, 8), torch.float32)
    address = first.data_ptr()
    first.fill_(1.0)
    del first
    again = buffer.empty((2, 3, 8, 8), torch.float32)
    assert again.data_ptr() == address and again.shape == (2, 3, 8, 8) and again.is_contiguous()
    # another size or dtype is a new block (a tensor never spans more storage than its own elements: torch.save
    # of the logits writes just them)
    del again
    other = buffer.empty((2, 3, 8, 4), torch.float32)
    assert other.data_ptr() != address and other.untyped_storage().nbytes() == other.numel() * 4
    assert buffer.empty((2, 3, 8, 8), torch.float64).dtype == torch.float64


@pytest.mark.parametrize(
    "hold",
    [
        lambda t: t,
        lambda t: t[1:],  # a view
        lambda t: t.numpy(),  # a NumPy array on the same memory
        lambda t: t.untyped_storage(),  # the storage itself
        lambda t: __import__("torch").utils.dlpack.to_dlpack(t.view(-1)),
        lambda t: [t.view(-1)[:5]],  # a view inside a container
    ],
    ids=["tensor", "view", "numpy", "storage", "dlpack", "nested-view"],
)
def test_an_output_still_held_is_never_overwritten(buffer, hold):
    import ctypes

    import torch

    expected = torch.arange(256.0)
    first = buffer.empty((4, 64), torch.float32)
    first.copy_(expected.view(4, 64))
    address, kept = first.data_ptr(), hold(first)
    del first
    second = buffer.empty((4, 64), torch.float32)
    assert second.data_ptr() != address
    second.fill_(-1.0)
    # the holder keeps the first block alive and unchanged: read it where it lies
    assert torch.equal(torch.frombuffer(bytearray(ctypes.string_at(address, 1024)), dtype=torch.float32), expected)
    del kept
    # with the holder gone, the newest block is the one kept (the old one went with its holder)
    address = second.data_ptr()
    del second
    assert buffer.empty((4, 64), torch.float32).data_ptr() == address


def test_small_large_and_switched_off_outputs_are_plain_tensors(buffer, monkeypatch):
    import torch

    small = buffer.empty((4,), torch.float32)  # 16 bytes: below the (patched) mmap threshold
    del small
    assert buffer._block is None
    huge = buffer.empty((1 << 19,), torch.float32)  # 2 MiB: above the (patched) trim threshold, never kept
    del huge
    assert buffer._block is None
    monkeypatch.setenv(allocator.ENV, "system")
    buffer.empty((64,), torch.float32)
    assert buffer._block is None


def test_a_copied_or_pickled_buffer_starts_empty(buffer):
    import copy
    import pickle

    import torch

    kept = buffer.empty((64,), torch.float32)
    assert buffer._block is not None
    for clone in (copy.deepcopy(buffer), pickle.loads(pickle.dumps(buffer))):
        assert isinstance(clone, allocator.ReusableBuffer) and clone._block is None
        assert clone.empty((64,), torch.float32).data_ptr() != kept.data_ptr()
