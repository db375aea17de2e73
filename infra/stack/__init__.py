"""The local stack behind ``boltstream up | status | down``: the embedded broker, worker processes and their state."""
