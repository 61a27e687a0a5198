"""The Redis contract: every key and channel name, every Lua script and every Redis command
of the service lives in this package (pub/sub reading included); nothing outside it writes
a key string or calls Redis.

| module | what it keeps |
|---|---|
| ``names`` | every key and channel name (the key table is its docstring) |
| ``store`` | ``Store``: one process's access, its parts below sharing one pool |
| ``jobs`` | a job's life: admit, cancel, start, release, forget, publish events |
| ``standing`` | the Lua of where a job stands in line (admission and position share it) |
| ``routing`` | the model -> worker path, and the pick |
| ``workers`` | heartbeats, leaving, the reaper, lost claims |
| ``readings`` | the queue and the fleet read back, a job's position |
| ``records`` | jobs read back: stored records, logs, payloads |
| ``batches``, ``batch_records`` | the Batch API's files and batches, their records |
| ``apikeys`` | API keys |
| ``failover`` | what each process does when Redis fails over or goes away (a map) |
| ``connections``, ``pubsub`` | building connections (REDIS_URL or Sentinel); reading pub/sub |
| ``lua`` | ``Script``: KEYS and ARGV by name; ``Registered``: one loaded into a client |

Each module defines the scripts its own class runs. Times in scripts come from Redis' own
clock (``now``), so hosts with different clocks agree. Scripts that build key names inside
Lua (a worker's records, a tenant's queue) need one Redis, not a cluster.
"""
