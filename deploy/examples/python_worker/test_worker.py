"""Unit tests of the Python worker, without a broker: the worker runs against fake pika
channels that record what it publishes, acks and nacks. It is fed step messages and
batches of steps (AMQP `type` `steps`), good and poison.

Every message it publishes to the results queue (results and started notices) is checked
against docs/schemas/ with format assertion on (`uuid`, `date-time`), and for exactness:
no property the schema does not list (docs/protocol.md, "producers exact").

Run from anywhere: python3 -m unittest discover -s deploy/examples/python_worker
(needs requirements-test.txt). tests/tests/python_worker.rs runs it too.
"""
import hashlib
import hmac
import itertools
import json
import logging
import pathlib
import types
import unittest
from unittest import mock

import jsonschema
import pika

import tasker_protocol as protocol
import worker

SCHEMAS = pathlib.Path(__file__).resolve().parents[3] / "docs" / "schemas"
KEY = "the-current-message-key-of-this-test-0001"
OLD = "the-previous-message-key-of-this-test-002"
TASK, STEP, TOKEN = ("0199c7a2-4b1e-7c3d-9a55-3e1f0b6d2c01", "0199c7a2-4b1f-7a10-8e2b-6f4c1d9e3a02",
                     "6f1d3c2a-8b4e-4f7a-9c21-0d5e7b8a9f13")
QUEUE = "tasker.steps.mixed"
ORDER = itertools.count()  # publishes across channels, in the order they happened


def step_message(**changes):
    """The step of docs/protocol.md, with `changes` (a value of `...` removes the field)."""
    step = {"schema_version": 1, "task_id": TASK, "step_id": STEP, "step_name": "b", "namespace": "mixed",
            "template": "relay@1.0.0", "handler": "python.greet", "config": {}, "context": {"who": "you"},
            "parents": {"a": {}}, "attempt": 1, "retry_limit": 3, "deferrals": 0, "dispatch_token": TOKEN,
            "timeout_ms": 30000, "dispatched_at": "2025-10-09T08:53:20.123456Z"}
    step.update(changes)
    return {k: v for k, v in step.items() if v is not ...}


def batched_step(n, **changes):
    """Step `n` of a batch: its own ids, a `step_name` of `s<n>`."""
    return step_message(**{"step_id": f"0199c7a2-4b1f-7a10-8e2b-6f4c1d9e3a{n:02d}",
                           "dispatch_token": f"6f1d3c2a-8b4e-4f7a-9c21-0d5e7b8a9f{n:02d}",
                           "step_name": f"s{n}", **changes})


def batch_of(*steps, **changes):
    """The body of a batch of `steps`, with `changes` (a value of `...` removes the field)."""
    batch = {"schema_version": 1, "steps": list(steps), **changes}
    return json.dumps({k: v for k, v in batch.items() if v is not ...}).encode()


def deeply_nested():
    value = []
    for _ in range(100000):
        value = [value]
    return value


def body_of(step):
    return json.dumps(step).encode()


class FakeChannel:
    def __init__(self):
        self.published, self.acked, self.nacked, self.consumers = [], [], [], {}
        self.consumer_tags, self.refuse = [], False  # refuse: True, or refuse(exchange, body)
        self.settled = []  # (seq, tag, "ack" | "nack") in the order of ORDER

    def basic_qos(self, prefetch_count):
        self.prefetch = prefetch_count

    def confirm_delivery(self):
        pass

    def exchange_declare(self, *args, **kwargs):
        pass

    def queue_declare(self, *args, **kwargs):
        pass

    def queue_bind(self, *args, **kwargs):
        pass

    def basic_consume(self, queue, callback, auto_ack):
        assert auto_ack is False
        self.consumers[queue] = callback

    def basic_publish(self, exchange, routing_key, body, properties, mandatory=False):
        assert isinstance(body, bytes), "the worker publishes the bytes it signed"
        if self.refuse is True or (callable(self.refuse) and self.refuse(exchange, body)):
            raise pika.exceptions.NackError([])
        self.published.append(types.SimpleNamespace(exchange=exchange, routing_key=routing_key, body=body,
                                                    properties=properties, mandatory=mandatory, seq=next(ORDER)))

    def basic_ack(self, tag):
        self.acked.append(tag)
        self.settled.append((next(ORDER), tag, "ack"))

    def basic_nack(self, tag, requeue):
        self.nacked.append((tag, requeue))
        self.settled.append((next(ORDER), tag, "nack"))


class FakeConnection:
    def __init__(self):
        self.channels = []

    def channel(self):
        self.channels.append(FakeChannel())
        return self.channels[-1]


def settings(**env):
    return worker.Settings({"TASKER_NAMESPACES": "mixed", "TASKER_WORKER_ID": "py-test", **env})


class WorkerTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        checker = jsonschema.Draft202012Validator.FORMAT_CHECKER
        missing = {"uuid", "date-time"} - set(checker.checkers)
        assert not missing, f"jsonschema cannot check {missing}: pip install -r requirements-test.txt"
        cls.schemas = {}
        for kind in ("result", "started", "heartbeat"):
            schema = json.loads((SCHEMAS / f"{kind}.schema.json").read_text())
            jsonschema.Draft202012Validator.check_schema(schema)
            cls.schemas[kind] = (schema, jsonschema.Draft202012Validator(schema, format_checker=checker))

    def setUp(self):
        worker.REQUEUE_PAUSE = 0
        worker.log.disabled = True  # the worker's warnings about the poison these tests feed it
        self.start()

    def start(self, handlers=None, **env):
        self.connection = FakeConnection()
        self.worker = worker.Worker(self.connection, settings(**env), handlers)
        self.steps, self.results, self.notices = self.connection.channels
        self.tag = 0

    def tearDown(self):
        for message in self.sent():  # every message published to the coordinators
            self.check_schema(json.loads(message.body))

    def check_schema(self, message):
        schema, validator = self.schemas[message["type"]]
        errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(message)]
        self.assertEqual(errors, [], message)
        # Producers exact: no property the schema does not list, at any level.
        self.assertLessEqual(set(message), set(schema["properties"]), message)
        if "error" in message:
            self.assertLessEqual(set(message["error"]), set(schema["$defs"]["step_error"]["properties"]))
        for entry in message.get("steps", []):
            self.assertLessEqual(set(entry), set(schema["properties"]["steps"]["items"]["properties"]))

    def deliver(self, body, headers=None, routing_key="mixed", redelivered=False, kind=None):
        """Hand `body` to the consumer of the `mixed` queue, as pika does; `kind` is the AMQP
        `type` property (`steps` on a batch of steps)."""
        self.tag += 1
        delivery = types.SimpleNamespace(delivery_tag=self.tag, redelivered=redelivered, routing_key=routing_key)
        self.steps.consumers[QUEUE](self.steps, delivery, pika.BasicProperties(headers=headers, type=kind), body)
        return self.tag

    def sent(self):
        """What went to the results queue (notices and results), in order."""
        sent = [m for ch in (self.results, self.notices) for m in ch.published
                if m.exchange == "" and m.routing_key == "tasker.results"]
        return sorted(sent, key=lambda m: m.seq)

    def result(self):
        results = self.results_sent()
        self.assertEqual(len(results), 1, results)
        return results[0]

    def results_sent(self):
        return [json.loads(m.body) for m in self.sent() if json.loads(m.body)["type"] == "result"]

    def dead_letters(self):
        return [m for m in self.results.published if m.exchange == "tasker.dlx"]

    def assert_dead_lettered(self, body, reason_start, **deliver):
        before = len(self.dead_letters())
        tag = self.deliver(body, **deliver)
        letters = self.dead_letters()[before:]
        self.assertEqual(len(letters), 1, f"{body!r} was not dead-lettered")
        letter = letters[0]
        self.assertEqual(letter.body, body, "a dead letter is the original body, byte for byte")
        reason = letter.properties.headers["x-tasker-reason"]
        self.assertTrue(reason.startswith(reason_start), f"{body!r}: {reason!r}")
        self.assertLessEqual(len(reason.encode()), 1024)
        self.assertEqual(letter.properties.headers["x-tasker-source-queue"], QUEUE)
        self.assertEqual(letter.routing_key, "")
        self.assertEqual(letter.properties.delivery_mode, 2)
        self.assertNotIn("x-tasker-signature", letter.properties.headers, "dead letters are not signed")
        self.assertIn(tag, self.steps.acked, "acked once the copy is confirmed")
        return reason

    # --- the happy path ------------------------------------------------------------------
    def test_a_step_runs_and_its_notice_and_result_are_exact(self):
        tag = self.deliver(body_of(step_message()), headers={"traceparent": "00-abc-def-01"}, redelivered=True)
        notice, result = (json.loads(m.body) for m in self.sent())
        self.assertEqual(notice["type"], "started")
        self.assertEqual(notice["steps"][0]["redelivered"], True)
        self.assertEqual(result["outcome"], "success")
        self.assertEqual(result["results"], {"greeting": "hello you", "parents": ["a"]})
        self.assertEqual((result["task_id"], result["step_id"], result["dispatch_token"]), (TASK, STEP, TOKEN))
        self.assertEqual(self.steps.acked, [tag])
        published = self.results.published[0]
        self.assertTrue(published.mandatory)
        self.assertEqual(published.properties.headers, {"traceparent": "00-abc-def-01"})
        self.assertEqual(published.properties.content_type, "application/json")
        self.assertEqual(published.properties.delivery_mode, 2)

    def test_unknown_fields_are_ignored_and_deferrals_may_be_absent(self):
        self.deliver(body_of(step_message(deferrals=..., some_new_field={"x": 1})))
        self.assertEqual(self.result()["outcome"], "success")

    # --- poison messages -------------------------------------------------------------------
    def test_a_schema_version_must_be_the_integer_1(self):
        for version, reason in [
            (True, "undecodable message: `schema_version` must be an integer"),
            (1.0, "undecodable message: `schema_version` must be an integer"),
            ("1", "undecodable message: `schema_version` must be an integer"),
            (None, "undecodable message: `schema_version` must be an integer"),
            (..., "undecodable message: missing field `schema_version`"),
            (2, "unsupported schema_version 2 (this build speaks 1)"),
            (0, "unsupported schema_version 0 (this build speaks 1)"),
        ]:
            with self.subTest(version=version):
                self.assert_dead_lettered(body_of(step_message(schema_version=version)), reason)
        self.assertEqual(self.sent(), [], "no result and no notice for a message that cannot be trusted")

    def test_ids_must_be_uuid_strings(self):
        for field in ("task_id", "step_id", "dispatch_token"):
            for value in ["not-a-uuid", 42, None, "{%s}" % STEP, STEP.replace("-", ""), STEP + "\n", ...]:
                with self.subTest(field=field, value=value):
                    self.assert_dead_lettered(body_of(step_message(**{field: value})), "undecodable message:")
        self.assertEqual(self.sent(), [])

    def test_fields_of_the_wrong_type_are_refused(self):
        for field, value in [("attempt", True), ("attempt", 1.5), ("attempt", 2**31), ("timeout_ms", "1000"),
                             ("handler", 7), ("parents", []), ("deferrals", "0"), ("dispatched_at", "yesterday"),
                             ("config", ...), ("step_name", ...)]:
            with self.subTest(field=field, value=value):
                self.assert_dead_lettered(body_of(step_message(**{field: value})), "undecodable message:")
        self.assertEqual(self.sent(), [])

    def test_bodies_that_are_not_json_are_dead_lettered_without_crashing(self):
        good = json.dumps(step_message())
        for body in [b"", b"not json", b"\xff\xfe", b"[1, 2]", b"null",
                     good.replace('"attempt": 1', '"attempt": NaN').encode(),
                     good.replace('"config": {}', '"config": Infinity').encode(),
                     good.replace('"step_name": "b"', '"step_name": "b", "step_name": "c"').encode(),
                     good.replace('"config": {}', '"config": "\\ud800"').encode(),
                     good.replace('"config": {}', '"config": ' + "[" * 100000 + "]" * 100000).encode()]:
            with self.subTest(body=body[:60]):
                self.assert_dead_lettered(body, "undecodable message:")
        self.assertEqual(self.sent(), [])

    def test_the_source_queue_is_the_consumed_queue_whichever_exchange_it_came_through(self):
        # Through `tasker.steps` the routing key is the namespace; through the default
        # exchange it is the queue's own name. Both name the queue it was consumed from.
        for routing_key in ("mixed", QUEUE):
            with self.subTest(routing_key=routing_key):
                self.assert_dead_lettered(b"{", "undecodable message:", routing_key=routing_key)

    def test_a_long_reason_is_cut_to_1024_bytes_on_a_character_boundary(self):
        reason = self.assert_dead_lettered(body_of(step_message(handler="é" * 2000)), "unknown handler `éé")
        self.assertEqual(self.result()["error"]["code"], "unknown_handler")
        reason.encode("utf-8")  # whole characters only

    def test_an_unknown_handler_fails_the_step_then_is_dead_lettered(self):
        self.assert_dead_lettered(body_of(step_message(handler="python.nope")),
                                  "unknown handler `python.nope`; this worker has: python.greet, python.sum")
        result = self.result()
        self.assertEqual(result["outcome"], "permanent_error")
        self.assertEqual(result["error"]["code"], "unknown_handler")
        self.assertEqual(result["started_at"], result["finished_at"])
        self.assertEqual([m.exchange for m in self.results.published], ["", "tasker.dlx"], "result first")

    # --- results that cannot travel ---------------------------------------------------------
    def run_handler(self, answer, **env):
        def handler(step):
            if isinstance(answer, BaseException):
                raise answer
            return answer() if callable(answer) else answer
        self.start({"python.test": handler}, **env)
        tag = self.deliver(body_of(step_message(handler="python.test")))
        self.assertEqual(self.steps.acked, [tag], "the step is answered and acked, never left hanging")
        return self.result()

    def test_results_json_cannot_carry_become_permanent_failures(self):
        circular = []
        circular.append(circular)
        for answer in [float("nan"), {"ratio": float("inf")}, [float("-inf")], {1, 2}, b"bytes", object(),
                       circular, {"text": "\ud800"}, {(1, 2): "tuple key"}, 2**64, {"n": -(2**63) - 1},
                       deeply_nested]:
            with self.subTest(answer=repr(answer)[:40]):
                result = self.run_handler(answer)
                self.tearDown()
                self.assertEqual(result["outcome"], "permanent_error", result)
                self.assertEqual(result["error"]["code"], "result_not_json")
                self.assertIn("the handler's result cannot be sent as JSON", result["error"]["message"])
                self.assertNotIn("results", result)

    def test_nan_is_never_written(self):
        result = self.run_handler({"ratio": float("nan")})
        body = self.results.published[0].body
        self.assertNotIn(b"NaN", body)
        self.assertIn("Out of range float values are not JSON compliant", result["error"]["message"])

    def test_json_that_fits_is_sent_as_is(self):
        answer = {"big": 2**64 - 1, "small": -(2**63), "text": "ünïcode ✓", "float": 0.1, "none": None}
        self.assertEqual(self.run_handler(answer)["results"], answer)

    def test_a_result_over_the_limit_is_a_permanent_failure(self):
        # `"x…x"` is the length of the text plus its two quotes, as serde_json counts it.
        self.assertEqual(self.run_handler("x" * 98, TASKER_MAX_RESULT_BYTES="100")["outcome"], "success")
        self.tearDown()
        result = self.run_handler("é" * 50, TASKER_MAX_RESULT_BYTES="100")  # 102 bytes of UTF-8
        self.assertEqual(result["outcome"], "permanent_error")
        self.assertEqual(result["error"]["code"], "result_too_large")
        self.assertEqual(result["error"]["message"], (
            "the handler's result is 102 bytes of JSON, over this worker's limit of 100 bytes "
            "(TASKER_MAX_RESULT_BYTES); return less, or store the data elsewhere and return a reference to it"))

    def test_a_result_holding_a_nul_is_a_permanent_failure_naming_where(self):
        for answer, where in [({"body": {"text": "a\0b"}}, "/body/text"), ({"k\0": 1}, "/k\ufffd"),
                              ({1: ("x\0",)}, "/1/0"), ("\0", "the top (the result is that string)")]:
            with self.subTest(answer=answer):
                result = self.run_handler(answer)
                self.tearDown()
                self.assertEqual(result["outcome"], "permanent_error", result)
                self.assertEqual(result["error"]["code"], "result_not_storable")
                self.assertEqual(result["error"]["message"], "the handler's result holds a NUL character "
                                 f"(U+0000), which cannot be stored, at {where}")
        self.assertEqual(self.run_handler({"text": "\\u0000 is text"})["outcome"], "success")
        self.tearDown()
        error = self.run_handler(RuntimeError("a\0b"))["error"]
        self.assertEqual(error, {"message": "RuntimeError: a\ufffdb"})

    def test_a_result_deeper_than_tasker_carries_is_a_permanent_failure(self):
        deepest = {"nest": 1}
        for _ in range(99):
            deepest = [deepest]
        self.assertEqual(self.run_handler(deepest)["outcome"], "success")
        self.tearDown()
        result = self.run_handler([deepest])
        self.assertEqual(result["outcome"], "permanent_error", result)
        self.assertEqual(result["error"]["code"], "result_not_storable")
        self.assertEqual(result["error"]["message"], "the handler's result nests arrays and objects "
                         "more than 100 levels deep, more than Tasker carries")

    def test_the_default_limit_is_the_rust_workers_1_mib(self):
        self.assertEqual(settings().max_result_bytes, 1024 * 1024)
        result = self.run_handler(lambda: "x" * (1024 * 1024))
        self.assertEqual(result["error"]["code"], "result_too_large")
        self.assertLess(len(self.results.published[0].body), 4096)

    def test_a_handler_that_raises_is_a_retryable_error_with_a_sendable_message(self):
        class Broken(Exception):
            def __str__(self):
                raise RuntimeError("no")
        for error, message in [(KeyError("numbers"), "KeyError: 'numbers'"),
                               (Broken(), "Broken: (its message could not be read)"),
                               (ValueError("bad \ud800 text"), "ValueError: bad \\ud800 text"),
                               (RuntimeError(), "RuntimeError")]:
            with self.subTest(error=type(error).__name__):
                result = self.run_handler(error)
                self.tearDown()
                self.assertEqual(result["outcome"], "retryable_error")
                self.assertEqual(result["error"], {"message": message})

    def test_a_huge_error_message_is_cut_as_the_rust_worker_cuts_it(self):
        message = self.run_handler(RuntimeError("é" * 20000))["error"]["message"]
        self.assertTrue(message.endswith("… (cut: the message had 40014 bytes)"), message[-60:])
        self.assertLessEqual(len(message.encode()), 16 * 1024 + 64)

    def test_a_result_the_broker_refuses_hands_the_step_back(self):
        self.results.refuse = True
        tag = self.deliver(body_of(step_message()))
        self.assertEqual((self.steps.acked, self.steps.nacked), ([], [(tag, True)]))

    # --- batches of steps --------------------------------------------------------------------
    def ids(self, n):
        step = batched_step(n)
        return step["step_id"], step["dispatch_token"]

    def test_a_batch_runs_every_step_in_order_and_is_acked_once(self):
        seen = []

        def greet(step):
            seen.append(step)
            return worker.greet(step)
        self.start({"python.greet": greet, "python.sum": worker.total})
        trace = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        body = batch_of(batched_step(1, traceparent=trace, some_new_field={"x": 1}),
                        batched_step(2, handler="python.sum", config={"numbers": [1, 2]}, deferrals=...),
                        batched_step(3, traceparent=None, item={"line": 1}, index=0),
                        some_new_field=[1])
        tag = self.deliver(body, kind="steps", redelivered=True)
        self.assertEqual((self.steps.acked, self.steps.nacked), ([tag], []), "acked once, for every step")
        sent = [json.loads(m.body) for m in self.sent()]
        order = [(m["type"], m["steps"][0]["step_id"] if m["type"] == "started" else m["step_id"]) for m in sent]
        one, two, three = (self.ids(n)[0] for n in (1, 2, 3))
        self.assertEqual(order, [("started", one), ("result", one), ("started", two), ("result", two),
                                 ("started", three), ("result", three)], "one step at a time, in order")
        for notice in sent[0::2]:
            self.assertEqual(notice["steps"][0]["redelivered"], True, "copied from the batch's delivery")
        results = sent[1::2]
        for n, result in enumerate(results, 1):
            self.assertEqual((result["task_id"], result["step_id"], result["dispatch_token"]), (TASK, *self.ids(n)))
            self.assertEqual(result["outcome"], "success")
        self.assertEqual(results[0]["results"], {"greeting": "hello you", "parents": ["a"]})
        self.assertEqual(results[1]["results"], {"total": 3})
        # Each step's traceparent goes onto its own result, as a step message's header would.
        self.assertEqual([m.properties.headers for m in self.results.published], [{"traceparent": trace}, None, None])
        self.assertEqual([step["step_name"] for step in seen], ["s1", "s3"])
        for step in seen:
            self.assertNotIn("traceparent", step, "handlers see a step as a step message carries it")
        self.assertEqual(seen[1]["item"], {"line": 1})
        self.assertEqual(self.dead_letters(), [])
        self.assertGreater(self.steps.settled[0][0], max(m.seq for m in self.sent()), "acked after the last result")

    def test_a_step_of_a_batch_with_an_unknown_handler_is_dead_lettered_alone_and_the_rest_run(self):
        trace = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        nope = batched_step(2, handler="python.nope", traceparent=trace, some_new_field=1, deferrals=..., item=None,
                            config={"z": 1, "a": [2]})
        tag = self.deliver(batch_of(batched_step(1), nope, batched_step(3)), kind="steps")
        self.assertEqual((self.steps.acked, self.steps.nacked), ([tag], []), "answered: acked with the others")
        results = self.results_sent()
        self.assertEqual([(r["step_id"], r["outcome"]) for r in results],
                         [(self.ids(1)[0], "success"), (self.ids(2)[0], "permanent_error"),
                          (self.ids(3)[0], "success")])
        reason = "unknown handler `python.nope`; this worker has: python.greet, python.sum"
        self.assertEqual(results[1]["error"], {"message": reason, "code": "unknown_handler"})
        self.assertEqual(results[1]["started_at"], results[1]["finished_at"])
        self.assertEqual([m.exchange for m in self.results.published], ["", "", "tasker.dlx", ""],
                         "its result first, then its dead letter, then the next step")
        [letter] = self.dead_letters()
        self.assertEqual(letter.properties.headers, {"x-tasker-reason": reason, "x-tasker-source-queue": QUEUE})
        self.assertEqual((letter.routing_key, letter.properties.delivery_mode, letter.properties.type), ("", 2, None))
        # Alone: the step written as a step message of its own, as the Rust worker writes
        # it (its fields in order, `deferrals` 0 when absent, no null `item`), so it can be
        # published again as one; not the batch, no `traceparent`, no unknown field.
        expected = {k: v for k, v in nope.items() if k not in ("traceparent", "some_new_field", "item")}
        expected["deferrals"] = 0
        order = [k for k in protocol.STEP_MESSAGE_ORDER if k in expected]
        self.assertEqual(letter.body, json.dumps({k: expected[k] for k in order}, separators=(",", ":")).encode())
        self.assertEqual(protocol.decode_step(letter.body), expected)

    def test_a_batch_that_does_not_decode_is_dead_lettered_whole_and_none_of_its_steps_runs(self):
        good = batched_step(1)
        duplicate = batch_of(good).replace(b'{"schema_version": 1,', b'{"schema_version": 1, "schema_version": 1,', 1)
        nan = batch_of(good, batched_step(2)).replace(b'"attempt": 1', b'"attempt": NaN')
        for body, reason in [
            (b"not json", "undecodable message:"),
            (b"\xff", "undecodable message:"),
            (b"[]", "undecodable message: a steps message is a JSON object, not list"),
            (duplicate, "undecodable message: duplicate field `schema_version`"),
            (nan, "undecodable message:"),
            (batch_of(good, schema_version=...), "undecodable message: missing field `schema_version`"),
            (batch_of(steps=...), "undecodable message: missing field `steps`"),
            (batch_of(steps={"0": good}), "undecodable message: `steps` must be an array"),
            (batch_of(good, 7), "undecodable message: `steps[1]` must be a step (a JSON object), not 7"),
            (batch_of(good, batched_step(2, attempt=...)), "undecodable message: missing field `steps[1].attempt`"),
            (batch_of(good, batched_step(2, step_id="not-a-uuid")),
             "undecodable message: `steps[1].step_id` must be a hyphenated UUID string"),
            (batch_of(good, batched_step(2, traceparent=7)),
             "undecodable message: `steps[1].traceparent` must be a string"),
            (batch_of(good, schema_version=True), "undecodable message: `schema_version` must be an integer"),
            (batch_of(good, schema_version=1.0), "undecodable message: `schema_version` must be an integer"),
            (batch_of(good, batched_step(2, schema_version=1.0)),
             "undecodable message: `steps[1].schema_version` must be an integer"),
            (batch_of(good, schema_version=2), "unsupported schema_version 2 (this build speaks 1)"),
            (batch_of(good, batched_step(2, schema_version=2)), "unsupported schema_version 2 (this build speaks 1)"),
            # As the Rust decoder: the whole batch decodes first, then the versions, then emptiness.
            (batch_of(batched_step(2, schema_version=2), batched_step(3, attempt="1")),
             "undecodable message: `steps[1].attempt`"),
            (batch_of(), "a steps message without steps"),
            (batch_of(schema_version=0), "unsupported schema_version 0 (this build speaks 1)"),
            # A step message is not a batch.
            (body_of(step_message()), "undecodable message: missing field `steps`"),
        ]:
            with self.subTest(body=body[:80]):
                self.assert_dead_lettered(body, reason, kind="steps")
        self.assertEqual(self.sent(), [], "no notice and no result: none of its steps ran")
        self.assertEqual(self.steps.nacked, [])

    def test_a_message_is_a_batch_by_its_type_property_only(self):
        # The bodies carry no tag: a batch without `type` is read as a step message.
        self.assert_dead_lettered(batch_of(batched_step(1)), "undecodable message: missing field `task_id`")
        self.assertEqual(self.sent(), [])
        tag = self.deliver(body_of(step_message()), kind="something_else")
        self.assertEqual(self.result()["outcome"], "success")
        self.assertEqual(self.steps.acked[-1], tag)

    def test_a_step_handed_back_requeues_the_whole_batch_once_every_step_is_answered(self):
        steps = [batched_step(1), batched_step(2), batched_step(3)]
        second = self.ids(2)[0].encode()
        self.results.refuse = lambda exchange, body: exchange == "" and b'"type":"result"' in body and second in body
        worker.REQUEUE_PAUSE = 0.5
        with mock.patch.object(worker.time, "sleep") as sleep:
            tag = self.deliver(batch_of(*steps), kind="steps")
        sleep.assert_called_once_with(0.5)
        self.assertEqual((self.steps.acked, self.steps.nacked), ([], [(tag, True)]), "handed back whole, once")
        self.assertEqual([r["step_id"] for r in self.results_sent()], [self.ids(1)[0], self.ids(3)[0]],
                         "the steps after the one handed back still run")
        self.assertGreater(self.steps.settled[0][0], max(m.seq for m in self.sent()), "once all are answered")
        # It comes back: the steps this worker answered are skipped (acked without running
        # or sending anything); the one handed back runs.
        self.results.refuse = False
        before = len(self.sent())
        tag = self.deliver(batch_of(*steps), kind="steps", redelivered=True)
        again = [json.loads(m.body) for m in self.sent()[before:]]
        self.assertEqual([m["type"] for m in again], ["started", "result"])
        self.assertEqual(again[0]["steps"][0]["step_id"], self.ids(2)[0])
        self.assertEqual(again[0]["steps"][0]["redelivered"], True)
        self.assertEqual((again[1]["step_id"], again[1]["outcome"]), (self.ids(2)[0], "success"))
        self.assertEqual(self.steps.acked, [tag])

    def test_a_step_whose_dead_letter_is_refused_hands_its_batch_back(self):
        self.results.refuse = lambda exchange, body: exchange == "tasker.dlx"
        tag = self.deliver(batch_of(batched_step(1, handler="python.nope"), batched_step(2)), kind="steps")
        self.assertEqual((self.steps.acked, self.steps.nacked), ([], [(tag, True)]))
        self.assertEqual([r["outcome"] for r in self.results_sent()], ["permanent_error", "success"])

    # --- signatures ---------------------------------------------------------------------------
    def signed(self, body, key=KEY):
        return {"x-tasker-signature": "v1=" + hmac.new(key.encode(), body, hashlib.sha256).hexdigest()}

    def test_with_a_key_everything_published_is_signed_over_its_exact_bytes(self):
        self.start(TASKER_MESSAGE_KEY=KEY)
        body = body_of(step_message())
        tag = self.deliver(body, headers=self.signed(body))
        self.assertEqual(self.steps.acked, [tag])
        sent = self.sent()
        self.assertEqual(len(sent), 2)
        for message in sent:
            self.assertEqual(message.properties.headers, self.signed(message.body))

    def test_a_step_signed_with_the_previous_key_runs(self):
        self.start(TASKER_MESSAGE_KEY=KEY, TASKER_MESSAGE_KEY_PREVIOUS=OLD)
        body = body_of(step_message())
        self.deliver(body, headers=self.signed(body, OLD))
        self.assertEqual(self.result()["outcome"], "success")

    def test_steps_that_do_not_verify_are_dead_lettered_as_bad_signature(self):
        self.start(TASKER_MESSAGE_KEY=KEY)
        body = body_of(step_message())
        missing = "bad_signature: the message is not signed (x-tasker-signature missing)"
        mismatch = ("bad_signature: the message's signature does not verify with TASKER_MESSAGE_KEY "
                    "or TASKER_MESSAGE_KEY_PREVIOUS")
        for headers, reason in [(None, missing), ({"traceparent": "x"}, missing),
                                (self.signed(body, OLD), mismatch),
                                (self.signed(body + b" "), mismatch),
                                ({"x-tasker-signature": "v1=zz"}, mismatch),
                                ({"x-tasker-signature": self.signed(body)["x-tasker-signature"][3:]}, mismatch),
                                ({"x-tasker-signature": 12}, missing)]:
            with self.subTest(headers=headers):
                self.assertEqual(self.assert_dead_lettered(body, reason, headers=headers), reason)
        # Checked before decoding: an unsigned poison message is refused for its signature.
        self.assert_dead_lettered(b"not json", "bad_signature:")
        self.assertEqual(self.sent(), [])

    def test_a_batch_is_signed_once_over_its_whole_body(self):
        self.start(TASKER_MESSAGE_KEY=KEY, TASKER_MESSAGE_KEY_PREVIOUS=OLD)
        body = batch_of(batched_step(1), batched_step(2))
        tag = self.deliver(body, headers=self.signed(body), kind="steps")
        self.assertEqual(self.steps.acked, [tag])
        self.assertEqual(len(self.sent()), 4)
        for message in self.sent():
            self.assertEqual(message.properties.headers, self.signed(message.body))
        rotated = batch_of(batched_step(3), batched_step(4))
        self.deliver(rotated, headers=self.signed(rotated, OLD), kind="steps")
        self.assertEqual(len(self.sent()), 8, "the previous key verifies too")
        # Unsigned, or a signature over one step's bytes: dead-lettered whole, before decoding.
        one = json.dumps(batched_step(1)).encode()
        for headers, reason in [(None, "bad_signature: the message is not signed"),
                                (self.signed(one), "bad_signature: the message's signature does not verify"),
                                (self.signed(b"[]"), "bad_signature: the message's signature does not verify")]:
            with self.subTest(headers=headers):
                self.assert_dead_lettered(body, reason, headers=headers, kind="steps")
        self.assert_dead_lettered(b"[]", "bad_signature: the message is not signed", kind="steps")
        self.assertEqual(len(self.sent()), 8)

    def test_without_a_key_nothing_is_signed_or_checked(self):
        body = body_of(step_message())
        self.deliver(body, headers={"x-tasker-signature": "v1=00"})
        self.assertEqual(self.result()["outcome"], "success")
        self.assertTrue(self.sent())
        for message in self.sent():
            self.assertIsNone(message.properties.headers)

    # --- settings ----------------------------------------------------------------------------
    def test_settings_the_worker_cannot_use_stop_it_at_start(self):
        for env, error in [
            ({"TASKER_WORKER_ID": "has space"}, "is not a worker id"),
            ({"TASKER_WORKER_ID": "x" * 129}, "is not a worker id"),
            ({"TASKER_WORKER_ID": "naïve"}, "is not a worker id"),
            ({"TASKER_WORKER_ID": "py-1\n"}, "is not a worker id"),
            ({"TASKER_MESSAGE_KEY": "too-short"}, "TASKER_MESSAGE_KEY must be at least 32 bytes (it has 9)"),
            ({"TASKER_MESSAGE_KEY_PREVIOUS": KEY}, "TASKER_MESSAGE_KEY_PREVIOUS is set but TASKER_MESSAGE_KEY is not"),
            ({"TASKER_MAX_RESULT_BYTES": "1MiB"}, "TASKER_MAX_RESULT_BYTES must be a whole number"),
            ({"TASKER_PREFETCH": "0"}, "TASKER_PREFETCH must be a whole number"),
            ({"TASKER_NAMESPACES": " , "}, "TASKER_NAMESPACES is required"),
            ({"TASKER_QUEUE_TYPE": "mirrored"}, "TASKER_QUEUE_TYPE must be classic or quorum"),
        ]:
            with self.subTest(env=env):
                with self.assertRaises(ValueError) as raised:
                    settings(**env)
                self.assertIn(error, str(raised.exception))

    def test_ids_that_are_valid(self):
        for worker_id in ["py-worker-7", "a", "x" * 128, "host.example.com:42_a-b"]:
            self.assertEqual(settings(TASKER_WORKER_ID=worker_id).worker_id, worker_id)
        default = worker.Settings({"TASKER_NAMESPACES": "mixed"}).worker_id
        self.assertTrue(protocol.valid_worker_id(default), default)
        self.assertNotIn(KEY, repr(settings(TASKER_MESSAGE_KEY=KEY).keys))

    def test_queues_are_declared_with_the_arguments_rust_gives_them(self):
        classic = settings()
        for queue in ["tasker.steps.mixed", "tasker.results", "tasker.dead_letter"]:
            self.assertIsNone(classic.queue_arguments(queue))
        quorum = settings(TASKER_QUEUE_TYPE="quorum")
        self.assertEqual(quorum.queue_arguments("tasker.dead_letter"), {"x-queue-type": "quorum"})
        self.assertEqual(quorum.queue_arguments("tasker.results"), {
            "x-queue-type": "quorum", "x-delivery-limit": 1_000_000_000,
            "x-dead-letter-exchange": "tasker.dlx"})
        self.assertEqual(quorum.queue_arguments("tasker.steps.mixed"), {
            "x-queue-type": "quorum", "x-delivery-limit": 20, "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": "tasker.results"})


if __name__ == "__main__":
    unittest.main()
