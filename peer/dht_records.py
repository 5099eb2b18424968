"""The DHT's record validator: only Barnraise's signed records enter a node's storage.

hivemind calls ``validate`` in the DHT process when another node asks this one to store a
record and when a node answers a lookup, so junk, records stored under another peer's id,
oversized values and values pinned for longer than their kind allows are dropped at every hop
(``protocol.policy.dht_record_problem`` decides; this adapter only unpacks hivemind's encoding).
"""

from __future__ import annotations

from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils import MSGPackSerializer
from hivemind.utils.timed_storage import get_dht_time

from protocol.policy import Admission, dht_record_problem
from protocol.records import SEALED_BYTES

__all__ = ["SignedRecordValidator"]

_ENVELOPE_BYTES = 64
"""hivemind's msgpack framing around a record's bytes."""


class SignedRecordValidator(RecordValidatorBase):
    """``admission``: a private run's gate (records sealed with their signer's join token), set when
    the node learns its run (``SwarmNode.admit``); None for a public run."""

    def __init__(self, admission: Admission | None = None):
        self.admission = admission

    def validate(self, record: DHTRecord) -> bool:
        if len(record.value) > SEALED_BYTES + _ENVELOPE_BYTES or len(record.subkey) > 64:
            return False
        try:
            raw = MSGPackSerializer.loads(record.value)
            subkey = MSGPackSerializer.loads(record.subkey)
        except Exception:  # hivemind's decoder raises many types on bad bytes: a refusal either way
            return False
        if subkey is not None and not isinstance(subkey, str):
            return False
        return dht_record_problem(subkey, raw, record.expiration_time, get_dht_time(), self.admission) is None
