"""The operator commands: ``llmq-keys`` (``llmq_keys``) and ``llmq-jobs`` (``llmq_jobs``),
each named for its console script. They reach Redis through ``shared.queue`` only."""
