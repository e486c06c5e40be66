"""The gpuledger daemon: a Unix-socket front over the ledger for slurmctld and users.

Modules: ``protocol`` (the wire format), ``auth`` (peer credentials, who may do what),
``handlers`` (one function per operation, calling the ledger's service API),
``server`` (the threaded socket server and its request log), ``client`` (the Python
client the CLI and tests use), ``cli`` (``serve``, ``balance``, ``quote``, ``jobs``).
"""
