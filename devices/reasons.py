"""Why a device is offline, in words for people.

``device_state.offline_reason`` keeps the hub's code (``no_heartbeat``, ``last_will``,
``reported:<the camera's own reason>``, hub/liveness.py); a technician's SMS and board
say what it means. A camera's own word that is not one of the contract's is shown as
the camera gave it.
"""

from __future__ import annotations

from datetime import timedelta

# (Chinese, English) for each code; a camera's reasons are docs/contract.md's.
LABELS: dict[str, tuple[str, str]] = {
    "no_heartbeat": ("心跳超时", "no heartbeat"),
    "last_will": ("连接断开", "connection lost"),
    "video_lost": ("视频丢失", "video lost"),
    "defect": ("设备故障", "defect"),
    "power": ("断电", "power failure"),
    "network": ("网络中断", "network down"),
    "storage": ("存储故障", "storage failure"),
}
REPORTED = "reported:"


def offline_reason_text(reason: str | None, english: bool = False) -> str:
    """``reported:power`` → 断电 (``power failure``); an unknown code as it is."""
    if not reason:
        return ""
    code = reason.removeprefix(REPORTED)
    if code == "reported":  # a report of offline that gave no reason
        return "设备自报离线" if not english else "reported offline"
    label = LABELS.get(code)
    return label[1 if english else 0] if label else code


def how_long_text(how_long: timedelta) -> str:
    """A duration as an SMS says it: 45秒, 12分钟, 3小时 (whole units, rounded down)."""
    seconds = max(int(how_long.total_seconds()), 0)
    if seconds < 60:
        return f"{seconds}秒"
    if seconds < 3600:
        return f"{seconds // 60}分钟"
    return f"{seconds // 3600}小时"
