"""One source for buffer sizes: config.py reads the formulas (hints, capacities) from the core
where it is built, its Python mirrors (for installs without the core) equal the core's
wherever it is built (CI builds it), and the hints cover what a worst routing needs."""

from __future__ import annotations

import importlib
import os

import pytest

from mpiep import config

SHAPES = [(7168, 8, False), (7168, 8, True), (4096, 4, True), (2048, 1, False), (256, 0, False)]


def core():
    try:
        return importlib.import_module("mpiep._C")
    except ImportError:
        if os.environ.get("MPIEP_EXPECT_CORE") == "1":
            raise
        pytest.skip("mpiep._C is not built here")


@pytest.mark.parametrize("hidden,topk,fp8", SHAPES)
def test_normal_row_bytes_match_the_core(hidden: int, topk: int, fp8: bool) -> None:
    c = core()
    hidden_bytes = hidden * (1 if fp8 else 2)
    scales = hidden // 128 if fp8 else 0
    want = c.intranode_dispatch_row_bytes(hidden_bytes, scales, topk)
    assert config.normal_row_bytes_mirror(hidden, topk, fp8) == want
    assert config.normal_row_bytes(hidden, topk, fp8) == want


@pytest.mark.parametrize("hidden,topk,fp8", SHAPES)
@pytest.mark.parametrize("ranks_per_node", [1, 2, 8])
def test_internode_row_bytes_match_the_core(hidden, topk, fp8, ranks_per_node) -> None:
    c = core()
    hidden_bytes = hidden * (1 if fp8 else 2)
    scales = hidden // 128 if fp8 else 0
    want = c.internode_rdma_dispatch_row_bytes(hidden_bytes, scales, topk, ranks_per_node)
    assert config.internode_rdma_row_bytes_mirror(hidden, topk, ranks_per_node, fp8) == want
    assert config.internode_rdma_row_bytes(hidden, topk, ranks_per_node, fp8) == want


@pytest.mark.parametrize("ranks,nodes", [(2, 2), (4, 2), (16, 2), (64, 8), (256, 32), (1024, 128)])
def test_internode_control_bytes_match_the_core(ranks: int, nodes: int) -> None:
    want = core().internode_rdma_control_bytes(ranks, nodes)
    assert config.internode_rdma_control_bytes_mirror(ranks, nodes) == want
    assert config.internode_rdma_control_bytes(ranks, nodes) == want


@pytest.mark.parametrize(
    "max_tokens,hidden,ranks,experts",
    [
        (128, 7168, 1, 288),
        (128, 7168, 8, 288),
        (256, 4096, 16, 256),
        (1, 128, 2, 2),
        (64, 2048, 4, 64),
    ],
)
def test_low_latency_hint_matches_the_core(max_tokens, hidden, ranks, experts) -> None:
    """The hint is two 4 KiB-rounded halves of the core's half_bytes_needed, and the Python
    mirror (used where the core is not built) gives the same bytes."""
    c = core()
    if not hasattr(c, "low_latency_half_bytes"):
        pytest.fail("mpiep._C has no low_latency_half_bytes: rebuild the core")
    half = c.low_latency_half_bytes(hidden, max_tokens, experts)
    want = 2 * ((half + 4095) // 4096 * 4096)
    assert config.low_latency_rdma_size_mirror(max_tokens, hidden, experts) == want
    assert config.get_low_latency_rdma_size_hint(max_tokens, hidden, ranks, experts) == want


def test_internode_hint_covers_a_worst_routing() -> None:
    """Every token of every rank to one node: a forwarder there receives tokens x nodes rows
    and each sender stages as many; the hint must hold both plus the control area."""
    tokens, hidden, ranks, rpn, topk = 512, 2048, 8, 2, 8
    nodes = ranks // rpn
    row = config.internode_rdma_row_bytes(hidden, topk, rpn, fp8=False)
    need = config.internode_rdma_control_bytes(ranks, nodes) + 2 * nodes * tokens * row
    assert config.get_internode_rdma_size_hint(tokens, hidden, ranks, rpn, topk) >= need


def test_normal_hint_covers_a_full_receive() -> None:
    tokens, hidden, ranks, topk = 300, 4096, 4, 8
    row = config.normal_row_bytes(hidden, topk, fp8=False)
    hint = config.get_normal_buffer_size_hint(tokens, hidden, ranks, topk)
    assert hint >= config.CONTROL_BYTES + ranks * tokens * row


def test_configs_are_cached_and_read_the_tuned_table_once(tmp_path, monkeypatch) -> None:
    """Buffer asks for a config on every call: the same object comes back, and the tuned
    table is read from disk once per path."""
    import json

    table = tmp_path / "tuned.json"
    table.write_text(json.dumps({"4": {"dispatch": {"num_sms": 32}}}))
    monkeypatch.setenv("MPIEP_TUNED_CONFIG", str(table))
    a = config.default_dispatch_config(4, 24)
    assert a.num_sms == 32
    table.unlink()  # a second call must not need the file any more
    b = config.default_dispatch_config(4, 24)
    assert a is b
    assert config.default_dispatch_config(4, 24, use_tuned=False).num_sms == 24


def test_buffer_caches_its_default_configs(tmp_path, monkeypatch) -> None:
    """A Buffer reads the tuned table when it first needs a config and keeps it; set_num_sms
    still takes effect at the next call (it is part of the cache key)."""
    import json

    from mpiep import Buffer

    table = tmp_path / "tuned_buffer.json"
    table.write_text(json.dumps({"1": {"dispatch": {"num_sms": 36}, "combine": {"num_sms": 40}}}))
    monkeypatch.setenv("MPIEP_TUNED_CONFIG", str(table))
    monkeypatch.setattr(Buffer, "num_sms", 24)
    monkeypatch.setattr(Buffer, "_num_sms_set", False)
    buf = Buffer(num_nvl_bytes=1 << 20, backend="reference", device="cpu")
    try:
        if buf.group_size != 1:
            pytest.skip("one rank: the table above is for 1 rank")
        first = buf._default_config("dispatch")
        assert first.num_sms == 36 and buf._default_config("combine").num_sms == 40
        monkeypatch.delenv("MPIEP_TUNED_CONFIG")  # read once: the Buffer keeps what it read
        assert buf._default_config("dispatch") is first
        Buffer.set_num_sms(16)  # an explicit choice wins over the table, from the next call
        assert buf._default_config("dispatch").num_sms == 16
    finally:
        buf.destroy()
