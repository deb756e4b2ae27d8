"""Dead letters: requests the system could not run, kept with everything needed to replay them.

``records`` builds a DLQ record from a consumed request and its failed answer; ``views`` holds
the DLQ in memory (whole, or as a bounded view); ``topic`` reads, deletes and replays entries.
The DLQ topic is the only store: compacted, keyed by ``dlq_id``, never expired.
"""

from tako_stream.dlq.records import (
    DEAD_LETTER_TYPES,
    H_ATTEMPTS,
    H_DLQ_ID,
    H_ERROR_MESSAGE,
    H_ERROR_TYPE,
    H_EXECUTION_ID,
    H_ORIGINAL_OFFSET,
    H_ORIGINAL_PARTITION,
    H_ORIGINAL_TOPIC,
    H_WORKER,
    MAX_ORIGINAL_BYTES,
    MAX_ORIGINAL_HEADERS,
    MAX_ORIGINAL_KEY,
    REPLAY_COUNT_HEADER,
    DeadLetter,
    dead_letter,
    dlq_id,
    parse_time,
    refusal,
    replay_count,
    replay_message,
    summarise,
    tombstone_headers,
)
from tako_stream.dlq.topic import (
    ReplayOutcome,
    delete,
    find,
    follow,
    lookup,
    read_store,
    remove,
    replay,
)
from tako_stream.dlq.views import DLQStore, DLQView

__all__ = [
    "DEAD_LETTER_TYPES",
    "H_ATTEMPTS",
    "H_DLQ_ID",
    "H_ERROR_MESSAGE",
    "H_ERROR_TYPE",
    "H_EXECUTION_ID",
    "H_ORIGINAL_OFFSET",
    "H_ORIGINAL_PARTITION",
    "H_ORIGINAL_TOPIC",
    "H_WORKER",
    "MAX_ORIGINAL_BYTES",
    "MAX_ORIGINAL_HEADERS",
    "MAX_ORIGINAL_KEY",
    "REPLAY_COUNT_HEADER",
    "DLQStore",
    "DLQView",
    "DeadLetter",
    "ReplayOutcome",
    "dead_letter",
    "delete",
    "dlq_id",
    "find",
    "follow",
    "lookup",
    "parse_time",
    "read_store",
    "refusal",
    "remove",
    "replay",
    "replay_count",
    "replay_message",
    "summarise",
    "tombstone_headers",
]
