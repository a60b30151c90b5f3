"""Reading a request (services/payloads.py), the reviewer's message findings: options are strict (a boolean is no
integer), a bad number says the range it must be in, and an option sent twice (a form field or a JSON key) is
refused, naming it."""

from __future__ import annotations

from tests.services.test_guard import client

IMAGE = [("images", ("a", b"x"))]


def error(reply) -> tuple[int, str]:
    return reply.status_code, reply.json()["error"]


def test_a_bad_number_says_the_range_it_must_be_in():
    c = client(cap=10_000)
    json_nan = c.post("/classify", content=b'{"images": ["YQ=="], "score_threshold": NaN}',
                      headers={"Content-Type": "application/json"})
    assert error(json_nan) == (422, "score_threshold: must be a number in [0, 1], got NaN")
    form_nan = c.post("/classify", files=IMAGE, data={"score_threshold": "NaN"})
    assert error(form_nan) == (422, "score_threshold: must be a number in [0, 1], got NaN")
    over = c.post("/classify", json={"images": ["YQ=="], "score_threshold": 1.5})
    assert error(over) == (422, "score_threshold: must be a number in [0, 1], got 1.5")
    assert error(c.post("/classify", json={"images": ["YQ=="], "max_detections": 0})) == (
        422, "max_detections: must be an integer in [1, 1000], got 0")
    assert c.post("/classify", json={"images": ["YQ=="], "score_threshold": 1}).status_code == 200  # 1 is a number


def test_booleans_are_no_integers():
    c = client(cap=10_000)
    for body in ({"top_k": True}, {"max_detections": False}, {"class_index": True}, {"score_threshold": True}):
        reply = c.post("/classify", json={"images": ["YQ=="], **body})
        (name, value), = body.items()
        assert reply.status_code == 422 and reply.json()["error"].startswith(f"{name}: must be "), reply.text
        assert reply.json()["error"].endswith(f"got {str(value).lower()}"), reply.text
    assert error(c.post("/classify", files=IMAGE, data={"top_k": "true"})) == (
        422, 'top_k: must be an integer in [1, 1000], got "true"')
    assert c.post("/classify", files=IMAGE, data={"top_k": "3"}).json()["top_k"] == 3  # curl's -F top_k=3


def test_an_option_sent_twice_is_400_naming_it():
    c = client(cap=10_000)
    twice = c.post("/classify", files=[*IMAGE, ("top_k", (None, "1")), ("top_k", (None, "5"))])
    assert error(twice) == (400, "top_k: sent 2 times; send each option once")
    images = c.post("/classify", files=[*IMAGE, *IMAGE], data={"top_k": "1"})  # images are repeatable
    assert images.status_code == 200 and images.json()["sizes"] == [1, 1]


def test_a_json_key_sent_twice_is_400_naming_it():
    c = client(cap=10_000)

    def post(body: bytes):
        return c.post("/classify", content=body, headers={"Content-Type": "application/json"})

    assert error(post(b'{"images": ["YQ=="], "top_k": 1, "top_k": 5}')) == (
        400, "top_k: sent more than once; send each key once")
    assert error(post(b'{"images": ["YQ=="], "top_k": 5, "top_k": true}')) == (  # whatever the values
        400, "top_k: sent more than once; send each key once")
    assert error(post(b'{"images": ["YQ=="], "images": ["Yg=="]}')) == (
        400, "images: sent more than once; send each key once")
    assert error(post(b'{"images": ["YQ=="], "' + b"k" * 2000 + b'": 1, "' + b"k" * 2000 + b'": 2}'))[1] == (
        f"{'k' * 64}: sent more than once; send each key once")  # a hostile key is not echoed whole
    assert error(post(b'{"images": ["YQ=="], "top_k": 1')) == (400, "request body is not valid JSON")
    assert post(b'{"images": ["YQ=="], "top_k": 2}').json()["top_k"] == 2
