"""The bottom layer: typed configuration, topic administration and reading, free ports, and the contract
constants every component shares. Imports only :mod:`boltstream.schemas` and third-party libraries."""
