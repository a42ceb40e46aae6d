"""Chime's model layer: the chat format, model and adapter loading, the decide/respond engine, tool
calling, the adapter registry, and storage (`model.storage`: both `bot/` and `training/` need it).

Nothing here imports `bot` or `training`; both of them import from here.
"""

import os

# oneDNN caches a primitive (with scratch memory) per matmul shape; while generating, every token
# has a new key length, so the default 1,024-entry cache grows the process by hundreds of MB.
# 64 entries keep the simulator near 1.2 GB peak (was 1.6 GB) for ~5% of generation speed (BENCHMARKS.md).
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")
