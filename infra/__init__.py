"""Everything around the data path, one layer per subpackage: ``common`` (the bottom layer every package
imports: configuration, topics, ports, contract constants), ``serving`` (vLLM, weight sync, router,
canary), ``stack`` (the local stack), ``demo`` and the ``cli`` on top; ``deploy/`` holds the files for
real clusters. This package itself imports nothing."""
