"""Gateways: protocols real devices speak, turned into the v1 MQTT contract.

``watch_frames`` frames the text protocol of the Chinese 4G watches (``[MF*ID*LEN*CONTENT]``);
``watch_messages`` maps those frames to v1 messages. Both are pure: no sockets, no clock
of their own. The layer sits on ``shouhu/`` and ``devices/`` only.
"""
