"""Chime's model layer: the chat format, model and adapter loading, and the decide/respond engine.

Nothing here imports `bot` or `training`; both of them import from here.
"""
