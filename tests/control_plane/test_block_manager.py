"""Global block tables: prefix hits, slot allocation, forks, copy-on-write, swap; a stateful model check."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, precondition, rule

from pagedserve.control_plane.scheduling.block_manager import BlockManager, Device, TableChange, hash_block

from .factories import assert_block_invariants

BLOCK_SIZE = 4


def _manager(num_gpu_blocks: int = 8, num_cpu_blocks: int = 8) -> BlockManager:
    return BlockManager(num_gpu_blocks, num_cpu_blocks, BLOCK_SIZE, enable_prefix_caching=True)


def _new_seq(bm: BlockManager, seq_id: int, tokens: list[int]) -> TableChange | None:
    prefix = bm.find_cached_prefix(tokens)
    bm.create_table(seq_id, prefix)
    change = bm.allocate_slots(seq_id, prefix.num_tokens, len(tokens))
    bm.cache_full_blocks(seq_id, tokens, len(tokens))
    return change


def test_block_hash_chains_the_parent() -> None:
    assert hash_block(None, [1, 2]) == hash_block(None, [1, 2])
    assert hash_block(None, [1, 2]) != hash_block(hash_block(None, [0]), [1, 2])


def test_allocation_appends_blocks_for_new_slots() -> None:
    bm = _manager()
    assert _new_seq(bm, 0, list(range(6))) == TableChange(0, (0, 1))
    assert bm.allocate_slots(0, 6, 9) == TableChange(2, (2,))
    assert bm.allocate_slots(0, 9, 10) == TableChange(3, ())
    assert bm.block_ids(0) == (0, 1, 2)


def test_allocation_short_of_blocks_changes_nothing() -> None:
    bm = _manager(num_gpu_blocks=2)
    _new_seq(bm, 0, list(range(8)))
    assert bm.allocate_slots(0, 8, 9) is None
    assert bm.block_ids(0) == (0, 1)
    assert bm.gpu.num_free_blocks == 0


def test_prefix_hit_covers_cached_full_blocks_but_never_the_last_token() -> None:
    bm = _manager()
    _new_seq(bm, 0, list(range(8)))
    exact = bm.find_cached_prefix(list(range(8)))
    assert (exact.block_ids, exact.num_tokens) == ((0,), 4)
    longer = bm.find_cached_prefix([*range(8), 99])
    assert (longer.block_ids, longer.num_tokens, longer.num_query_tokens) == ((0, 1), 8, 9)


def test_prefix_hit_stops_at_the_first_different_block() -> None:
    bm = _manager()
    _new_seq(bm, 0, list(range(12)))
    prefix = bm.find_cached_prefix([0, 1, 2, 3, 9, 9, 9, 9, 8, 9, 10, 11, 12])
    assert prefix.block_ids == (0,)


def test_new_sequence_shares_hit_blocks_and_counts_tokens() -> None:
    bm = _manager()
    _new_seq(bm, 0, list(range(6)))
    assert _new_seq(bm, 1, [0, 1, 2, 3, 50, 51]) == TableChange(1, (2,))
    assert bm.block_ids(1) == (0, 2)
    assert (bm.gpu.ref_count(0), bm.gpu.ref_count(1), bm.gpu.ref_count(2)) == (2, 1, 1)
    assert (bm.prefix_cache_queries, bm.prefix_cache_hits) == (12, 4)


def test_freed_table_joins_the_free_queue_tail_first() -> None:
    bm = _manager(num_gpu_blocks=4)
    _new_seq(bm, 0, list(range(12)))
    bm.free(0)
    assert bm.gpu.free_queue() == (3, 2, 1, 0)


def test_fork_shares_blocks_covering_the_prompt() -> None:
    bm = _manager()
    _new_seq(bm, 0, list(range(6)))
    bm.allocate_slots(0, 6, 9)
    bm.fork(0, 1, num_tokens=6)
    assert bm.block_ids(1) == (0, 1)
    assert (bm.gpu.ref_count(0), bm.gpu.ref_count(1), bm.gpu.ref_count(2)) == (2, 2, 1)


def test_writing_into_a_shared_partial_block_copies_it_first() -> None:
    bm = _manager()
    _new_seq(bm, 0, list(range(6)))
    bm.fork(0, 1, num_tokens=6)
    assert bm.num_copies_needed([(0, 6), (1, 6)]) == 1
    assert bm.allocate_slots(1, 6, 7) == TableChange(1, (2,), ((1, 2),))
    assert bm.allocate_slots(0, 6, 7) == TableChange(2, ())
    assert (bm.block_ids(0), bm.block_ids(1)) == ((0, 1), (0, 2))


def test_copy_and_append_form_one_table_update() -> None:
    bm = _manager()
    _new_seq(bm, 0, list(range(6)))
    bm.fork(0, 1, num_tokens=6)
    assert bm.allocate_slots(1, 6, 10) == TableChange(1, (2, 3), ((1, 2),))


def test_swap_moves_shared_blocks_once_and_back() -> None:
    bm = _manager(num_gpu_blocks=4, num_cpu_blocks=4)
    _new_seq(bm, 0, list(range(6)))
    bm.fork(0, 1, num_tokens=6)
    bm.allocate_slots(1, 6, 8)
    assert bm.can_swap_out([0, 1])
    assert bm.swap_out([0, 1]) == ((0, 0), (1, 1), (2, 2))
    assert (bm.device(0), bm.block_ids(0), bm.block_ids(1)) == (Device.CPU, (0, 1), (0, 2))
    assert (bm.cpu.ref_count(0), bm.gpu.num_used_blocks) == (2, 0)
    assert bm.gpu.free_queue() == (3, 1, 2, 0)
    assert bm.can_swap_in([0, 1], num_extra_blocks=1)
    assert not bm.can_swap_in([0, 1], num_extra_blocks=2)
    assert bm.swap_in([0, 1]) == ((0, 3), (1, 1), (2, 2))
    assert (bm.block_ids(0), bm.block_ids(1), bm.cpu.num_used_blocks) == ((3, 1), (3, 2), 0)


class BlockManagerMachine(RuleBasedStateMachine):
    """Random allocate / append (copy-on-write) / fork / free / preempt / swap / cancel against a model of
    slot contents: every sequence must read its own tokens back from its table, and every prefix hit must
    hold the tokens it claims."""

    seqs = Bundle("seqs")

    def __init__(self) -> None:
        super().__init__()
        self.bm = BlockManager(10, 6, 2, enable_prefix_caching=True)
        self.tokens: dict[int, list[int]] = {}
        self.num_computed: dict[int, int] = {}
        self.slots = {Device.GPU: [[-1, -1] for _ in range(10)], Device.CPU: [[-1, -1] for _ in range(6)]}
        self.next_seq_id = 0

    def _write(self, seq_id: int, end: int) -> None:
        table = self.bm.block_ids(seq_id)
        for position in range(self.num_computed[seq_id], end):
            self.slots[Device.GPU][table[position // 2]][position % 2] = self.tokens[seq_id][position]
        self.num_computed[seq_id] = end
        self.bm.cache_full_blocks(seq_id, self.tokens[seq_id], end)

    @rule(target=seqs, tokens=st.lists(st.integers(0, 2), min_size=1, max_size=9))
    def allocate(self, tokens: list[int]) -> int:
        seq_id, self.next_seq_id = self.next_seq_id, self.next_seq_id + 1
        prefix = self.bm.find_cached_prefix(tokens)
        for index, block_id in enumerate(prefix.block_ids):
            assert self.slots[Device.GPU][block_id] == tokens[2 * index : 2 * index + 2]
        if self.bm.num_blocks_needed(seq_id, len(tokens), prefix) > self.bm.gpu.num_free_blocks:
            return -1
        self.bm.create_table(seq_id, prefix)
        self.tokens[seq_id], self.num_computed[seq_id] = list(tokens), prefix.num_tokens
        assert self.bm.allocate_slots(seq_id, prefix.num_tokens, len(tokens)) is not None
        self._write(seq_id, len(tokens))
        return seq_id

    @precondition(lambda self: self.tokens)
    @rule(seq_id=seqs, new_tokens=st.lists(st.integers(0, 2), min_size=1, max_size=3))
    def append(self, seq_id: int, new_tokens: list[int]) -> None:
        """Appends tokens; a block shared with a fork is copied before it is written."""
        if seq_id not in self.tokens or self.bm.device(seq_id) is not Device.GPU:
            return
        start = self.num_computed[seq_id]
        end = start + len(new_tokens)
        needed = self.bm.num_blocks_needed(seq_id, end) + self.bm.num_copies_needed([(seq_id, start)])
        num_free = self.bm.gpu.num_free_blocks
        change = self.bm.allocate_slots(seq_id, start, end)
        assert (change is not None) == (needed <= num_free)
        if change is None:
            return
        for src, dst in change.copies:
            self.slots[Device.GPU][dst] = list(self.slots[Device.GPU][src])
        self.tokens[seq_id] += new_tokens
        self._write(seq_id, end)

    @precondition(lambda self: self.tokens)
    @rule(target=seqs, parent=seqs)
    def fork(self, parent: int) -> int:
        if parent not in self.tokens:
            return -1
        child, self.next_seq_id = self.next_seq_id, self.next_seq_id + 1
        self.bm.fork(parent, child, self.num_computed[parent])
        self.tokens[child] = self.tokens[parent][: self.num_computed[parent]]
        self.num_computed[child] = self.num_computed[parent]
        return child

    @rule(seq_id=consumes(seqs))
    def free(self, seq_id: int) -> None:
        """Finish, abort and recompute preemption all free the table."""
        self.bm.free(seq_id)
        self.tokens.pop(seq_id, None)
        self.num_computed.pop(seq_id, None)

    @rule(seq_id=seqs)
    def preempt(self, seq_id: int) -> None:
        """To the CPU pool when it fits there, else by recompute (its blocks freed, its tokens forgotten)."""
        if seq_id not in self.tokens or self.bm.device(seq_id) is not Device.GPU:
            return
        if self.bm.can_swap_out([seq_id]):
            self.swap_out(seq_id)
        else:
            self.free(seq_id)

    @rule(tokens=st.lists(st.integers(0, 2), min_size=1, max_size=9))
    def cancel(self, tokens: list[int]) -> None:
        """A request aborted right after admission: its prefix hits go back to the free queue."""
        seq_id, self.next_seq_id = self.next_seq_id, self.next_seq_id + 1
        prefix = self.bm.find_cached_prefix(tokens)
        num_free = self.bm.gpu.num_free_blocks
        self.bm.create_table(seq_id, prefix)
        self.bm.free(seq_id)
        assert self.bm.gpu.num_free_blocks == num_free
        for block_id in prefix.block_ids:
            assert self.bm.gpu.lookup(self.bm.gpu.block_hash(block_id) or b"") == block_id

    @rule(seq_id=seqs)
    def swap_out(self, seq_id: int) -> None:
        if seq_id not in self.tokens or self.bm.device(seq_id) is not Device.GPU:
            return
        if not self.bm.can_swap_out([seq_id]):
            return
        for src, dst in self.bm.swap_out([seq_id]):
            self.slots[Device.CPU][dst] = list(self.slots[Device.GPU][src])

    @rule(seq_id=seqs)
    def swap_in(self, seq_id: int) -> None:
        if seq_id not in self.tokens or self.bm.device(seq_id) is not Device.CPU:
            return
        if not self.bm.can_swap_in([seq_id], num_extra_blocks=0):
            return
        for src, dst in self.bm.swap_in([seq_id]):
            self.slots[Device.GPU][dst] = list(self.slots[Device.CPU][src])

    @invariant()
    def blocks_are_consistent(self) -> None:
        assert_block_invariants(self.bm)

    @invariant()
    def every_sequence_reads_its_own_tokens(self) -> None:
        for seq_id, tokens in self.tokens.items():
            table, device = self.bm.block_ids(seq_id), self.bm.device(seq_id)
            for position in range(self.num_computed[seq_id]):
                assert self.slots[device][table[position // 2]][position % 2] == tokens[position]

    def teardown(self) -> None:
        for seq_id in list(self.tokens):
            self.bm.free(seq_id)
        assert_block_invariants(self.bm)
        assert (self.bm.gpu.num_used_blocks, self.bm.cpu.num_used_blocks) == (0, 0)


BlockManagerMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
test_block_manager_state_machine = BlockManagerMachine.TestCase
