"""llmq: an OpenAI-compatible LLM service with a bounded Redis job queue.

The one import root of what a deployment runs: ``llmq.gateway`` (the HTTP API),
``llmq.worker`` (the arq worker in front of one engine) and ``llmq.shared`` (settings, the
Redis contract, errors, the request model), used by both.
"""
