"""NutriBot over HTTP (FastAPI): POST /ask, POST /search, GET /health, the OpenAPI schema, the chat page.

POST /ask with "stream": true answers as newline-delimited JSON events, so the page can show the
warnings before the first word of the answer:
    {"event": "found", "warnings": [...], "contraindications": [...], "documents": [...]}
    {"event": "text", "text": "..."}            (repeated, the answer as it is generated)
    {"event": "done", "result": {...}}           (the same object as the non-streamed reply)
    {"event": "error", "detail": "..."}          (instead of "done" if generation failed)

The model is shared: the retriever's lock lets one request use it at a time, so concurrent
generations cannot mix. Patient text is never logged, and error replies do not echo request
fields back.
"""

from __future__ import annotations

import json
import queue
import threading
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from nutribot.retriever import ClaraRetriever, SearchResult, numerics

MAX_BODY_BYTES = 64 * 1024
MAX_QUERY_CHARS = 2_000
MAX_CONTEXT_CHARS = 20_000


class AskRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    query: str = Field(min_length=1, max_length=MAX_QUERY_CHARS, description="the question")
    patient_context: str = Field(default="", max_length=MAX_CONTEXT_CHARS,
                                 description="free-text patient context: conditions, medications, allergies")
    top_k: int = Field(default=5, ge=1, le=20, description="documents to retrieve and answer from")
    stream: bool = Field(default=False, description="answer as newline-delimited JSON events (POST /ask only)")


class ContraindicationOut(BaseModel):
    name: str
    evidence: str
    restricts: list[str]
    reason: str


class DocumentOut(BaseModel):
    id: str
    title: str
    text: str
    source: str
    page: int | None
    score: float
    warnings: list[str]


class AskResponse(BaseModel):
    answer: str
    warnings: list[str]
    contraindications: list[ContraindicationOut]
    documents: list[DocumentOut]
    mode: str


class SearchResponse(BaseModel):
    contraindications: list[ContraindicationOut]
    documents: list[DocumentOut]
    mode: str


class HealthResponse(BaseModel):
    status: str
    mode: str
    documents: int
    knowledge: str
    checkpoint: str
    stage: str
    numerics: str


def _found_json(found: SearchResult) -> dict:
    return {"warnings": found.warnings(),
            "contraindications": [c.to_json() for c in found.contraindications],
            "documents": [d.to_json() for d in found.documents]}


def _events(retriever: ClaraRetriever, request: AskRequest):
    """Runs the answer in a thread; yields its events as JSON lines while it runs."""
    events: queue.Queue = queue.Queue()

    def work():
        try:
            reply = retriever.answer(request.query, request.patient_context, request.top_k,
                                     on_text=lambda text: events.put({"event": "text", "text": text}),
                                     on_found=lambda found: events.put({"event": "found", **_found_json(found)}))
            events.put({"event": "done", "result": reply.to_json()})
        except (ValueError, TypeError) as e:
            events.put({"event": "error", "detail": str(e)})
        except Exception:  # noqa: BLE001 - the stream must end; the detail may hold patient text
            events.put({"event": "error", "detail": "internal error while answering"})

    threading.Thread(target=work, daemon=True).start()
    while True:
        event = events.get()
        yield json.dumps(event, ensure_ascii=False) + "\n"
        if event["event"] in ("done", "error"):
            return


def create_app(retriever: ClaraRetriever) -> FastAPI:
    app = FastAPI(title="NutriBot", version="0.1.0",
                  description="Nutrition answers from compressed documents, with the patient's contraindications "
                              "and warnings decided by rules, never by the model.")

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            return JSONResponse({"detail": f"request body over {MAX_BODY_BYTES} bytes"}, status_code=413)
        if length is None and request.method in ("POST", "PUT", "PATCH"):
            body = b""
            async for part in request.stream():
                body += part
                if len(body) > MAX_BODY_BYTES:
                    return JSONResponse({"detail": f"request body over {MAX_BODY_BYTES} bytes"}, status_code=413)
            request._body = body  # starlette reads the cached body in the endpoint
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, error: RequestValidationError):
        problems = error.errors()
        if any(p.get("type") == "json_invalid" for p in problems):
            return JSONResponse({"detail": "the request body is not valid JSON"}, status_code=400)
        # Field, message and type only: the offending input may be patient text.
        detail = [{"field": ".".join(str(x) for x in p.get("loc", ()) if x != "body"), "message": p.get("msg", ""),
                   "type": p.get("type", "")} for p in problems]
        return JSONResponse({"detail": detail}, status_code=422)

    @app.exception_handler(ValueError)
    async def refused(request: Request, error: ValueError):
        return JSONResponse({"detail": str(error)}, status_code=400)

    @app.get("/health", response_model=HealthResponse)
    def health():
        return {"status": "ok", "mode": retriever.mode, "documents": len(retriever.knowledge.passages),
                "knowledge": retriever.knowledge.origin, "checkpoint": retriever.checkpoint,
                "stage": retriever.model.config.training_stage, "numerics": numerics(retriever.model)}

    @app.post("/search", response_model=SearchResponse)
    def search(request: AskRequest):
        found = retriever.search(request.query, request.patient_context, request.top_k)
        return {"contraindications": [c.to_json() for c in found.contraindications],
                "documents": [d.to_json() for d in found.documents], "mode": retriever.mode}

    @app.post("/ask", response_model=AskResponse,
              responses={200: {"content": {"application/x-ndjson": {}},
                               "description": "the reply; with stream=true, newline-delimited JSON events"}})
    def ask(request: AskRequest):
        if request.stream:
            return StreamingResponse(_events(retriever, request), media_type="application/x-ndjson")
        return retriever.answer(request.query, request.patient_context, request.top_k).to_json()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page():
        return resources.files("nutribot").joinpath("chat.html").read_text(encoding="utf-8")

    return app
