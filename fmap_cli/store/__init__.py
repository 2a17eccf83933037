"""The fmap file format and the only code that creates, opens, appends to, seeds, merges and checks
fmap files. h5py and numpy only (never torch), so readers start fast.

- ``schema``: the format as data (every attribute and dataset, with types and meanings).
- ``reader``: open a file for reading and check that it is a complete fmap file.
- ``writer``: write maps batch by batch; ``continuation``: --resume and --append.
- ``merge``: combine shard files; ``chunks``: chunk layout and chunk I/O; ``stats``: write-time statistics.
"""
