"""Which request records already have their answer on the results topic.

Offsets are committed after the answer is published, so a worker that dies in between leaves
records that are answered but not committed, and whoever gets the partition receives them again.
Running such a record again would replace its answer (a cancel that arrived meanwhile would even
turn a success into ``cancelled``).  Every result carries, in its ``x-tako-source`` header, the
position of the request record it answers; this index keeps the newest of them per execution
id, read from the results topic, and the intake skips a record whose position is already there.

The records at risk are the few answered in the last commit interval before a crash, so the
index starts ``window`` records before the end of each results partition and keeps at most
``keep`` ids.  A request produced again on purpose (a DLQ replay, a resubmission) sits at
another position and runs as it should.
"""

from __future__ import annotations

import asyncio
import logging

from aiokafka import TopicPartition
from aiokafka.errors import KafkaError

from tako_stream.kafka.reader import Record, TopicReader
from tako_stream.kafka.view import KeyedView
from tako_stream.logs import Condition
from tako_stream.settings import Settings

log = logging.getLogger(__name__)

#: The header naming the request record a result answers: ``topic:partition:offset``.
SOURCE_HEADER = "x-tako-source"
#: Longest execution id (the request model's) and position (a 249-byte topic name, two numbers).
MAX_ID, MAX_POSITION = 128, 300


def answered_position(record: Record) -> tuple[str, str] | None:
    """(execution id, position) of a result record, None for one that names none.  Anyone may
    write to the results topic: a key or header that is not UTF-8 or is too long to be ours is
    skipped, never raised on (the worker would stop, and stop again on every restart while the
    record is within the index's window)."""
    if record.key is None or len(record.key) > MAX_ID:
        return None
    source = next((v for k, v in record.headers or () if k == SOURCE_HEADER), None)
    if source is None or len(source) > MAX_POSITION:
        return None
    return record.key.decode("utf-8", "replace"), source.decode("utf-8", "replace")


class AnsweredIndex:
    """Execution id → position of the request its newest result answered."""

    def __init__(self, settings: Settings, *, window: int = 20_000, keep: int = 200_000) -> None:
        self.settings = settings
        self.window = window
        self._positions: KeyedView[str] = KeyedView(
            lambda raw: raw.decode("utf-8", "replace"), keep=keep, name="answered index"
        )
        self._reached: dict[TopicPartition, int] = {}
        self._progress = asyncio.Event()
        #: Set once the index has read up to where the results topic ended when it started.
        self.caught_up = asyncio.Event()

    def answered(self, execution_id: str, position: str) -> bool:
        """Whether the request record at ``position`` was answered under ``execution_id``."""
        return self._positions.get(execution_id) == position

    def has_answer(self, execution_id: str) -> bool:
        """Whether ``execution_id`` has an answer, whichever record it answered."""
        return execution_id in self._positions

    def record(self, execution_id: str, position: str) -> None:
        """Note an answer this worker just published (before the index reads it back)."""
        self._positions.put(execution_id, position)

    async def wait_until_current(self, timeout: float) -> bool:
        """Wait (at most ``timeout``) until the index has read every result published so far;
        whether it got there."""
        try:
            async with asyncio.timeout(timeout):
                async with TopicReader(self.settings, self.settings.results_topic) as reader:
                    end = await reader.end_offsets()
                while not all(self._reached.get(tp, 0) >= offset for tp, offset in end.items()):
                    self._progress.clear()
                    await self._progress.wait()
        except (TimeoutError, KafkaError, LookupError) as exc:
            log.warning("the answered index is not current (%r); re-deliveries may run again", exc)
            return False
        return True

    async def run(self) -> None:
        """Follow the results topic forever (a broker fault starts over)."""
        failing = Condition("reading the results topic (starting over every second)", log)
        while True:
            try:
                await self._follow(failing)
            except (KafkaError, LookupError, OSError) as exc:
                failing.wrong(exc)
                await asyncio.sleep(1)

    async def _follow(self, failing: Condition) -> None:
        topic = self.settings.results_topic
        follow = self.settings.follow_wait_ms  # its own answers it notes at once
        async with TopicReader(
            self.settings, topic, wait_for_topic=1.0, fetch_max_wait_ms=follow
        ) as reader:
            failing.right()
            end = await reader.end_offsets()
            await reader.from_offsets({tp: max(0, end[tp] - self.window) for tp in end})
            while True:
                for record in await reader.fetch(timeout=1.0):
                    answered = answered_position(record)
                    if answered is not None:
                        self._positions.put(*answered)
                for tp in reader.partitions:
                    self._reached[tp] = await reader.position(tp)
                self._progress.set()
                if not self.caught_up.is_set() and await reader.reached(end):
                    self.caught_up.set()
