"""The one layer every stage calls a model through: ledger, cache keys, costs and budget, the ledgered call.

Generation, the teacher's evaluation answers, students being evaluated, judges and audit
probes all go through `call_models`; no stage calls a backend directly or imports another
stage to reach one.
"""

from stillhouse.calls.call import CallBatch, ModelRef, call_models, teacher_ref
from stillhouse.calls.costs import Budget, Price, price_for
from stillhouse.calls.keys import derive_seed, request_key
from stillhouse.calls.ledger import Ledger

__all__ = ["Budget", "CallBatch", "Ledger", "ModelRef", "Price", "call_models", "derive_seed", "price_for",
           "request_key", "teacher_ref"]
