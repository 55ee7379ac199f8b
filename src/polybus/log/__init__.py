"""The native log engine: segments, CRC-checked batches, recovery, groups.

It imports no broker client. See :class:`Log` for the entry point, and
:meth:`Consumer.transaction` for appends and acks committed together.
"""

from ..model import check_name
from .engine import Log, Topic, TopicConfig
from .format import Record
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
]
