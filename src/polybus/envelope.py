"""Every header name polybus puts on the wire, in one place.

The envelope travels as plain string headers so that any client of the
underlying broker (kafka-console-consumer, redis-cli, the RabbitMQ UI) can read
it. Names that start with :data:`RESERVED_PREFIX` are polybus's own and are
kept out of ``Message.headers``; the rest follow outside conventions (W3C trace
context, the content type). Changing a value here changes the wire format.
"""

from __future__ import annotations

#: headers that start with this are polybus's own; they are kept out of ``Message.headers``
RESERVED_PREFIX = "polybus-"

# -- every message ------------------------------------------------------------------

MESSAGE_ID = "polybus-id"
CORRELATION_ID = "polybus-correlation-id"
CAUSATION_ID = "polybus-causation-id"
TIMESTAMP = "polybus-timestamp"
CONTENT_TYPE = "content-type"
TRACEPARENT = "traceparent"  #: W3C trace context
TRACESTATE = "tracestate"
#: marks a key that was given as bytes, so it comes back as bytes
KEY_BINARY = "polybus-key-binary"
#: the attempt number a retried copy starts at (2 on the first retry); absent means 1
ATTEMPT = "polybus-attempt"

# -- retries (polybus.patterns.retry) -------------------------------------------------

#: epoch ms at which a retried copy is due
DUE = "polybus-due"
#: where the message first arrived, kept through every retry
ORIGIN_TOPIC = "polybus-origin-topic"
ORIGIN_PARTITION = "polybus-origin-partition"
ORIGIN_OFFSET = "polybus-origin-offset"
#: the last failure: the exception's type and text
ERROR_TYPE = "polybus-error-type"
ERROR = "polybus-error"
#: epoch ms of the first and the last failure
FIRST_FAILURE = "polybus-first-failure"
LAST_FAILURE = "polybus-last-failure"
#: what a retried or dead-lettered copy says of its failures
FAILURE_HEADERS = (ORIGIN_TOPIC, ORIGIN_PARTITION, ORIGIN_OFFSET, ERROR_TYPE, ERROR,
                   FIRST_FAILURE, LAST_FAILURE)  # fmt: skip

# -- dead letters (polybus.patterns.dlq) ----------------------------------------------

#: the group that gave up on the message
DEAD_LETTER_GROUP = "polybus-dead-letter-group"
#: why: "exhausted" (last attempt failed), "not-retryable" or "undecodable"
DEAD_LETTER_REASON = "polybus-dead-letter-reason"
#: how many tries the message had
ATTEMPTS = "polybus-attempts"

# -- request-reply (polybus.patterns.request_reply) -----------------------------------

#: the topic a request's reply goes to
REPLY_TO = "polybus-reply-to"
#: the id of the requester that sent the request (and gets its reply)
REQUESTER = "polybus-requester"
#: a reply carrying the responder's exception instead of a value: its type and text
REMOTE_ERROR_TYPE = "polybus-remote-error-type"
REMOTE_ERROR = "polybus-remote-error"

# -- sessions (polybus.sessions.context) ----------------------------------------------

#: the signed user context (a JWT bound to the message id)
USER_CONTEXT = "user-context"

# -- CloudEvents (polybus.cloudevents) -----------------------------------------------

# A CloudEvents attribute in binary content mode is a header named by a prefix and the
# attribute's name ("ce_id"); its data content type is the content type above.
#: the Kafka binding's prefix, which polybus also uses on Redis and the native engine
CLOUDEVENTS_PREFIX = "ce_"
#: the RabbitMQ binding's (AMQP 0-9-1, as Knative Eventing and the CloudEvents SDK write it)
CLOUDEVENTS_RABBITMQ_PREFIX = "ce-"
#: the AMQP 1.0 binding's application-properties, which RabbitMQ 4 hands to AMQP 0-9-1
#: clients as headers
CLOUDEVENTS_AMQP_PREFIXES = ("cloudEvents:", "cloudEvents_")
#: every prefix an attribute is read under, on every backend
CLOUDEVENTS_PREFIXES = (CLOUDEVENTS_PREFIX, CLOUDEVENTS_RABBITMQ_PREFIX, *CLOUDEVENTS_AMQP_PREFIXES)

# -- RabbitMQ only ---------------------------------------------------------------------

#: a binary or long key travels base64-encoded in this header (routing keys are short text)
RABBITMQ_KEY = "polybus-key"
#: marks the end of a replay; polybus readers of a history stream skip these
RABBITMQ_REPLAY_END = "polybus-replay-end"
