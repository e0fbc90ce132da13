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
    "target": ("目标", "target"),
    "meets_target": ("达标", "meets the target"),
    "below_target": ("未达标", "below the target"),
    "supervise": ("督办", "Supervise"),
    "supervised": ("已督办", "Supervised"),
    "overdue": ("已逾期", "Overdue"),
    "supervision": ("督办", "Supervision"),
    "supervised_in_period": ("时段内督办", "Supervised in the period"),
    "supervised_open": ("督办后仍未办结", "Supervised, still open"),
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
    "scheduled_visit": ("定期探视", "Recurring visit"),
    "follow_up": ("求助后回访", "Follow-up after an SOS"),
    "scheduled": ("定期探视", "Recurring visit"),
    "visit_rate": ("本月探视率（目标 100%）", "Visits on time this month (target 100 %)"),
    "visits_due": ("应探视", "Due"),
    "visits_on_time": ("按时完成", "On time"),
    "visits_late": ("逾期完成", "Late"),
    "visits_missed": ("未完成", "Missed"),
    "visit_rate_short": ("探视率", "Rate"),
    "exports": ("导出报表", "Export"),
    "export_incidents": ("事件", "Incidents"),
    "export_visits": ("探视", "Visits"),
    "export_repairs": ("维修工单", "Repair orders"),
    "export_uptime": ("摄像头在线率", "Camera uptime"),
    "no_visits_due": ("本月暂无到期探视", "No visit due this month yet"),
    "total": ("合计", "Total"),
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
    "step_advanced": ("提前转下一步", "Next step brought forward"),
    "cancel_received": ("收到手环取消", "Cancel received from the band"),
    "cancel_refused": ("取消未生效", "Cancel refused"),
    "nobody_reachable": ("整轮无人可通知", "Nobody reachable in the whole round"),
    "provider_fallback": (
        "呼叫失败（{failed}：{error}），改由{to}发送",
        "{failed} failed ({error}); sent through {to}",
    ),
    "providers_down": (
        "电话服务商全部故障（{providers}），已告警值班员",
        "Every phone provider failed ({providers}); operators alarmed",
    ),
    "invariant_repaired": ("通知链中断，已从头重新通知", "Escalation restarted after a gap"),
    "owners_told": ("已告知负责人", "Owners told"),
    "spool_paged": ("数据库中断期间由网关直接通知", "Paged by the hub while the database was down"),
    # The incident's story (api/consoles/story.py): steps, attempts, who acted.
    "story": ("处置经过", "What happened"),
    "no_story": ("尚无记录", "Nothing recorded yet"),
    "no_attempts": ("尚未通知任何人", "Nobody has been paged yet"),
    "no_guardians": ("未登记监护人", "No guardian registered"),
    "nothing_offline": ("当前没有离线设备", "No device is offline"),
    "no_offline_cameras": ("当前没有离线摄像头", "No camera is offline"),
    "no_cameras": ("辖区内没有摄像头", "No cameras in your areas"),
    "no_incidents_period": ("该时段内没有事件", "No incidents in this period"),
    "no_timeline": ("尚无记录", "Nothing recorded yet"),
    "ch_voice": ("电话", "Call"),
    "ch_sms": ("短信", "SMS"),
    "ch_console": ("控制台", "Console"),
    "ch_webhook": ("平台", "Platform"),
    "via_voice": ("电话按键", "by phone keypress"),
    "via_sms": ("短信回复", "by SMS reply"),
    "via_console": ("控制台", "on the console"),
    "via_api": ("接口", "through the API"),
    "role_grid_worker": ("网格员", "grid worker"),
    "role_technician": ("技术员", "technician"),
    "role_operator": ("综治中心", "operator"),
    "role_duty_officer": ("值班员", "duty officer"),
    "role_guardian": ("监护人", "guardian"),
    "role_platform": ("应急平台", "emergency platform"),
    "role_admin": ("管理员", "admin"),
    "target_grid_worker": ("网格员", "the grid workers"),
    "target_guardians": ("监护人", "the guardians"),
    "target_emergency_platform": ("应急呼叫平台", "the emergency platform"),
    "target_operators": ("综治中心值班员", "the operators"),
    "target_technicians": ("技术员", "the technicians"),
    "purpose_repage": ("再次呼叫", "called again"),
    "purpose_notice": ("告知", "told"),
    "purpose_cap_alert": ("推送警报", "alert"),
    "purpose_cap_update": ("推送更新", "update"),
    "purpose_cap_cancel": ("推送取消", "cancel"),
    "res_waiting": ("等待发送", "waiting to be sent"),
    "res_sending": ("发送中", "sending"),
    "res_rang": ("已拨出，振铃中", "rang"),
    "res_sent": ("已发出", "sent"),
    "res_shown": ("已推送到控制台", "shown on the console"),
    "res_accepted": ("平台已接收", "accepted by the platform"),
    "res_delivered": ("短信已送达", "SMS delivered"),
    "res_pressed_1": ("接听并按 1：前往处置", "answered, pressed 1: going"),
    "res_pressed_2": ("接听并按 2：无法前往", "answered, pressed 2: declined"),
    "res_answered": ("已接听", "answered"),
    "res_busy": ("占线", "busy"),
    "res_no_answer": ("无人接听", "no answer"),
    "res_no_keypress": ("接听但未按键（可能是语音信箱）", "answered without a keypress (voicemail?)"),
    "res_undelivered": ("短信未送达", "SMS not delivered"),
    "res_failed": ("失败", "failed"),
    "res_cancelled": ("未发送：已有人接单或事件已结束", "not sent: taken or closed first"),
    "try_n": ("第 {n} 次", "try {n}"),
    "step_n": ("第 {n} 步", "step {n}"),
    "round_n": ("第 {n} 轮", "round {n}"),
    "paging": ("通知", "paging "),
    "next_step": ("无人接单则", "If nobody takes it"),
    "took_it": ("接单", "took it"),
    "cannot_go": ("无法前往", "cannot go"),
    "resolved_as": ("办结", "resolved"),
    "pressed_again_taker": ("老人再次求助，重新呼叫接单人", "pressed again: calling whoever took it"),
    "cancelled_on_band": ("老人在手环上取消求助", "cancelled on the wristband"),
    "sos_stored": ("收到报警", "Alarm received"),
    "system": ("系统", "System"),
    "auto_paging": ("自动通知", "Automatic paging"),
    "device_check": ("设备巡检", "Device check"),
    "phone_network": ("电话网络", "Phone network"),
    "hub": ("网关", "Hub"),
    "api_token": ("接口令牌 #{n}", "API token #{n}"),
    "staff_member": ("工作人员 {n}", "staff member {n}"),
    "guardian_of": ("监护人 {n}", "guardian {n}"),
    "device_n": ("设备 {n}", "device {n}"),
    "sms_from": ("短信 {n}", "SMS from {n}"),
    "call_from": ("电话 {n}", "call from {n}"),
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


def person_label(lang: Lang, name: str, role: str | None) -> str:
    """ "董思远（网格员）": a name with its role in words; a name that carries its role already is kept."""
    key = f"role_{role}"
    if not role or key not in WORDS or "（" in name or "(" in name:
        return name
    return f"{name}（{word(lang, key)}）" if lang is Lang.ZH else f"{name} ({word(lang, key)})"


# Actors stored by machines, by prefix, in the words a person reads. Order matters:
# "router-shouhu-hub-x" is the router of hub x, not the hub.
_ACTOR_PREFIXES: tuple[tuple[str, str], ...] = (
    ("token:", "api_token"),
    ("staff:", "staff_member"),
    ("guardian:", "guardian_of"),
    ("device:", "device_n"),
    ("sms:", "sms_from"),
    ("phone:", "call_from"),
    ("voice:", "call_from"),
)
_SYSTEM_ACTORS: dict[str, str] = {
    "care": "device_check",
    "sweeper": "system",
    "twilio": "phone_network",
    "emergency-platform": "role_platform",
    "platform": "role_platform",
}


def actor_label(lang: Lang, actor: str | None) -> str:
    """Who did something, as a person reads it: "token:3" → "接口令牌 #3", "router-…" → "自动通知".

    A name (``董思远（网格员）``) and anything not recognised as a machine's id pass
    through unchanged: the label never hides a person behind a category.
    """
    if not actor:
        return ""
    for prefix, key in _ACTOR_PREFIXES:
        if actor.startswith(prefix) and len(actor) > len(prefix):
            return word(lang, key).format(n=actor[len(prefix) :])
    if actor in _SYSTEM_ACTORS:
        return word(lang, _SYSTEM_ACTORS[actor])
    if actor.startswith("router-"):
        return word(lang, "auto_paging")
    if actor.startswith("shouhu-hub-"):
        return word(lang, "hub")
    return actor
