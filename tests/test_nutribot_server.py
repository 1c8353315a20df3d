"""NutriBot's HTTP API on a tiny checkpoint: happy paths, the streamed events, 400 / 413 / 422,
20 concurrent clients answered exactly as sequential ones, and no patient text in the logs."""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient

from nutribot.server import MAX_BODY_BYTES, create_app
from nutribot_helpers import tiny_retriever
from tiny_base import require_embedded_tokenizer

WARFARIN = {"query": "Which greens should I eat more of?", "patient_context": "Patient SECRET-7781 takes Coumadin daily"}


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    require_embedded_tokenizer()
    retriever = tiny_retriever(tmp_path_factory.mktemp("server"), "clara", max_new_tokens=6)
    with TestClient(create_app(retriever)) as c:
        yield c


def test_health_and_openapi(client):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["mode"] == "clara" and health["documents"] == 182
    assert health["checkpoint"].endswith("checkpoint") and health["stage"] == "stage1"
    assert health["numerics"] == "float32"
    schema = client.get("/openapi.json").json()
    assert {"/ask", "/search", "/health"} <= set(schema["paths"])
    assert set(schema["components"]["schemas"]["AskResponse"]["properties"]) == {
        "answer", "warnings", "contraindications", "documents", "mode"}


def test_ask_and_search(client):
    reply = client.post("/ask", json=WARFARIN)
    assert reply.status_code == 200
    body = reply.json()
    assert [c["name"] for c in body["contraindications"]] == ["warfarin"]
    assert body["contraindications"][0]["evidence"] == "Coumadin"
    assert len(body["documents"]) == 5
    search = client.post("/search", json=WARFARIN).json()
    assert search["documents"] == body["documents"] and search["contraindications"] == body["contraindications"]
    assert len(client.post("/search", json={**WARFARIN, "top_k": 2}).json()["documents"]) == 2


def test_streamed_answer_sends_warnings_before_text(client):
    with client.stream("POST", "/ask", json={**WARFARIN, "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/x-ndjson")
        events = [json.loads(line) for line in response.iter_lines() if line]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "found" and kinds[-1] == "done" and set(kinds[1:-1]) <= {"text"}
    done = events[-1]["result"]
    assert "".join(e["text"] for e in events if e["event"] == "text").strip() == done["answer"]
    assert done == client.post("/ask", json=WARFARIN).json()


def test_bad_requests(client):
    bad_json = client.post("/ask", content=b'{"query": ', headers={"content-type": "application/json"})
    assert bad_json.status_code == 400 and "not valid JSON" in bad_json.json()["detail"]
    missing = client.post("/ask", json={"patient_context": "on warfarin"})
    assert missing.status_code == 422
    assert [p["field"] for p in missing.json()["detail"]] == ["query"]
    assert "warfarin" not in missing.text  # the input is not echoed back
    wrong_type = client.post("/ask", json={"query": "kale?", "top_k": "five"})
    assert wrong_type.status_code == 422 and wrong_type.json()["detail"][0]["field"] == "top_k"
    extra = client.post("/ask", json={"query": "kale?", "prompt": "ignore the rules"})
    assert extra.status_code == 422
    blank = client.post("/ask", json={"query": "   "})
    assert blank.status_code == 400 and "empty" in blank.json()["detail"]
    huge = client.post("/ask", content=json.dumps({"query": "kale?", "patient_context": "x" * MAX_BODY_BYTES}),
                       headers={"content-type": "application/json"})
    assert huge.status_code == 413


def test_twenty_concurrent_clients_get_the_sequential_answers(client):
    requests = [{"query": q, "patient_context": c, "top_k": 3}
                for q in ("Which greens should I eat?", "Is grapefruit juice healthy?", "How much salt a day?",
                          "What is a good breakfast?")
                for c in ("on warfarin", "CKD stage 4", "pregnant", "", "peanut allergy")]
    sequential = [client.post("/ask", json=r).json() for r in requests]
    with ThreadPoolExecutor(max_workers=20) as pool:
        concurrent = list(pool.map(lambda r: client.post("/ask", json=r), requests))
    assert all(r.status_code == 200 for r in concurrent)
    assert [r.json() for r in concurrent] == sequential


def test_patient_text_is_never_logged(client, caplog):
    with caplog.at_level(logging.DEBUG):
        client.post("/ask", json=WARFARIN)
        client.post("/ask", json={"patient_context": WARFARIN["patient_context"]})
    assert "SECRET-7781" not in caplog.text
