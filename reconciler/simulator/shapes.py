"""The exact JSON each simulated provider answers and sends, written from PROVIDERS.md.

Pure functions of a task, the status to show and the time it changed; no I/O, no state.
Deliberately independent of `reconciler.providers`: these shapes are the provider's side of
the contract, so they are written out literally rather than derived from the adapters.

Choices where the providers' documents are silent (PROVIDERS.md [U]/[I]):
- Kling: an unknown task id is HTTP 404 with code 1203.
- CometAPI: an unknown task id is HTTP 404 with an OpenAI-style `task_not_exist` error.
- Gateway: every rendering shares new-api's HTTP 400 `task_not_exist`; callbacks are Kling's
  legacy body carrying the gateway's own task id (older new-api builds, where the two ids
  coincide), so they can be matched.
- Kie: errors carry the HTTP status equal to the body `code` (401, 404, 429, 500); Veo's
  naive `YYYY-MM-DD HH:MM:SS` times are UTC; a failed Market job calls back with code 501.
- AceData: a task is `submitted` while its record has no `response`, `processing` while the
  response has no `success`.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from reconciler.simulator.world import SimTask, Status

JSON = dict[str, Any]

KLING_WORDS = {"submitted": "submitted", "processing": "processing"}
KLING_WORDS |= {"completed": "succeed", "failed": "failed"}
DURATION = "5.1"
KIE_MODEL = "kling-2.6/text-to-video"


def ms(at: datetime) -> int:
    return int(at.timestamp() * 1000)


def seconds(at: datetime) -> int:
    return int(at.timestamp())


# -- Kling and its passthroughs ---------------------------------------------------------


def kling_task(task: SimTask, status: Status, *, in_seconds: bool = False) -> JSON:
    """The legacy task object: the query's `data`, and the callback body as it is."""
    stamp = seconds if in_seconds else ms
    result: JSON = {}
    if status == "completed":
        result = {"videos": [{"id": task.video_id, "url": task.video_url, "duration": DURATION}]}
    info: JSON = {}
    if task.external_task_id is not None:
        info["external_task_id"] = task.external_task_id
    body: JSON = {
        "task_id": task.task_id,
        "task_status": KLING_WORDS[status],
        "task_status_msg": task.error_message if status == "failed" else "",
        "task_info": info,
        "task_result": result,
        "created_at": stamp(task.created_at),
        "updated_at": stamp(task.changed_at(status)),
    }
    if status == "completed":
        body["final_unit_deduction"] = "5"
    return body


def kling_envelope(data: object, request_id: str) -> JSON:
    # "SUCCEED" even when the task failed: the reason is only in data.task_status_msg.
    return {"code": 0, "message": "SUCCEED", "request_id": request_id, "data": data}


def kling_error(code: int, message: str, request_id: str) -> JSON:
    return {"code": code, "message": message, "request_id": request_id}


def openai_error(message: str, code: str, error_type: str) -> JSON:
    return {"error": {"message": message, "type": error_type, "param": "", "code": code}}


# -- Gateway renderings -------------------------------------------------------------------

GATEWAY_TASKDTO = {"submitted": "SUBMITTED", "processing": "IN_PROGRESS"}
GATEWAY_TASKDTO |= {"completed": "SUCCESS", "failed": "FAILURE"}
GATEWAY_PROGRESS = {"submitted": "10%", "processing": "30%", "completed": "100%", "failed": "100%"}
GATEWAY_SIMPLIFIED = {"submitted": "queued", "processing": "processing"}
GATEWAY_SIMPLIFIED |= {"completed": "succeeded", "failed": "failed"}
GATEWAY_OPENAI = {"submitted": "queued", "processing": "in_progress"}
GATEWAY_OPENAI |= {"completed": "completed", "failed": "failed"}


def gateway_query(task: SimTask, status: Status, request_id: str) -> JSON:
    rendering = task.rendering or "taskdto"
    url = task.video_url if status == "completed" else ""
    if rendering in ("taskdto", "taskdto-legacy"):
        if status == "completed":
            fail_reason = task.video_url  # sic: new-api stores the result URL here
        elif status == "failed":
            fail_reason = "SUCCEED" if rendering == "taskdto-legacy" else task.error_message
        else:
            fail_reason = ""
        started = status != "submitted"
        return {
            "code": "success",
            "message": "",
            "data": {
                "task_id": task.task_id,
                "action": task.action,
                "status": GATEWAY_TASKDTO[status],
                "fail_reason": fail_reason,
                "submit_time": seconds(task.created_at),
                "start_time": seconds(task.processing_at) if started else 0,
                "finish_time": seconds(task.finished_at)
                if status in ("completed", "failed")
                else 0,
                "progress": GATEWAY_PROGRESS[status],
                "data": kling_envelope(kling_task(task, status), request_id),
            },
        }
    if rendering == "simplified":
        error = (
            {"message": task.error_message, "code": "task_failed"} if status == "failed" else None
        )
        return {
            "code": "success",
            "data": {
                "error": error,
                "format": "mp4",
                "metadata": None,
                "status": GATEWAY_SIMPLIFIED[status],
                "task_id": task.task_id,
                "url": url,
            },
        }
    if rendering == "kling-native":
        data = kling_task(task, status, in_seconds=True)
        if status == "completed":
            video = data["task_result"]["videos"][0]
            video["watermark_url"] = f"{task.video_url}?watermark=1"
            data["task_result"]["images"] = None
        return {"task_id": task.task_id} | kling_envelope(data, request_id)
    # OpenAI-video style: no envelope, and an `error` object even on success.
    failed = status == "failed"
    return {
        "task_id": task.task_id,
        "status": GATEWAY_OPENAI[status],
        "url": url,
        "format": "mp4",
        "metadata": {"duration": 5.1, "fps": 24, "width": 1280, "height": 720, "seed": 42}
        if status == "completed"
        else None,
        "error": {"code": "task_failed" if failed else 0, "message": task.error_message or ""},
    }


def gateway_error(task: SimTask | None, code: str, message: str) -> JSON:
    """new-api's task-route error, or the OpenAI-style one for an openai-rendered task."""
    if task is not None and task.rendering == "openai":
        return openai_error(message, code, "new_api_error")
    return {"code": code, "message": message, "data": None}


# -- AceData ------------------------------------------------------------------------------


def acedata_response(task: SimTask, status: Status) -> JSON:
    """The record's `response` (and, plus `trace_id`, the flat callback body)."""
    if status == "completed":
        return {
            "success": True,
            "video_id": task.video_id,
            "video_url": task.video_url,
            "duration": DURATION,
            "state": "succeed",
            "task_id": task.task_id,
        }
    if status == "failed":
        return {
            "success": False,
            "state": "failed",
            "task_id": task.task_id,
            "error": {"code": "api_error", "message": task.error_message},
        }
    return {"state": "processing", "task_id": task.task_id}


def acedata_record(task: SimTask, status: Status) -> JSON:
    record: JSON = {
        "id": task.task_id,
        "job_id": task.job_id,
        "trace_id": task.trace_id,
        "type": "videos",
        "request": {
            "action": task.action,
            "model": "kling-v2-1",
            "prompt": "a cat walking on the beach",
            "callback_url": task.callback_url,
        },
        "created_at": task.created_at.timestamp(),
    }
    if status != "submitted":
        record["started_at"] = task.processing_at.timestamp()
        record["response"] = acedata_response(task, status)
    if status in ("completed", "failed"):
        record["finished_at"] = task.finished_at.timestamp()
        record["elapsed"] = round((task.finished_at - task.created_at).total_seconds(), 3)
    return record


def acedata_callback(task: SimTask, status: Status) -> JSON:
    if status == "failed":
        return {
            "success": False,
            "task_id": task.task_id,
            "trace_id": task.trace_id,
            "error": {"code": "api_error", "message": task.error_message},
        }
    body = acedata_response(task, status)
    body["trace_id"] = task.trace_id
    return body


def acedata_error(code: str, message: str, trace_id: str) -> JSON:
    return {"success": False, "error": {"code": code, "message": message}, "trace_id": trace_id}


# -- Kie ----------------------------------------------------------------------------------

# Kie's published `param` example holds an invalid JSON escape (a backslash before U+2019):
# a client that parses what it does not need breaks on it, so the simulator serves it too.
KIE_PARAM = (
    '{"model":"kling-2.6/text-to-video","callBackUrl":%s,'
    '"input":{"prompt":"A kitten\\\u2019s first steps on the beach","duration":"5"}}'
)


def kie_job_state(task: SimTask, status: Status, now: datetime) -> str:
    if status == "submitted":
        halfway = task.created_at + (task.processing_at - task.created_at) / 2
        return "waiting" if now < halfway else "queuing"
    return {"processing": "generating", "completed": "success", "failed": "fail"}[status]


def kie_job(task: SimTask, status: Status, now: datetime) -> JSON:
    done = status in ("completed", "failed")
    result = json.dumps({"resultUrls": [task.video_url]}) if status == "completed" else ""
    return {
        "taskId": task.task_id,
        "model": KIE_MODEL,
        "state": kie_job_state(task, status, now),
        "param": KIE_PARAM % json.dumps(task.callback_url),
        "resultJson": result,
        "failCode": "501" if status == "failed" else "",
        "failMsg": task.error_message if status == "failed" else "",
        "costTime": ms(task.finished_at) - ms(task.processing_at) if done else 0,
        "completeTime": ms(task.finished_at) if done else None,
        "createTime": ms(task.created_at),
        "updateTime": ms(task.changed_at(status)),
    }


def kie_job_callback(task: SimTask, status: Status) -> JSON:
    """Same structure as the query answer ("回调内容结构与查询任务 API 的响应相同")."""
    if status == "failed":
        return {
            "code": 501,
            "msg": task.error_message,
            "data": kie_job(task, status, task.finished_at),
        }
    return {"code": 200, "msg": "success", "data": kie_job(task, status, task.finished_at)}


def kie_time(at: datetime) -> str:
    return at.strftime("%Y-%m-%d %H:%M:%S")


def kie_veo(task: SimTask, status: Status) -> JSON:
    flag = {"submitted": 0, "processing": 0, "completed": 1, "failed": 2}[status]
    response = None
    if status == "completed":
        response = {
            "taskId": task.task_id,
            "resultUrls": [task.video_url],
            "originUrls": [],
            "resolution": "1080p",
        }
    return {
        "taskId": task.task_id,
        "paramJson": json.dumps({"prompt": "a cat", "callBackUrl": task.callback_url}),
        "completeTime": kie_time(task.finished_at) if flag else None,
        "createTime": kie_time(task.created_at),
        "response": response,
        "successFlag": flag,
        "errorCode": 501 if status == "failed" else None,
        "errorMessage": task.error_message if status == "failed" else "",
        "fallbackFlag": False,
    }


def kie_veo_callback(task: SimTask, status: Status) -> JSON:
    data: JSON
    if status == "failed":
        data = {"taskId": task.task_id, "info": None, "fallbackFlag": False}
        return {"code": 501, "msg": task.error_message, "data": data}
    info: JSON = {"resultUrls": [task.video_url], "originUrls": [], "resolution": "1080p"}
    data = {"taskId": task.task_id, "info": info, "fallbackFlag": False}
    return {"code": 200, "msg": "Veo3 video generated successfully.", "data": data}


def kie_error(code: int, msg: str) -> JSON:
    return {"code": code, "msg": msg, "data": None}


# -- Callbacks ----------------------------------------------------------------------------


def callback_body(task: SimTask, status: Status) -> JSON:
    """What the provider POSTs to the task's callback_url when it enters `status`."""
    if task.provider == "acedata":
        return acedata_callback(task, status)
    if task.provider == "kie":
        if task.action == "veo":
            return kie_veo_callback(task, status)
        return kie_job_callback(task, status)
    return kling_task(task, status)
