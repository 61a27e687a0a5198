"""Code shared by the gateway and the worker: settings, the Redis contract, wire models, errors."""
