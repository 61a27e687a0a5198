"""The arq worker: owns one engine's MAX_ACTIVE slots and streams its tokens into Redis."""
