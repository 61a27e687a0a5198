"""The stateless OpenAI-compatible gateway: admission, enqueue, relay. It never calls vLLM."""
