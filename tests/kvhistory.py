"""Recording histories of txns and ranges through KVClient, for the checker (pyraft.checker)."""
from __future__ import annotations

import random
import threading

from pyraft.checker import HistoryRecorder
from pyraft.errors import Timeout
from pyraft.kv import KVClient


def rows(kv: KVClient, prefix: str) -> list:
    """A prefix range as the checker records it: ``[(key, value), ...]``."""
    return [(x.key, x.value) for x in kv.range(prefix, prefix=True)]


def transfer_client(kv: KVClient, rec: HistoryRecorder, cid: int, accounts: list[str], stop: threading.Event,
                    errors: list, prefix: str = "acct/") -> None:
    """Until ``stop``: read every account (a range), move a random amount between two of them with a txn
    that holds only if both still have the values read (else it gets the first), sometimes only read."""
    rng = random.Random(cid)
    try:
        while not stop.is_set():
            try:
                have = dict(rec.record(cid, "range", prefix, (None, True, 0), lambda: rows(kv, prefix)))
                if rng.random() < 0.3:
                    continue
                frm, to = rng.sample(accounts, 2)
                amount = rng.randrange(1, 10)
                compare = ((frm, "value", "==", have[frm]), (to, "value", "==", have[to]))
                success = (("put", frm, have[frm] - amount), ("put", to, have[to] + amount))
                failure = (("get", frm),)

                def run():
                    r = kv.txn([{"key": k, "target": t, "op": o, "value": v} for k, t, o, v in compare],
                               [{"op": "put", "key": k, "value": v} for _op, k, v in success],
                               [{"op": "get", "key": k} for _op, k in failure])
                    return r.succeeded, tuple(None if x is None else getattr(x, "value", x) for x in r.responses)
                rec.record(cid, "txn", None, (compare, success, failure), run)
            except Timeout:
                pass
    except BaseException as e:  # noqa: BLE001 - the test reports it
        errors.append(e)
