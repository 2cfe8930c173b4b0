"""A Tasker worker in Python (pika, blocking). See README.md and docs/protocol.md.

It consumes `<prefix>.steps.<namespace>` for each namespace in TASKER_NAMESPACES, runs the
step's handler, publishes the result with a publisher confirm, and only then acks the step.
A batch of steps (AMQP `type` `steps`) runs step by step, and is acked once every step in
it is answered.
What it reads and writes is in tasker_protocol.py; this file is the broker and the handlers.
"""
import collections
import functools
import logging
import os
import re
import signal
import socket
import sys
import time

import pika

import tasker_protocol as protocol

log = logging.getLogger("py-worker")
PERSISTENT = dict(delivery_mode=2, content_type="application/json")
DELIVERY_LIMIT = 20  # deliveries a quorum step queue allows (protocol/src/broker.rs DELIVERY_LIMIT)
RESULTS_DELIVERY_LIMIT = 1_000_000_000  # in effect none (protocol/src/broker.rs RESULTS_DELIVERY_LIMIT)
REQUEUE_PAUSE = 0.5  # seconds before a step is handed back, so a broker in trouble is not hammered
ANSWERED_MEMORY = 10_000  # dispatches whose result was confirmed, remembered to skip their copies (as Rust)


# --- handlers: step message (a dict) -> results (any JSON value) -------------------------
def greet(step):
    context = step["context"] if isinstance(step["context"], dict) else {}
    return {"greeting": "hello " + str(context.get("who", "world")), "parents": list(step["parents"])}


def total(step):
    def numeric(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    parents = [r["total"] for r in step["parents"].values() if isinstance(r, dict) and numeric(r.get("total"))]
    return {"total": sum(step["config"]["numbers"]) + sum(parents)}


HANDLERS = {"python.greet": greet, "python.sum": total}


# --- settings ------------------------------------------------------------------------------
class Settings:
    """Everything read from the environment, checked before connecting: a setting the
    worker cannot use stops it at start (ValueError), as it stops the Rust worker."""

    def __init__(self, environ):
        self.amqp_url = environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
        self.prefix = environ.get("TASKER_AMQP_PREFIX", "tasker")
        self.namespaces = [n.strip() for n in environ.get("TASKER_NAMESPACES", "").split(",") if n.strip()]
        if not self.namespaces:
            raise ValueError("TASKER_NAMESPACES is required (a comma-separated list)")
        host = re.sub(r"[^A-Za-z0-9._:-]", "-", socket.gethostname())[:100] or "host"
        self.worker_id = environ.get("TASKER_WORKER_ID") or f"py-{host}-{os.getpid()}"
        if not protocol.valid_worker_id(self.worker_id):
            raise ValueError(f"TASKER_WORKER_ID {self.worker_id!r} is not a worker id: 1 to "
                             f"{protocol.MAX_WORKER_ID_LEN} letters, digits, '.', '_', ':' or '-'")
        self.prefetch = _positive(environ, "TASKER_PREFETCH", 1)
        self.max_result_bytes = _positive(environ, "TASKER_MAX_RESULT_BYTES", protocol.DEFAULT_MAX_RESULT_BYTES)
        self.keys = protocol.MessageKeys(environ.get("TASKER_MESSAGE_KEY"), environ.get("TASKER_MESSAGE_KEY_PREVIOUS"))
        self.queue_type = environ.get("TASKER_QUEUE_TYPE", "classic").strip() or "classic"
        if self.queue_type not in ("classic", "quorum"):
            raise ValueError(f"TASKER_QUEUE_TYPE must be classic or quorum, not {self.queue_type!r}")

    @property
    def results_queue(self):  # reached through the default exchange
        return f"{self.prefix}.results"

    def queue_arguments(self, queue):
        """The arguments Rust declares `queue` with (protocol/src/broker.rs): none for classic
        queues; for quorum ones the type, and on step and results queues the delivery
        limit and where a message past it goes."""
        if self.queue_type == "classic":
            return None
        arguments = {"x-queue-type": "quorum"}
        if queue == f"{self.prefix}.dead_letter":
            return arguments
        if queue == self.results_queue:
            arguments["x-delivery-limit"] = RESULTS_DELIVERY_LIMIT
            arguments["x-dead-letter-exchange"] = f"{self.prefix}.dlx"
        else:
            arguments["x-delivery-limit"] = DELIVERY_LIMIT
            arguments["x-dead-letter-exchange"] = ""
            arguments["x-dead-letter-routing-key"] = self.results_queue
        return arguments


def _positive(environ, name, default):
    text = environ.get(name, "").strip()
    if not text:
        return default
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{name} must be a whole number of at least 1, not {text!r}")
    return int(text)


# --- the worker --------------------------------------------------------------------------
class Worker:
    def __init__(self, connection, settings, handlers=None):
        self.connection, self.settings, self.stopping = connection, settings, False
        self.handlers = HANDLERS if handlers is None else handlers
        self.keys, prefix = settings.keys, settings.prefix
        # (step_id, dispatch_token) of the last ANSWERED_MEMORY results the broker confirmed:
        # a copy of one (a batch handed back for another of its steps) is acked without running.
        self.answered = collections.OrderedDict()
        self.steps = connection.channel()  # consumes step messages, manual acks
        # Quorum queues refuse a channel-wide prefetch; pika's default is per consumer.
        self.steps.basic_qos(prefetch_count=settings.prefetch)
        self.results = connection.channel()  # results and dead letters, with confirms
        self.results.confirm_delivery()
        self.notices = connection.channel()  # started notices: fire and forget
        ch = self.steps  # declare exactly what Rust declares (docs/protocol.md#topology)
        ch.exchange_declare(f"{prefix}.steps", "direct", durable=True)
        ch.exchange_declare(f"{prefix}.dlx", "fanout", durable=True)
        for queue in (settings.results_queue, f"{prefix}.dead_letter"):
            ch.queue_declare(queue, durable=True, arguments=settings.queue_arguments(queue))
        ch.queue_bind(f"{prefix}.dead_letter", f"{prefix}.dlx", routing_key="")
        for ns in settings.namespaces:
            queue = f"{prefix}.steps.{ns}"
            ch.queue_declare(queue, durable=True, arguments=settings.queue_arguments(queue))
            ch.queue_bind(queue, f"{prefix}.steps", routing_key=ns)
            # The callback knows its queue: a delivery's routing key is the namespace only
            # when the message came through `<prefix>.steps`; through the default exchange
            # it is the queue's name. Dead letters name the queue, whichever way it came.
            ch.basic_consume(queue, functools.partial(self.on_step, queue), auto_ack=False)
            log.info("consuming %s", queue)

    def publish(self, body, headers=None, exchange="", routing_key=None, mandatory=True, sign=True):
        """Publish `body` (bytes) and wait for the broker's confirm; False if it nacked or
        returned it. Signed when there is a key (dead letters are not: `sign=False`)."""
        if sign:
            headers = self.keys.sign(body, headers)
        props = pika.BasicProperties(headers=headers or None, **PERSISTENT)
        routing_key = self.settings.results_queue if routing_key is None else routing_key
        try:
            self.results.basic_publish(exchange, routing_key, body, props, mandatory=mandatory)
            return True
        except (pika.exceptions.UnroutableError, pika.exceptions.NackError) as error:
            log.warning("publish not confirmed: %r", error)
            return False

    def settle(self, delivery, ok):
        """Ack a message whose steps are all answered; otherwise hand it back after a pause."""
        if ok:
            self.steps.basic_ack(delivery.delivery_tag)
        else:
            time.sleep(REQUEUE_PAUSE)
            self.steps.basic_nack(delivery.delivery_tag, requeue=True)

    def dead_letter(self, queue, delivery, body, reason):
        """Copy the message to `<prefix>.dlx` (`copy_to_dead_letters`), then ack it; hand it
        back if the copy is not confirmed (never reject it: a quorum step queue would hand
        a rejected step to the coordinators as a failed attempt, not to the operators)."""
        self.settle(delivery, self.copy_to_dead_letters(queue, body, reason))

    def copy_to_dead_letters(self, queue, body, reason):
        """Publish `body`, byte for byte, to `<prefix>.dlx` with why and where from; True once
        the broker confirmed it."""
        log.warning("dead-lettering a message from %s: %s", queue, reason)
        headers = {protocol.REASON_HEADER: protocol.cut(reason, protocol.MAX_REASON_BYTES),
                   protocol.SOURCE_HEADER: queue}
        return self.publish(body, headers, f"{self.settings.prefix}.dlx", "", mandatory=False, sign=False)

    def on_step(self, queue, channel, delivery, props, body):
        if self.stopping:  # a SIGTERM came while this one waited in the prefetch buffer
            return self.steps.basic_nack(delivery.delivery_tag, requeue=True)
        try:  # a batch of steps is signed once, over its whole body
            self.keys.verify(body, props.headers)
        except protocol.BadSignature as error:
            return self.dead_letter(queue, delivery, body, f"{protocol.BAD_SIGNATURE}: {error}")
        if props.type == protocol.STEP_BATCH_TYPE:  # the bodies carry no tag: the property tells
            return self.on_batch(queue, delivery, body)
        try:
            step = protocol.decode_step(body)
        except protocol.Poison as error:
            return self.dead_letter(queue, delivery, body, str(error))
        trace = (props.headers or {}).get(protocol.TRACEPARENT)
        self.settle(delivery, self.run(step, queue, delivery.redelivered, trace, body))

    def on_batch(self, queue, delivery, body):
        """A batch of steps: dead-lettered whole if it does not decode (none of its steps
        runs); otherwise each step runs, in order, as a step message of its own would. The
        message is acked once every step is answered, or handed back whole, once all are
        answered, if any step was (a batch cannot be handed back in part)."""
        try:
            steps = protocol.decode_batch(body)
        except protocol.Poison as error:
            return self.dead_letter(queue, delivery, body, str(error))
        answered = [self.run(step, queue, delivery.redelivered, trace) for step, trace in steps]
        self.settle(delivery, all(answered))

    def run(self, step, queue, redelivered, trace, body=None):
        """Run one step and publish its result. Returns True when the step is answered (its
        result confirmed, or it is skipped), False when it must be handed back; the caller
        acks or nacks its message. `body` is the step message's own, None for a step of a
        batch: with an unknown handler, that step is dead-lettered alone, written as a step
        message of its own."""
        headers = {protocol.TRACEPARENT: trace} if isinstance(trace, str) else None
        worker_id, handler_name = self.settings.worker_id, step["handler"]
        dispatch = (step["step_id"], step["dispatch_token"])
        if dispatch in self.answered:
            log.info("step %s (%s): skipped, this worker already published its result",
                     step["step_name"], handler_name)
            return True
        handler = self.handlers.get(handler_name)
        if handler is None:
            reason = f"unknown handler `{handler_name}`; this worker has: {', '.join(sorted(self.handlers))}"
            at = protocol.now()
            result = protocol.result_message(step, worker_id, "permanent_error", at, at,
                                             error=(reason, "unknown_handler"))
            if not self.publish(protocol.encode(result), headers):
                return False
            body = protocol.step_message_body(step) if body is None else body
            return self.copy_to_dead_letters(queue, body, reason)
        started_at = protocol.now()
        notice = protocol.started_message(worker_id, step, started_at, redelivered)
        notice_body = protocol.encode(notice)
        self.notices.basic_publish("", self.settings.results_queue, notice_body,
                                   pika.BasicProperties(headers=self.keys.sign(notice_body) or None, **PERSISTENT))
        try:
            results, outcome, error = handler(step), "success", None
        except Exception as exc:  # any handler failure is worth another attempt
            log.exception("%s failed", handler_name)
            results, outcome, error = None, "retryable_error", (protocol.describe(exc), None)
        result = protocol.result_message(step, worker_id, outcome, started_at, protocol.now(),
                                         results=results, error=error)
        # A result that cannot be sent (not JSON, too large) becomes a permanent failure.
        result, result_body = protocol.encode_result(result, self.settings.max_result_bytes)
        why = result.get("error", {}).get("message", "")
        log.info("step %s (%s): %s %s", step["step_name"], handler_name, result["outcome"], why[:500])
        if not self.publish(result_body, headers):
            return False
        self.answered[dispatch] = True
        if len(self.answered) > ANSWERED_MEMORY:
            self.answered.popitem(last=False)
        return True

    def run_until_stopped(self):
        while not self.stopping:  # wake up regularly to notice a SIGTERM
            self.connection.process_data_events(time_limit=0.25)
        log.info("stopping: no new steps")
        for tag in list(self.steps.consumer_tags):
            self.steps.basic_cancel(tag)  # unacked, unstarted deliveries go back to the queue
        self.connection.close()
        log.info("worker stopped")


def main(handlers=None):
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("pika").setLevel(logging.WARNING)
    try:
        settings = Settings(os.environ)
    except ValueError as error:
        sys.exit(f"py-worker cannot start: {error}")
    worker = Worker(pika.BlockingConnection(pika.URLParameters(settings.amqp_url)), settings, handlers)

    def stop(signum, _frame):  # finish the current message (every step of a batch), then stop consuming
        log.info("signal %s: stopping after the current message", signum)
        worker.stopping = True
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("worker %s started; handlers: %s; messages %s", settings.worker_id, ", ".join(sorted(worker.handlers)),
             "signed and checked" if settings.keys.enabled else "not signed (no TASKER_MESSAGE_KEY)")
    worker.run_until_stopped()


if __name__ == "__main__":
    main()
