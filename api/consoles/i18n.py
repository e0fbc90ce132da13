"""The consoles' words, in Chinese (the default) and English.

One table, so a page never mixes languages and a missing word fails a test rather
than showing a key.
"""

from __future__ import annotations

from enum import StrEnum


class Lang(StrEnum):
    ZH = "zh"
    EN = "en"


WORDS: dict[str, tuple[str, str]] = {
    "app": ("守护", "Shouhu"),
    "login": ("登录", "Log in"),
    "logout": ("退出", "Log out"),
    "token": ("访问令牌", "Access token"),
    "token_hint": ("由管理员发放（shouhu token create）", "Issued by an admin (shouhu token create)"),
    "login_failed": ("令牌无效、已过期或已吊销", "The token is unknown, expired or revoked"),
    "code_title": ("短信验证码登录", "Sign in with a code by SMS"),
    "sign_in_phone": ("手机号", "Phone number"),
    "code_hint": ("登记在册的工作人员手机号", "The number the registry has for you"),
    "send_code": ("发送验证码", "Text me a code"),
    "code": ("验证码", "Code"),
    "code_sent": ("验证码已发送，请查看手机短信", "A code was sent: see your text messages"),
    "sign_in_code": ("验证码登录", "Sign in with the code"),
    "code_failed": ("验证码错误、已过期或已使用", "The code is wrong, expired or already used"),
    "code_not_sent": ("验证码发送失败，请稍后再试", "The code could not be sent: try again shortly"),
    "phone_invalid": ("手机号格式不正确", "That is not a phone number"),
    "sign_in_locked": ("尝试次数过多，请稍后再试", "Too many tries: try again later"),
    "password_title": ("值班员密码登录", "Operators: sign in with a password"),
    "password_who": ("工号或手机号", "Staff id or phone number"),
    "password": ("密码", "Password"),
    "sign_in_password": ("密码登录", "Sign in with the password"),
    "password_failed": ("账号或密码错误", "The id or the password is wrong"),
    "token_title": ("访问令牌登录", "Sign in with an access token"),
    "my_grids": ("我的网格", "My grids"),
    "on_duty": ("值班中", "On duty"),
    "off_duty": ("不在班", "Off duty"),
    "sent_to_me": ("发给我的通知", "Sent to me"),
    "grid_console": ("网格员工作台", "Grid worker console"),
    "tech_board": ("技术员看板", "Technician board"),
    "overview": ("综治中心总览", "Governance overview"),
    "open_incidents": ("待处置事件", "Open incidents"),
    "nothing_open": ("暂无待处置事件", "Nothing open"),
    "live": ("实时更新", "Live"),
    "reconnecting": ("连接中断，正在重连…", "Connection lost, reconnecting…"),
    "resident": ("老人", "Resident"),
    "address": ("地址", "Address"),
    "phone": ("电话", "Phone"),
    "guardians": ("监护人", "Guardians"),
    "call": ("拨打", "Call"),
    "medical_notes": ("健康备注", "Medical notes"),
    "timeline": ("时间线", "Timeline"),
    "acknowledge": ("接单（我去处置）", "Take it (I am going)"),
    "decline": ("无法前往", "I cannot go"),
    "resolve": ("办结", "Resolve"),
    "outcome": ("处置结果", "Outcome"),
    "note": ("备注", "Note"),
    "state": ("状态", "State"),
    "opened": ("发生时间", "Opened"),
    "taken_by": ("接单人", "Taken by"),
    "area": ("区域", "Area"),
    "device": ("设备", "Device"),
    "reason": ("原因", "Reason"),
    "due": ("截止", "Due"),
    "start_task": ("开始处理", "Start"),
    "close_task": ("销号", "Close"),
    "task": ("任务", "Task"),
    "visit": ("探视任务", "Visit"),
    "repair": ("维修工单", "Repair order"),
    "cameras": ("摄像头", "Cameras"),
    "online_ratio_today": ("今日在线率", "Online today"),
    "online_ratio_period": ("时段在线率", "Online over the period"),
    "offline_list": ("离线摄像头", "Offline cameras"),
    "offline_for": ("离线时长", "Offline for"),
    "open_orders": ("未完成工单（按时间先后）", "Open work orders (oldest first)"),
    "no_orders": ("暂无工单", "No open orders"),
    "chart_title": ("在线率趋势", "Online ratio over time"),
    "period": ("时段", "Period"),
    "from": ("从", "From"),
    "to": ("到", "To"),
    "show": ("查看", "Show"),
    "by_severity": ("按红黄蓝等级与区域", "By severity and area"),
    "now": ("当前", "Now"),
    "in_period": ("时段内", "In the period"),
    "sos_response": ("SOS 响应", "SOS response"),
    "ack_p50": ("接单用时中位数", "Time to take, median"),
    "ack_p90": ("接单用时 P90", "Time to take, p90"),
    "within_60": ("60 秒内接单", "Taken within 60 s"),
    "within_180": ("180 秒内接单", "Taken within 180 s"),
    "reached_platform": ("转应急平台", "Reached the platform"),
    "unreached": ("无人接单", "Unreached"),
    "uncovered_tonight": ("今晚无网格员值班的网格", "Grids without a grid worker on duty tonight"),
    "all_covered": ("今晚所有网格均有人值班", "Every grid is covered tonight"),
    "devices_offline": ("各区域离线设备", "Devices offline by area"),
    "incidents": ("事件", "Incidents"),
    "not_found": ("未找到，或不在您的辖区内", "Not found, or outside your areas"),
    "back": ("返回", "Back"),
    "language": ("English", "中文"),
    "red": ("红", "Red"),
    "yellow": ("黄", "Yellow"),
    "blue": ("蓝", "Blue"),
    "sos": ("一键求助", "SOS"),
    "fall": ("跌倒", "Fall"),
    "sos_unregistered": ("未登记手环求助", "SOS, unregistered band"),
    "wristband_offline": ("手环离线", "Wristband offline"),
    "not_worn": ("手环未佩戴", "Wristband not worn"),
    "low_battery": ("手环电量低", "Low battery"),
    "camera_offline": ("摄像头离线", "Camera offline"),
    "open": ("待接单", "Open"),
    "acknowledged": ("已接单", "Taken"),
    "resolved": ("已办结", "Resolved"),
    "cancelled": ("已取消", "Cancelled"),
    "started": ("处理中", "Started"),
    "closed": ("已销号", "Closed"),
    "done": ("已完成", "Done"),
    "offline_of_total": ("离线/总数", "Offline / all"),
    "wristband": ("手环", "Wristband"),
    "camera": ("摄像头", "Camera"),
    # Timeline events (anything not listed shows as stored).
    "stored": ("消息已入库", "Message stored"),
    "joined": ("再次求助", "Pressed again"),
    "step_started": ("开始通知", "Paging"),
    "no_recipients": ("无人可通知，转下一步", "Nobody reachable, next step"),
    "attempt_sent": ("已发送通知", "Notification sent"),
    "attempt_failed": ("通知失败", "Notification failed"),
    "declined": ("无法前往", "Declined"),
    "task_opened": ("任务已派发", "Task assigned"),
    "task_started": ("开始处理", "Task started"),
    "task_closed": ("任务已销号", "Task closed"),
    "task_escalated": ("逾期升级", "Overdue, escalated"),
    "device_back": ("设备已恢复", "Device back"),
    "flapped": ("设备再次离线", "Device down again"),
    "reescalated": ("超时未办结，重新通知", "Not resolved in time, paging again"),
    "battery_notice": ("电量提醒", "Battery notice"),
}


def word(lang: Lang, key: str) -> str:
    """The word for ``key``; an unknown key is a bug, shown loudly rather than hidden."""
    zh, en = WORDS[key]
    return zh if lang is Lang.ZH else en


def maybe(lang: Lang, key: str | None) -> str:
    """The word for an enum value stored in the database, or the value itself if there is none."""
    if key is None:
        return ""
    return word(lang, key) if key in WORDS else key
