"""Reading a prediction request: JSON with base64 images or a multipart upload, plus options.

Every problem is an InputError with a one-line message: 400 (unreadable), 413 (too many
images), 415 (other content types), 422 (wrong field names or types).
"""

from __future__ import annotations

import json

from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.requests import Request

from services.errors import InputError
from services.schemas import JsonRequest, Options, decode_base64

OPTION_FIELDS = tuple(Options.model_fields)
ACCEPTED = "application/json (base64 images) or multipart/form-data (file field 'images')"


def validation_message(exc: ValidationError) -> str:
    """The first pydantic problem as `field: message` on one line."""
    first = exc.errors(include_url=False)[0]
    where = ".".join(str(part) for part in first["loc"]) or "body"
    if first["type"] == "value_error":
        return str(first["ctx"]["error"]) if "ctx" in first else first["msg"]
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    if first["type"] == "extra_forbidden":
        return f"unknown field '{where}'; fields are images (or image), {', '.join(OPTION_FIELDS)}{more}"
    return f"{where}: {first['msg']}{more}"


def _check_count(count: int, max_images: int) -> None:
    if count == 0:
        raise InputError(422, "no images: send at least one in 'images'")
    if count > max_images:
        raise InputError(413, f"{count} images in one call; the limit is {max_images}")


async def read_json(request: Request, max_images: int) -> tuple[list[bytes], Options]:
    body = await request.body()
    if not body.strip():
        raise InputError(400, f"empty request body; send {ACCEPTED}")
    try:
        payload = JsonRequest.model_validate_json(body)
    except ValidationError as exc:
        if exc.errors()[0]["type"] == "json_invalid":
            raise InputError(400, "request body is not valid JSON") from None
        raise InputError(422, validation_message(exc)) from None
    images = payload.image_list()
    _check_count(len(images), max_images)
    blobs = [decode_base64(text, i) for i, text in enumerate(images)]
    return blobs, Options(**payload.model_dump(include=set(OPTION_FIELDS)))


async def read_multipart(request: Request, max_images: int) -> tuple[list[bytes], Options]:
    try:
        form = await request.form(max_files=max_images + 1, max_fields=2 * len(OPTION_FIELDS))
    except Exception as exc:  # noqa: BLE001 - starlette/python-multipart raise several types on bad bodies
        detail = getattr(exc, "detail", None) or str(exc) or type(exc).__name__
        if "too many files" in str(detail).lower():
            raise InputError(413, f"more than {max_images} images in one call; the limit is {max_images}") from None
        raise InputError(400, f"malformed multipart body ({str(detail).splitlines()[0][:120]})") from None
    unknown = sorted(set(form.keys()) - {"images", "image", *OPTION_FIELDS})
    if unknown:
        raise InputError(422, f"unknown field '{unknown[0]}'; fields are images (or image), {', '.join(OPTION_FIELDS)}")
    files = [*form.getlist("images"), *form.getlist("image")]
    if any(not isinstance(item, UploadFile) for item in files):
        raise InputError(422, "images: each must be a file upload (use JSON for base64)")
    _check_count(len(files), max_images)
    raw = {key: form[key] for key in OPTION_FIELDS if key in form}
    if any(not isinstance(value, str) for value in raw.values()):
        raise InputError(422, "options must be plain form fields, not files")
    try:
        options = Options.model_validate({key: _form_value(value) for key, value in raw.items()})
    except ValidationError as exc:
        raise InputError(422, validation_message(exc)) from None
    blobs = [await item.read() for item in files]
    await form.close()
    return blobs, options


def _form_value(value: str) -> object:
    """Form fields arrive as text: numbers are parsed, anything else stays a string."""
    try:
        parsed = json.loads(value)
    except ValueError:
        return value
    return parsed if isinstance(parsed, (int, float)) and not isinstance(parsed, bool) else value


async def read_request(request: Request, max_images: int) -> tuple[list[bytes], Options]:
    """The request's image bytes and options, or an InputError."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type == "application/json" or media_type.endswith("+json"):
        return await read_json(request, max_images)
    if media_type == "multipart/form-data":
        return await read_multipart(request, max_images)
    if not media_type and not (await request.body()).strip():
        raise InputError(400, f"empty request body; send {ACCEPTED}")
    raise InputError(415, f"unsupported content type '{media_type or 'none'}'; send {ACCEPTED}")
