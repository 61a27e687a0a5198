"""OpenAI's Responses API over the chat-completions queue.

A Responses request is parsed at the edge (``request``: unknown fields refused, the fields
OpenAI's own clients send that mean nothing here accepted) and converted into the chat
completion the worker runs on any engine: instructions, input items (messages, function
calls and their outputs, the stored chain of ``previous_response_id``), function tools
(namespaced ones flattened, built-in ones left out), ``text.format``. The worker and the
queue see an ordinary streamed chat job.

The answer is built back from that job's events (``events``): a deterministic converter
turns the chat chunks into Responses' typed stream events with their sequence numbers, so
any gateway, live or replaying a stored job's log, emits the same events with the same
numbers (a resumed stream's ``starting_after`` means the same everywhere), and the final
``response`` object is the last event's.
"""
