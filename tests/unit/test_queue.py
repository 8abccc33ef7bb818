"""TrackQueue: every operation, its errors, and a state machine that hunts for lost tracks."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from legato.audio.queue import LoopMode, TrackQueue
from legato.audio.track import Track
from legato.errors import QueueEmpty, QueueError, QueueFull


def tracks(*names: str) -> list[Track]:
    return [Track(url=f"https://example.invalid/{n}", title=n) for n in names]


def titles(seq: object) -> list[str]:
    assert isinstance(seq, (list, tuple))
    return [t.title for t in seq]


def test_add_returns_positions_and_keeps_order() -> None:
    q = TrackQueue()
    assert q.add(tracks("a", "b")) == [0, 1]
    assert q.add(tracks("c")) == [2]
    assert titles(q.upcoming) == ["a", "b", "c"]
    assert len(q) == 3
    assert q.current is None


def test_add_next_inserts_batch_at_front_in_order() -> None:
    q = TrackQueue()
    q.add(tracks("a", "b"))
    assert q.add_next(tracks("x", "y")) == [0, 1]
    assert titles(q.upcoming) == ["x", "y", "a", "b"]


def test_upcoming_is_read_only_snapshot() -> None:
    q = TrackQueue()
    q.add(tracks("a"))
    view = q.upcoming
    q.add(tracks("b"))
    assert titles(view) == ["a"]
    with pytest.raises(AttributeError):
        view.append(tracks("z")[0])  # type: ignore[attr-defined]  # proving it is immutable


def test_remove_and_out_of_range_messages_are_one_based() -> None:
    q = TrackQueue()
    q.add(tracks("a", "b", "c"))
    assert q.remove(1).title == "b"
    assert titles(q.upcoming) == ["a", "c"]
    with pytest.raises(QueueError) as info:
        q.remove(2)
    assert info.value.user_message == "Position 3 is not in the queue (1 to 2)."
    with pytest.raises(QueueError):
        q.remove(-1)
    assert titles(q.upcoming) == ["a", "c"]


def test_remove_from_empty_queue_is_queue_empty() -> None:
    with pytest.raises(QueueEmpty) as info:
        TrackQueue().remove(0)
    assert info.value.user_message == "The queue is empty."


def test_move_both_directions() -> None:
    q = TrackQueue()
    q.add(tracks("a", "b", "c", "d"))
    assert q.move(0, 2).title == "a"
    assert titles(q.upcoming) == ["b", "c", "a", "d"]
    q.move(3, 0)
    assert titles(q.upcoming) == ["d", "b", "c", "a"]
    with pytest.raises(QueueError) as info:
        q.move(0, 4)
    assert "Position 5" in info.value.user_message
    assert titles(q.upcoming) == ["d", "b", "c", "a"]


def test_shuffle_is_a_permutation_and_seeded() -> None:
    q1, q2 = TrackQueue(), TrackQueue()
    batch = tracks(*"abcdefghij")
    q1.add(batch)
    q2.add(batch)
    q1.shuffle(random.Random(7))
    q2.shuffle(random.Random(7))
    assert q1.upcoming == q2.upcoming
    assert Counter(q1.upcoming) == Counter(batch)
    assert list(q1.upcoming) != batch  # seed 7 does move things


def test_clear_keeps_current_and_history() -> None:
    q = TrackQueue()
    q.add(tracks("a", "b", "c"))
    q.advance()
    q.advance()
    assert titles(q.clear()) == ["c"]
    assert q.current is not None
    assert q.current.title == "b"
    assert titles(q.history) == ["a"]
    assert q.upcoming == ()


def test_advance_off_moves_finished_to_history() -> None:
    q = TrackQueue()
    q.add(tracks("a", "b"))
    assert q.advance() is not None
    assert q.current is not None
    assert q.current.title == "a"
    assert q.peek_next() is not None
    assert q.peek_next() == q.upcoming[0]
    nxt = q.advance()
    assert nxt is not None
    assert nxt.title == "b"
    assert titles(q.history) == ["a"]
    assert q.peek_next() is None
    assert q.advance() is None
    assert q.current is None
    assert titles(q.history) == ["a", "b"]
    assert q.advance() is None


def test_loop_track_repeats_unless_skipped() -> None:
    q = TrackQueue()
    q.add(tracks("a", "b"))
    q.loop = LoopMode.TRACK
    first = q.advance()
    assert q.peek_next() is first
    assert q.advance() is first
    assert q.advance() is first
    assert q.history == ()
    skipped_to = q.advance(skip=True)
    assert skipped_to is not None
    assert skipped_to.title == "b"
    assert titles(q.history) == ["a"]


def test_loop_queue_cycles_and_previous_rotates_back() -> None:
    q = TrackQueue()
    q.add(tracks("a", "b", "c"))
    q.loop = LoopMode.QUEUE
    played = [q.advance() for _ in range(7)]
    assert [t.title for t in played if t is not None] == list("abcabca")
    assert q.history == ()
    assert titles(q.upcoming) == ["b", "c"]
    back = q.previous()
    assert back.title == "c"
    assert titles(q.upcoming) == ["a", "b"]


def test_loop_queue_with_single_track() -> None:
    q = TrackQueue()
    q.add(tracks("solo"))
    q.loop = LoopMode.QUEUE
    a = q.advance()
    assert q.peek_next() is a
    assert q.advance() is a
    assert q.upcoming == ()


def test_previous_goes_back_through_history() -> None:
    q = TrackQueue()
    q.add(tracks("a", "b", "c"))
    q.advance()
    q.advance()
    q.advance()  # current c, history a b
    assert q.previous().title == "b"
    assert titles(q.upcoming) == ["c"]
    assert titles(q.history) == ["a"]
    assert q.previous().title == "a"
    assert titles(q.upcoming) == ["b", "c"]
    with pytest.raises(QueueEmpty) as info:
        q.previous()
    assert info.value.user_message == "There is no previous track."
    assert q.current is not None
    assert q.current.title == "a"


def test_previous_after_queue_end_replays_last() -> None:
    q = TrackQueue()
    q.add(tracks("a"))
    q.advance()
    assert q.advance() is None
    assert q.previous().title == "a"
    assert q.upcoming == ()


def test_finish_current_moves_to_history() -> None:
    q = TrackQueue()
    q.add(tracks("a", "b"))
    q.advance()
    finished = q.finish_current()
    assert finished is not None
    assert finished.title == "a"
    assert q.current is None
    assert titles(q.history) == ["a"]
    assert titles(q.upcoming) == ["b"]
    assert q.finish_current() is None


def test_history_is_bounded_oldest_first_out() -> None:
    q = TrackQueue(history_length=2)
    q.add(tracks("a", "b", "c", "d"))
    for _ in range(4):
        q.advance()
    assert titles(q.history) == ["b", "c"]


def test_restored_history_is_bounded_and_previous_walks_it() -> None:
    q = TrackQueue(history_length=2)
    q.restore_history(tracks("a", "b", "c"))
    assert titles(q.history) == ["b", "c"]
    q.add(tracks("d"))
    q.advance()
    assert q.previous().title == "c"
    assert titles(q.upcoming) == ["d"]
    with pytest.raises(ValueError, match="already has a history"):
        q.restore_history(tracks("e"))
    assert titles(q.history) == ["b"]


def test_max_length_refuses_whole_batch() -> None:
    q = TrackQueue(max_length=3)
    q.add(tracks("a", "b"))
    with pytest.raises(QueueFull) as info:
        q.add(tracks("c", "d"))
    assert info.value.user_message == "Only 1 more track(s) fit in the queue (limit 3)."
    assert titles(q.upcoming) == ["a", "b"]
    with pytest.raises(QueueFull):
        q.add_next(tracks("x", "y"))
    q.add(tracks("c"))
    with pytest.raises(QueueFull) as full:
        q.add(tracks("e"))
    assert full.value.user_message == "The queue is full (3 tracks)."


def test_previous_refused_when_current_would_not_fit() -> None:
    q = TrackQueue(max_length=1)
    q.add(tracks("a"))
    q.advance()
    q.add(tracks("b"))  # current a, upcoming [b] (full)
    q.advance()  # current b, history [a], upcoming []
    q.add(tracks("c"))  # full again
    with pytest.raises(QueueFull):
        q.previous()
    assert q.current is not None
    assert q.current.title == "b"
    assert titles(q.upcoming) == ["c"]


def test_bad_limits_rejected() -> None:
    with pytest.raises(ValueError, match="max_length"):
        TrackQueue(max_length=-1)
    with pytest.raises(ValueError, match="history_length"):
        TrackQueue(history_length=-1)


# -- the state machine -------------------------------------------------------------------------


class QueueMachine(RuleBasedStateMachine):
    """Random operation sequences: no track is ever lost or duplicated, limits always hold."""

    def __init__(self) -> None:
        super().__init__()
        self.q = TrackQueue(max_length=6, history_length=3)
        self.made = 0
        self.added: Counter[Track] = Counter()
        self.gone: Counter[Track] = Counter()  # removed, cleared or evicted from the history

    def live(self) -> Counter[Track]:
        c: Counter[Track] = Counter(self.q.upcoming)
        c.update(self.q.history)
        if self.q.current is not None:
            c[self.q.current] += 1
        return c

    def fresh(self, n: int) -> list[Track]:
        out = []
        for _ in range(n):
            self.made += 1
            out.append(Track(url=f"t{self.made}", title=f"t{self.made}"))
        return out

    def note_eviction(self, before: Counter[Track]) -> None:
        lost = before - self.live()
        assert sum(lost.values()) <= 1, f"more than one track lost at once: {lost}"
        self.gone += lost

    @rule(n=st.integers(0, 4), front=st.booleans())
    def add(self, n: int, front: bool) -> None:
        batch = self.fresh(n)
        before = list(self.q.upcoming)
        try:
            positions = (self.q.add_next if front else self.q.add)(batch)
        except QueueFull:
            assert len(before) + n > 6
            assert list(self.q.upcoming) == before
            return
        self.added.update(batch)
        assert [self.q.upcoming[p] for p in positions] == batch

    @precondition(lambda self: len(self.q) > 0)
    @rule(data=st.data())
    def remove(self, data: st.DataObject) -> None:
        index = data.draw(st.integers(0, len(self.q) - 1))
        expected = self.q.upcoming[index]
        assert self.q.remove(index) == expected
        self.gone[expected] += 1

    @rule(index=st.integers(-2, 8))
    def remove_any(self, index: int) -> None:
        before = list(self.q.upcoming)
        if 0 <= index < len(before):
            self.gone[self.q.remove(index)] += 1
            return
        with pytest.raises(QueueError) as info:
            self.q.remove(index)
        assert str(index + 1) in info.value.user_message or not before
        assert list(self.q.upcoming) == before

    @rule(src=st.integers(-1, 7), dst=st.integers(-1, 7))
    def move(self, src: int, dst: int) -> None:
        before = list(self.q.upcoming)
        if 0 <= src < len(before) and 0 <= dst < len(before):
            moved = self.q.move(src, dst)
            assert self.q.upcoming[dst] == moved == before[src]
        else:
            with pytest.raises(QueueError):
                self.q.move(src, dst)
            assert list(self.q.upcoming) == before

    @rule(seed=st.integers(0, 1000))
    def shuffle(self, seed: int) -> None:
        before = Counter(self.q.upcoming)
        self.q.shuffle(random.Random(seed))
        assert Counter(self.q.upcoming) == before

    @rule()
    def clear(self) -> None:
        before = list(self.q.upcoming)
        assert self.q.clear() == before
        self.gone.update(before)

    @rule(mode=st.sampled_from(LoopMode))
    def set_loop(self, mode: LoopMode) -> None:
        self.q.loop = mode

    @rule(skip=st.booleans())
    def advance(self, skip: bool) -> None:
        before_live = self.live()
        current = self.q.current
        predicted = self.q.peek_next(skip=skip)
        result = self.q.advance(skip=skip)
        assert result == predicted
        assert result == self.q.current
        if current is not None and self.q.loop is LoopMode.TRACK and not skip:
            assert result is current
        if current is not None and self.q.loop is LoopMode.QUEUE:
            assert result is current or self.q.upcoming[-1] is current
        self.note_eviction(before_live)

    @rule()
    def previous(self) -> None:
        current = self.q.current
        before = list(self.q.upcoming)
        try:
            back = self.q.previous()
        except (QueueEmpty, QueueFull):
            assert self.q.current is current
            assert list(self.q.upcoming) == before
            return
        assert self.q.current is back
        if current is not None:
            assert self.q.upcoming[0] is current

    @rule()
    def finish(self) -> None:
        before_live = self.live()
        self.q.finish_current()
        assert self.q.current is None
        self.note_eviction(before_live)

    @invariant()
    def conserved(self) -> None:
        assert self.live() + self.gone == self.added

    @invariant()
    def no_duplicates(self) -> None:
        assert all(count == 1 for count in self.live().values())

    @invariant()
    def limits(self) -> None:
        assert len(self.q.upcoming) <= 6
        assert len(self.q.history) <= 3


QueueMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestQueueMachine = QueueMachine.TestCase
