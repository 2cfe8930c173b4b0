"""A minimal Tasker worker in Python (pika, blocking). See README.md and docs/protocol.md.

It consumes `<prefix>.steps.<namespace>` for each namespace in TASKER_NAMESPACES, runs the
step's handler, publishes the result with a publisher confirm, and only then acks the step.
"""
import json, logging, os, signal, sys, time
from datetime import datetime, timezone

import pika

log = logging.getLogger("py-worker")
PREFIX = os.environ.get("TASKER_AMQP_PREFIX", "tasker")
RESULTS = f"{PREFIX}.results"  # reached through the default exchange
WORKER_ID = os.environ.get("TASKER_WORKER_ID") or f"py-{os.uname().nodename}-{os.getpid()}"
PERSISTENT = dict(delivery_mode=2, content_type="application/json")


def now():  # RFC 3339, UTC, microseconds: 2025-10-09T08:53:20.210000Z
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


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


# --- the worker --------------------------------------------------------------------------
class Worker:
    def __init__(self, connection, namespaces):
        self.connection, self.stopping = connection, False
        self.steps = connection.channel()  # consumes step messages, manual acks
        self.steps.basic_qos(prefetch_count=int(os.environ.get("TASKER_PREFETCH", "1")))
        self.results = connection.channel()  # results and dead letters, with confirms
        self.results.confirm_delivery()
        self.notices = connection.channel()  # started notices: fire and forget
        ch = self.steps  # declare exactly what Rust declares (docs/protocol.md#topology)
        ch.exchange_declare(f"{PREFIX}.steps", "direct", durable=True)
        ch.exchange_declare(f"{PREFIX}.dlx", "fanout", durable=True)
        for queue in (RESULTS, f"{PREFIX}.dead_letter"):
            ch.queue_declare(queue, durable=True)
        ch.queue_bind(f"{PREFIX}.dead_letter", f"{PREFIX}.dlx", routing_key="")
        self.queues = [f"{PREFIX}.steps.{ns}" for ns in namespaces]
        for ns, queue in zip(namespaces, self.queues):
            ch.queue_declare(queue, durable=True)
            ch.queue_bind(queue, f"{PREFIX}.steps", routing_key=ns)
            ch.basic_consume(queue, self.on_step, auto_ack=False)
            log.info("consuming %s", queue)

    def publish(self, body, headers=None, exchange="", routing_key=RESULTS, mandatory=True):
        """Publish and wait for the broker's confirm; False if it nacked or returned it."""
        props = pika.BasicProperties(headers=headers or None, **PERSISTENT)
        try:
            self.results.basic_publish(exchange, routing_key, json.dumps(body) if isinstance(body, dict) else body,
                                       props, mandatory=mandatory)
            return True
        except (pika.exceptions.UnroutableError, pika.exceptions.NackError) as error:
            log.warning("publish not confirmed: %r", error)
            return False

    def settle(self, delivery, ok):
        """Ack after a confirmed publish; otherwise hand the step back after a pause."""
        if ok:
            self.steps.basic_ack(delivery.delivery_tag)
        else:
            time.sleep(0.5)
            self.steps.basic_nack(delivery.delivery_tag, requeue=True)

    def dead_letter(self, delivery, body, reason):
        headers = {"x-tasker-reason": reason[:1024], "x-tasker-source-queue": f"{PREFIX}.steps.{delivery.routing_key}"}
        self.settle(delivery, self.publish(body, headers, f"{PREFIX}.dlx", "", mandatory=False))

    def on_step(self, channel, delivery, props, body):
        if self.stopping:  # a SIGTERM came while this one waited in the prefetch buffer
            return self.steps.basic_nack(delivery.delivery_tag, requeue=True)
        try:
            step = json.loads(body)
            ids = {k: step[k] for k in ("task_id", "step_id", "dispatch_token")}
            handler_name = step["handler"]
        except (ValueError, TypeError, KeyError) as error:
            log.warning("poison step message: %r", error)
            return self.dead_letter(delivery, body, f"undecodable message: {error!r}")
        if step.get("schema_version") != 1:
            version = step.get("schema_version")
            return self.dead_letter(delivery, body, f"unsupported schema_version {version} (this build speaks 1)")
        headers = {"traceparent": props.headers["traceparent"]} if "traceparent" in (props.headers or {}) else None
        result = {"type": "result", "schema_version": 1, **ids, "worker_id": WORKER_ID}
        handler = HANDLERS.get(handler_name)
        if handler is None:
            reason = f"unknown handler `{handler_name}`; this worker has: {', '.join(sorted(HANDLERS))}"
            log.warning("%s", reason)
            result.update(outcome="permanent_error", error={"message": reason, "code": "unknown_handler"})
            result["started_at"] = result["finished_at"] = now()
            if not self.publish(result, headers):
                return self.settle(delivery, False)
            return self.dead_letter(delivery, body, reason)
        started_at = now()
        notice = {"step_id": ids["step_id"], "dispatch_token": ids["dispatch_token"],
                  "started_at": started_at, "redelivered": bool(delivery.redelivered)}
        self.notices.basic_publish("", RESULTS, json.dumps(
            {"type": "started", "schema_version": 1, "worker_id": WORKER_ID, "steps": [notice]}),
            pika.BasicProperties(**PERSISTENT))
        try:
            result.update(outcome="success", results=handler(step))
        except Exception as error:  # any handler failure is worth another attempt
            log.exception("%s failed", handler_name)
            result.update(outcome="retryable_error", error={"message": f"{type(error).__name__}: {error}"})
        result.update(started_at=started_at, finished_at=now())
        log.info("step %s (%s): %s", step.get("step_name"), handler_name, result["outcome"])
        self.settle(delivery, self.publish(result, headers))

    def run(self):
        while not self.stopping:  # wake up regularly to notice a SIGTERM
            self.connection.process_data_events(time_limit=0.25)
        log.info("stopping: no new steps")
        for tag in list(self.steps.consumer_tags):
            self.steps.basic_cancel(tag)  # unacked, unstarted deliveries go back to the queue
        self.connection.close()
        log.info("worker stopped")


def main():
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("pika").setLevel(logging.WARNING)
    namespaces = [n.strip() for n in os.environ.get("TASKER_NAMESPACES", "").split(",") if n.strip()]
    if not namespaces:
        sys.exit("TASKER_NAMESPACES is required (a comma-separated list)")
    url = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
    worker = Worker(pika.BlockingConnection(pika.URLParameters(url)), namespaces)

    def stop(signum, _frame):  # finish the current step, then stop consuming
        log.info("signal %s: stopping after the current step", signum)
        worker.stopping = True
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("worker %s started; handlers: %s", WORKER_ID, ", ".join(sorted(HANDLERS)))
    worker.run()


if __name__ == "__main__":
    main()
