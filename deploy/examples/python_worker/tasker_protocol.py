"""Tasker's wire protocol, version 1, for a worker in Python: no broker code here.

- `decode_step` reads a step message the way the Rust decoder does: unknown fields are
  ignored, anything the Rust worker would refuse raises `Poison` with the reason to
  dead-letter it with. `decode_batch` reads a batch of steps (AMQP `type` `steps`) with
  the same strictness, and `step_message_body` writes one of its steps as a step message
  of its own (to dead-letter it alone).
- `result_message`, `started_message` and `encode_result` write exactly what
  `docs/schemas/` describes, and turn a handler's answer that cannot travel or be stored
  (not JSON, NaN, over `max_result_bytes`, holding U+0000) into a permanent failure
  instead of a crash.
- `MessageKeys` signs and checks bodies like `protocol/src/signing.rs`.

Every limit and message text here mirrors the Rust worker, so an operator reads the same
thing whichever worker ran a step. docs/protocol.md is the contract.
"""
import hashlib
import hmac
import json
import re
from datetime import datetime, timezone

SCHEMA_VERSION = 1
STEP_BATCH_TYPE = "steps"  # the AMQP `type` of a batch of steps (protocol/src/messages.rs)
TRACEPARENT = "traceparent"  # a step message's header, a batched step's field
SIGNATURE_HEADER = "x-tasker-signature"
REASON_HEADER = "x-tasker-reason"
SOURCE_HEADER = "x-tasker-source-queue"
BAD_SIGNATURE = "bad_signature"
MIN_KEY_BYTES = 32  # protocol/src/signing.rs
MAX_WORKER_ID_LEN = 128  # protocol/src/messages.rs
MAX_REASON_BYTES = 1024  # x-tasker-reason, protocol/src/broker.rs
MAX_ERROR_MESSAGE_BYTES = 16 * 1024  # worker/src/executor.rs
DEFAULT_MAX_RESULT_BYTES = 1024 * 1024  # TASKER_MAX_RESULT_BYTES, worker/src/executor.rs
RESULT_TOO_LARGE = "result_too_large"  # the Rust worker's code
RESULT_NOT_STORABLE = "result_not_storable"  # the Rust worker's code: U+0000, or too deep
MAX_JSON_DEPTH = 100  # arrays and objects inside each other that Tasker carries, protocol/src/messages.rs
RESULT_NOT_JSON = "result_not_json"  # only this worker has it: serde cannot hold NaN

_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_WORKER_ID = re.compile(r"[A-Za-z0-9._:-]{1,%d}" % MAX_WORKER_ID_LEN)
_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})")
_I32, _I64, _U64 = 2**31, 2**63, 2**64


class Poison(Exception):
    """A step message (or batch of steps) that must not run; `str()` is the reason it is
    dead-lettered with."""


class BadSignature(Exception):
    """A message that does not verify (the texts are the Rust worker's)."""


def now():
    """RFC 3339, UTC, microseconds: 2025-10-09T08:53:20.210000Z."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def is_int(value):
    """A JSON integer: Python's bool is an int (True == 1), and 1.0 == 1, so check the type."""
    return type(value) is int


def valid_worker_id(worker_id):
    """`valid_worker_id` of protocol/src/messages.rs: 1 to 128 of [A-Za-z0-9._:-]."""
    return isinstance(worker_id, str) and _WORKER_ID.fullmatch(worker_id) is not None


def cut(text, max_bytes, note=False):
    """`text` in at most `max_bytes` of UTF-8, cut on a character boundary. With `note`, says
    it was cut, as the Rust worker's error messages do. Lone surrogates (which UTF-8 cannot
    carry, and which would make the message unencodable) are written as escapes."""
    data = text.encode("utf-8", "backslashreplace")
    if len(data) <= max_bytes:
        return data.decode("utf-8")
    kept = data[:max_bytes].decode("utf-8", "ignore")  # drops a split last character
    return kept + (f"… (cut: the message had {len(data)} bytes)" if note else "")


def describe(error):
    """`Type: message` of an exception, even one whose `__str__` raises."""
    try:
        text = str(error)
    except Exception:  # a handler's own exception class may be broken too
        text = "(its message could not be read)"
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


# --- decoding step messages -----------------------------------------------------------------
def _refuse_constant(name):
    raise ValueError(f"{name} is not JSON")


def _no_duplicates(pairs):
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"duplicate field `{key}`")
        seen[key] = value
    return seen


def _integer(low, high):
    return lambda v: is_int(v) and low <= v < high, f"an integer from {low} to {high - 1}"


_STRING = (lambda v: isinstance(v, str), "a string")
_UUID_STRING = (lambda v: isinstance(v, str) and _UUID.fullmatch(v) is not None, "a hyphenated UUID string")
_ANY = (lambda v: True, "any JSON value")
# The fields of docs/schemas/step.schema.json, with the checks of the Rust decoder (which
# refuses wrong types and out-of-range integers, and does not look at unknown fields).
STEP_FIELDS = {
    "task_id": _UUID_STRING,
    "step_id": _UUID_STRING,
    "step_name": _STRING,
    "namespace": _STRING,
    "template": _STRING,
    "handler": _STRING,
    "config": _ANY,
    "context": _ANY,
    "parents": (lambda v: isinstance(v, dict), "an object"),
    "attempt": _integer(-_I32, _I32),
    "retry_limit": _integer(-_I32, _I32),
    "dispatch_token": _UUID_STRING,
    "timeout_ms": _integer(-_I64, _I64),
    "dispatched_at": (lambda v: isinstance(v, str) and _RFC3339.fullmatch(v) is not None, "an RFC 3339 timestamp"),
}
OPTIONAL_STEP_FIELDS = {"deferrals": _integer(-_I32, _I32)}


def decode_step(body):
    """The step message in `body` (bytes) as a dict, or `Poison` with the reason.

    Refused, as the Rust worker refuses them: a body that is not UTF-8 JSON (NaN and
    Infinity are not JSON), not an object, with a duplicate or missing field, a field of
    the wrong type (`schema_version` must be an integer: `true` and `1.0` are not), ids
    that are not UUIDs, or a `schema_version` other than 1. Unknown fields are ignored.
    """
    step = _parse(body)
    if not isinstance(step, dict):
        raise Poison(f"undecodable message: a step message is a JSON object, not {type(step).__name__}")
    _check_step(step)
    _check_version(step["schema_version"])
    return step


def decode_batch(body):
    """The steps of the batch of steps in `body` (bytes), in order, as `(step, traceparent)`
    pairs: each step a dict as `decode_step` returns it (without its `traceparent`), the
    trace context a string or None. Raises `Poison` with the reason, as `StepBatch::decode`
    refuses the whole batch: a body `decode_step` would refuse for its form (not JSON, a
    duplicate field…), a batch that is not an object with an integer `schema_version` and
    a `steps` array, any step that `decode_step` would refuse, a `traceparent` that is not
    a string (null counts as absent), then a `schema_version` other than 1 on the batch or
    on any step, then a batch without steps. Unknown fields are ignored, in the batch and
    in each step.
    """
    batch = _parse(body)
    if not isinstance(batch, dict):
        raise Poison(f"undecodable message: a steps message is a JSON object, not {type(batch).__name__}")
    _check_fields(batch, {"schema_version": _VERSION, "steps": (lambda v: isinstance(v, list), "an array")})
    steps = []
    for i, step in enumerate(batch["steps"]):
        where = f"steps[{i}]"
        if not isinstance(step, dict):
            raise Poison(f"undecodable message: `{where}` must be a step (a JSON object), not {_show(step)}")
        _check_step(step, where + ".")
        trace = step.get(TRACEPARENT)
        if trace is not None and not isinstance(trace, str):
            raise Poison(f"undecodable message: `{where}.{TRACEPARENT}` must be a string, not {_show(trace)}")
        steps.append(({k: v for k, v in step.items() if k != TRACEPARENT}, trace))
    # As the Rust decoder: the versions once the whole batch has decoded, then emptiness.
    _check_version(batch["schema_version"])
    for step, _ in steps:
        _check_version(step["schema_version"])
    if not steps:
        raise Poison("a steps message without steps")
    return steps


# The fields of a step message in the order the Rust worker writes them (`StepMessage`).
STEP_MESSAGE_ORDER = ("schema_version", "task_id", "step_id", "step_name", "namespace", "template", "handler",
                      "config", "context", "parents", "attempt", "retry_limit", "deferrals", "dispatch_token",
                      "timeout_ms", "dispatched_at", "item", "index")


def step_message_body(step):
    """A step of a batch (a dict from `decode_batch`) written as a step message of its own,
    as the Rust worker writes it to dead-letter it alone: the fields of
    docs/schemas/step.schema.json in its order, `deferrals` 0 when absent, `item` and
    `index` only when present and not null; no `traceparent`, no field it does not know.
    The values are the step's own, unchanged. Publish it again, as it is, as a step
    message (no AMQP `type`)."""
    message = {name: step[name] for name in STEP_MESSAGE_ORDER if name in step}
    if message.get("deferrals") is None:
        message["deferrals"] = 0
    for name in ("item", "index"):
        if message.get(name) is None:
            message.pop(name, None)
    return encode({name: message[name] for name in STEP_MESSAGE_ORDER if name in message})


def _parse(body):
    """`body` as JSON, parsed as strictly as serde_json parses it; `Poison` if it is not."""
    try:
        value = json.loads(body.decode("utf-8"), parse_constant=_refuse_constant,
                           object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise Poison(f"undecodable message: {error}") from None
    try:  # serde refuses a lone surrogate ("\ud800"), which UTF-8 cannot carry; json does not
        encode(value)
    except (ValueError, RecursionError) as error:
        raise Poison(f"undecodable message: {error}") from None
    return value


_VERSION = _integer(0, 2**32)


def _check_step(step, where=""):
    """Every field of a step message (`where` names a step of a batch in the reasons)."""
    _check_fields(step, {"schema_version": _VERSION, **STEP_FIELDS}, where)
    for name, (check, what) in OPTIONAL_STEP_FIELDS.items():
        if step.get(name) is not None and not check(step[name]):
            raise Poison(f"undecodable message: `{where}{name}` must be {what}, not {_show(step[name])}")


def _check_fields(message, fields, where=""):
    for name, (check, what) in fields.items():
        if name not in message:
            raise Poison(f"undecodable message: missing field `{where}{name}`")
        if not check(message[name]):
            raise Poison(f"undecodable message: `{where}{name}` must be {what}, not {_show(message[name])}")


def _check_version(version):
    if version != SCHEMA_VERSION:
        raise Poison(f"unsupported schema_version {version} (this build speaks {SCHEMA_VERSION})")


def _show(value):
    return cut(json.dumps(value), 100)


# --- writing worker messages ----------------------------------------------------------------
def encode(message):
    """Compact UTF-8 JSON, as serde_json writes it. Raises ValueError (NaN, Infinity, a
    circular reference, a lone surrogate), TypeError (a set, bytes, an object) or
    RecursionError (nesting too deep) for what cannot be sent."""
    return json.dumps(message, allow_nan=False, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _check_int(text):
    value = int(text)
    if not -_I64 <= value < _U64:  # serde_json reads larger ones as lossy floats, or refuses them
        shown = text if len(text) <= 40 else f"of {len(text)} digits"
        raise ValueError(f"the integer {shown} does not fit in 64 bits")
    return value


def result_message(step, worker_id, outcome, started_at, finished_at, results=None, error=None):
    """A `result` (docs/schemas/result.schema.json). `error` is `(message, code)`; `results`
    goes in only on success."""
    message = {"type": "result", "schema_version": SCHEMA_VERSION, "task_id": step["task_id"],
               "step_id": step["step_id"], "dispatch_token": step["dispatch_token"], "outcome": outcome}
    if outcome == "success":
        message["results"] = results
    elif error is not None:
        text, code = error
        # PostgreSQL cannot store U+0000: replaced, as the Rust worker does.
        message["error"] = {"message": cut(text.replace("\0", "\ufffd"), MAX_ERROR_MESSAGE_BYTES, note=True)}
        if code is not None:
            message["error"]["code"] = code.replace("\0", "\ufffd")
    message.update(started_at=started_at, finished_at=finished_at, worker_id=worker_id)
    return message


def started_message(worker_id, step, started_at, redelivered):
    """A `started` notice for one step (docs/schemas/started.schema.json)."""
    notice = {"step_id": step["step_id"], "dispatch_token": step["dispatch_token"],
              "started_at": started_at, "redelivered": bool(redelivered)}
    return {"type": "started", "schema_version": SCHEMA_VERSION, "worker_id": worker_id, "steps": [notice]}


def nul_pointers(value, limit=5):
    """The JSON pointers of the first `limit` strings and keys in `value` that hold U+0000,
    which PostgreSQL cannot store (`nul_pointers` of protocol/src/messages.rs)."""
    found, pending = [], [("", value)]
    while pending and len(found) < limit:
        pointer, value = pending.pop()
        if isinstance(value, str) and "\0" in value:
            found.append(pointer)
        elif isinstance(value, list):
            pending.extend((f"{pointer}/{i}", item) for i, item in reversed(list(enumerate(value))))
        elif isinstance(value, dict):
            for key, item in reversed(list(value.items())):
                child = f"{pointer}/{key.replace('~', '~0').replace('/', '~1')}"
                if "\0" in key:
                    found.append(child)
                pending.append((child, item))
    return found[:limit]


def nests_deeper_than(value, limit):
    """Whether `value` holds more than `limit` lists and dicts inside each other
    (`nests_deeper_than` of protocol/src/messages.rs)."""
    pending = [(value, 1)]
    while pending:
        value, depth = pending.pop()
        if isinstance(value, (list, dict)):
            if depth > limit:
                return True
            pending.extend((item, depth + 1) for item in (value.values() if isinstance(value, dict) else value))
    return False


def results_problem(results, max_result_bytes):
    """Why a handler's results cannot be sent, as `(message, code)`, or None if they can."""
    try:
        text = encode(results)
        sent = json.loads(text, parse_int=_check_int)  # what the coordinator will read
    except (ValueError, TypeError, RecursionError) as error:
        return (f"the handler's result cannot be sent as JSON ({describe(error)}); return only "
                "dicts with string keys, lists, strings, booleans, None, finite floats and "
                "integers of at most 64 bits", RESULT_NOT_JSON)
    if len(text) > max_result_bytes:
        return (f"the handler's result is {len(text)} bytes of JSON, over this worker's limit of "
                f"{max_result_bytes} bytes (TASKER_MAX_RESULT_BYTES); return less, or store the "
                "data elsewhere and return a reference to it", RESULT_TOO_LARGE)
    if nests_deeper_than(sent, MAX_JSON_DEPTH):
        return (f"the handler's result nests arrays and objects more than {MAX_JSON_DEPTH} levels deep, "
                "more than Tasker carries", RESULT_NOT_STORABLE)
    found = nul_pointers(sent)
    if found:
        where = ", ".join(p if p else "the top (the result is that string)" for p in found)
        return (f"the handler's result holds a NUL character (U+0000), which cannot be stored, at {where}",
                RESULT_NOT_STORABLE)
    return None


def encode_result(message, max_result_bytes):
    """`(message, body)` of a result: a success whose results cannot be sent becomes a
    `permanent_error` saying why (another attempt would return the same thing)."""
    if message["outcome"] == "success":
        problem = results_problem(message["results"], max_result_bytes)
        if problem is not None:
            message = {k: v for k, v in message.items() if k != "results"}
            # The message names a key that may itself hold U+0000.
            text = problem[0].replace("\0", "\ufffd")
            message.update(outcome="permanent_error",
                           error={"message": cut(text, MAX_ERROR_MESSAGE_BYTES, note=True), "code": problem[1]})
    return message, encode(message)


# --- signatures -----------------------------------------------------------------------------
class MessageKeys:
    """TASKER_MESSAGE_KEY and TASKER_MESSAGE_KEY_PREVIOUS. With a key, every message this
    worker publishes (results, started notices; not dead letters) carries
    `x-tasker-signature: v1=<hex HMAC-SHA256 of the exact body bytes>`, and a step message
    or batch of steps (over its whole body) is accepted only if its signature verifies
    under one of the two keys."""

    def __init__(self, current=None, previous=None):
        def read(name, value):
            value = (value or "").strip()  # empty counts as unset, like the Rust settings
            if not value:
                return None
            key = value.encode("utf-8")
            if len(key) < MIN_KEY_BYTES:
                raise ValueError(f"{name} must be at least {MIN_KEY_BYTES} bytes (it has {len(key)}); "
                                 "use e.g. `openssl rand -hex 32`")
            return key
        self.current = read("TASKER_MESSAGE_KEY", current)
        self.previous = read("TASKER_MESSAGE_KEY_PREVIOUS", previous)
        if self.current is None and self.previous is not None:
            raise ValueError("TASKER_MESSAGE_KEY_PREVIOUS is set but TASKER_MESSAGE_KEY is not")

    def __repr__(self):  # never print a key
        return f"MessageKeys(current={'***' if self.current else None}, previous={'***' if self.previous else None})"

    @property
    def enabled(self):
        return self.current is not None

    def sign(self, body, headers=None):
        """`headers` (a new dict) with the signature of `body` when there is a key."""
        headers = dict(headers or {})
        if self.current is not None:
            headers[SIGNATURE_HEADER] = "v1=" + hmac.new(self.current, body, hashlib.sha256).hexdigest()
        return headers

    def verify(self, body, headers):
        """Return if `body` verifies (always, without a key); raise `BadSignature` if not."""
        if self.current is None:
            return
        value = (headers or {}).get(SIGNATURE_HEADER)
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        if not isinstance(value, str):
            raise BadSignature(f"the message is not signed ({SIGNATURE_HEADER} missing)")
        mismatch = BadSignature("the message's signature does not verify with TASKER_MESSAGE_KEY "
                                "or TASKER_MESSAGE_KEY_PREVIOUS")
        if not value.startswith("v1="):
            raise mismatch
        try:
            tag = bytes.fromhex(value[3:])
        except ValueError:
            raise mismatch from None
        for key in (self.current, self.previous):
            # compare_digest takes the same time wherever the two differ.
            if key is not None and hmac.compare_digest(hmac.new(key, body, hashlib.sha256).digest(), tag):
                return
        raise mismatch
