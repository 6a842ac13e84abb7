"""``/api/v1/videos``: open a video, prompt objects on any frame, propagate with the frames streamed as
NDJSON, correct and propagate again, export YouTube-VIS JSON; sessions in :mod:`.videos`.

Needs a SAM 2 model: with any other model every video request is answered 400, saying so.
"""

import asyncio
import json
import os
import shutil
import tempfile
import threading
from typing import Any, Dict, List, Optional

from .videos import (VideoAPIError, VideoSessions, VideoSettings, decode_mask_prompt, frame_payload,
                     resolve_video_path)

API = "/api/v1"
NDJSON = "application/x-ndjson"
_END = object()


class LoopSink:
    """Hands a propagation's lines from its thread to the response's event loop.

    Frame lines wait while ``frames_ahead`` of them are unread (a slow client slows the tracker down instead
    of piling up results); the final line never waits."""

    def __init__(self, loop: asyncio.AbstractEventLoop, frames_ahead: int) -> None:
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.slots = threading.Semaphore(frames_ahead)
        self.reader_gone = False

    def _push(self, item) -> bool:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
            return True
        except RuntimeError:   # the event loop is closed: the server stopped
            self.reader_gone = True
            return False

    def put(self, item, stopped) -> bool:
        while not self.slots.acquire(timeout=0.2):
            if stopped() or self.reader_gone:
                return False
        if self.reader_gone:
            return False
        return self._push(item)

    def finish(self, item) -> None:
        if self._push(item):
            self._push(_END)


def add_video_routes(app, model, engine, settings, auth: List,
                     video_settings: Optional[VideoSettings] = None) -> VideoSessions:
    """Register the video API on ``app`` for ``model`` (model calls go through ``engine.run``)."""
    from fastapi import File, HTTPException, Query, UploadFile
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import StreamingResponse

    from .contract import errors
    from .schemas import MaskFormat
    from .video_schemas import (CancelResponse, ClearPromptsRequest, DeleteVideoResponse, FrameMasks,
                                PropagateRequest, RemoveObjectResponse, VideoFileRequest, VideoInfo, VideoList,
                                VideoPromptRequest)

    videos = VideoSessions(model, engine.run, video_settings or VideoSettings.from_server(settings),
                           max_pixels=getattr(settings, "max_pixels", None))
    app.state.videos = videos
    on_shutdown = getattr(app.router, "on_shutdown", None)
    if isinstance(on_shutdown, list):
        on_shutdown.append(videos.close_all)
    tags = ["videos"]
    # Error answers beyond those the contract derives from each route's inputs: 400 from a route without
    # inputs when the model is not a SAM 2 one, 409 from those that lock a session, 429 from those that open one.
    needs_sam2 = errors(400, e400="the served model is not a SAM 2 model, or an invalid request")
    busy = errors(409, e409="the session is propagating or busy with another request")
    full = errors(429, e429="as many sessions are open as the server allows")

    def call(fn, *args, **kwargs):
        """Run a session operation, turning its errors into HTTP answers."""
        try:
            return fn(*args, **kwargs)
        except VideoAPIError as exc:
            raise HTTPException(exc.status, str(exc)) from None
        except FileNotFoundError as exc:
            raise HTTPException(404, str(exc)) from None

    def info(session) -> Dict[str, Any]:
        return session.info(videos.settings.idle_timeout_s)

    def frame_answer(session, frame_idx, records, masks, fmt: str) -> Dict[str, Any]:
        return frame_payload(session.id, frame_idx, records, session.results, fmt, masks)

    # ----------------------------------------------------------------------------------- open
    @app.post(f"{API}/videos", response_model=VideoInfo, tags=tags, dependencies=auth,
              summary="upload a video file and open it as a tracking session (encodes its first frame)",
              responses=full)
    def open_upload(file: UploadFile = File(..., description="a video file: mp4, mov, webm, mkv, avi, ...")):
        call(videos.require_video)
        upload_dir = tempfile.mkdtemp(prefix="anyseg-upload-")
        name = os.path.basename(file.filename or "") or "upload"
        suffix = os.path.splitext(name)[1].lower()
        target = os.path.join(upload_dir, "video" + (suffix if suffix.isascii() and len(suffix) <= 6 else ""))
        try:
            with open(target, "wb") as out:
                shutil.copyfileobj(file.file, out, 1024 * 1024)
            if os.path.getsize(target) == 0:
                raise ValueError("the uploaded video file is empty")
        except BaseException:
            shutil.rmtree(upload_dir, ignore_errors=True)
            raise
        return info(call(videos.open, target, name, upload_dir))

    @app.post(f"{API}/videos/from-file", response_model=VideoInfo, tags=tags, dependencies=auth,
              summary="open a video file or JPEG-frame folder of the served folder as a tracking session",
              responses={**full, **errors(404, e404="no such video in the served folder, or no --images")})
    def open_file(body: VideoFileRequest):
        call(videos.require_video)
        if settings.images_dir is None:
            raise HTTPException(404, "this server was started without --images: there is no folder to open "
                                     "videos from (upload the file instead: POST /api/v1/videos)")
        path = call(resolve_video_path, settings.images_dir, body.path)
        return info(call(videos.open, path, body.path.rstrip("/")))

    # ------------------------------------------------------------------------------ sessions
    @app.get(f"{API}/videos", response_model=VideoList, tags=tags, dependencies=auth,
             summary="the open video sessions and the limits", responses=needs_sam2)
    def list_videos():
        call(videos.require_video)
        return VideoList(sessions=[info(s) for s in videos.list()], max_sessions=videos.settings.max_sessions,
                         idle_timeout_s=videos.settings.idle_timeout_s)

    @app.get(f"{API}/videos/{{video_id}}", response_model=VideoInfo, tags=tags, dependencies=auth,
             summary="a session's video, objects, prompted frames and state")
    def get_video(video_id: str):
        return info(call(videos.get, video_id))

    @app.delete(f"{API}/videos/{{video_id}}", response_model=DeleteVideoResponse, tags=tags, dependencies=auth,
                summary="close a session (a running propagation stops after its current frame)")
    def delete_video(video_id: str):
        return call(videos.delete, video_id)

    # ------------------------------------------------------------------------------- prompts
    @app.post(f"{API}/videos/{{video_id}}/prompts", response_model=FrameMasks, tags=tags, dependencies=auth,
              summary="clicks, a box or a mask for an object on a frame; returns that frame's masks", responses=busy)
    def add_prompt(video_id: str, body: VideoPromptRequest):
        session = call(videos.get, video_id)
        mask = None
        if body.mask_png is not None or body.mask_rle is not None:
            mask = decode_mask_prompt(body.mask_png, body.mask_rle, session.height, session.width)
        session, frame_idx, records, masks = call(
            videos.add_prompt, video_id, body.frame_idx, body.obj_id, points=body.points, labels=body.labels,
            box=body.box, clear_old_points=body.clear_old_points, mask=mask, max_points=settings.max_points)
        return frame_answer(session, frame_idx, records, masks, body.format)

    @app.post(f"{API}/videos/{{video_id}}/clear-prompts", response_model=FrameMasks, tags=tags,
              dependencies=auth, summary="remove an object's prompts on a frame; returns that frame's masks",
              responses=busy)
    def clear_prompts(video_id: str, body: ClearPromptsRequest):
        session, frame_idx, records, masks = call(videos.clear_prompts, video_id, body.frame_idx, body.obj_id)
        return frame_answer(session, frame_idx, records, masks, body.format)

    @app.delete(f"{API}/videos/{{video_id}}/objects/{{obj_id}}", response_model=RemoveObjectResponse, tags=tags,
                dependencies=auth, summary="remove an object, its prompts and its results", responses=busy)
    def remove_object(video_id: str, obj_id: int,
                      format: MaskFormat = Query("coco_rle", description="how the masks are encoded")):
        session, frames = call(videos.remove_object, video_id, obj_id)
        return {"id": session.id, "obj_ids": list(session.obj_ids),
                "updated_frames": [frame_answer(session, f, r, m, format) for f, r, m in frames]}

    @app.post(f"{API}/videos/{{video_id}}/reset", response_model=VideoInfo, tags=tags, dependencies=auth,
              summary="remove every object, prompt and result (the video stays open)", responses=busy)
    def reset(video_id: str):
        return info(call(videos.reset, video_id))

    # ---------------------------------------------------------------------------- propagation
    @app.post(f"{API}/videos/{{video_id}}/propagate", tags=tags, dependencies=auth,
              summary="track every object; the frames are streamed as NDJSON lines while tracking runs",
              responses={200: {"content": {NDJSON: {}},
                               "description": "one JSON object per line: {'type': 'frame', ...} per tracked "
                                              "frame, in tracking order, then {'type': 'end', 'status': "
                                              "'completed' | 'cancelled' | 'error', 'frames', 'detail'}"},
                         **busy})
    async def propagate(video_id: str, body: PropagateRequest):
        sink = LoopSink(asyncio.get_running_loop(), videos.settings.frames_ahead)
        job = await run_in_threadpool(call, videos.start_propagation, video_id, sink, direction=body.direction,
                                      start_frame_idx=body.start_frame_idx, max_frames=body.max_frames,
                                      fmt=body.format)

        async def lines():
            finished = False
            try:
                while True:
                    item = await sink.queue.get()
                    if item is _END:
                        finished = True
                        return
                    yield (json.dumps(item, separators=(",", ":")) + "\n").encode()
                    if item.get("type") == "frame":
                        sink.slots.release()
            finally:
                if not finished:
                    sink.reader_gone = True
                    job.cancel("the client disconnected")

        return StreamingResponse(lines(), media_type=NDJSON,
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post(f"{API}/videos/{{video_id}}/propagate/cancel", response_model=CancelResponse, tags=tags,
              dependencies=auth, summary="stop a running propagation after its current frame")
    def cancel(video_id: str):
        return {"id": video_id, "cancelled": call(videos.cancel, video_id)}

    # -------------------------------------------------------------------------------- results
    @app.get(f"{API}/videos/{{video_id}}/frames/{{frame_idx}}", response_model=FrameMasks, tags=tags,
             dependencies=auth, summary="the masks last computed on a frame (by a prompt or by tracking)")
    def get_frame(video_id: str, frame_idx: int,
                  format: MaskFormat = Query("coco_rle", description="how the masks are encoded")):
        session = call(videos.get, video_id)
        frame_idx = session.check_frame(frame_idx)
        records = session.results.get(frame_idx)
        if records is None:
            return {"id": session.id, "frame_idx": frame_idx, "obj_ids": [], "format": format, "masks": [],
                    "tracked": False}
        return frame_payload(session.id, frame_idx, records, session.results, format)

    @app.get(f"{API}/videos/{{video_id}}/export", tags=tags, dependencies=auth,
             summary="every frame's masks as YouTube-VIS style JSON (COCO RLE per object per frame)")
    def export(video_id: str):
        return call(videos.export, video_id)

    return videos
