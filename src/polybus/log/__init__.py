"""The native log engine: segments, CRC-checked batches, recovery, groups.

It imports no broker client. See :class:`Log` for the entry point, and
:meth:`Consumer.transaction` for appends and acks committed together. Code outside
the engine imports only this package's names: :func:`encode_batch` and
:func:`encode_one` encode what :meth:`Partition.append_encoded` appends.
"""

from ..model import check_name
from .engine import Log, Topic, TopicConfig
from .format import Record, encode_batch, encode_one
from .group import Consumer
from .partition import FsyncPolicy, Partition
from .producer import Producer
from .transaction import Transaction

__all__ = [
    "Consumer",
    "FsyncPolicy",
    "Log",
    "Partition",
    "Producer",
    "Record",
    "Topic",
    "TopicConfig",
    "Transaction",
    "check_name",
    "encode_batch",
    "encode_one",
]
