"""Reading a prediction request: JSON with base64 images or a multipart upload, plus options.

`read_request` is the one reader; `PredictionRequest` is the input model of the BentoML apis
(services/service.py), which reads each request with it rather than with BentoML's own parsers
(their multipart reader fetches a text value of a file field as a URL). Every problem is an
InputError with a one-line message: 400 (unreadable), 413 (too many images), 415 (other
content types), 422 (wrong field names or types).

The reconstruct api also takes `targets`: clean images, one per image (multipart file parts `targets`,
or base64 strings in JSON), to score its output. The reader only reads their bytes: the api that scores
them decodes them (`decode_targets`, under the images' limits, off the event loop when large), and the
other apis answer a request carrying them with a 400, so they never cost a decode there.
"""

from __future__ import annotations

import inspect
import json
import re
import time
from typing import Annotated, Any, ClassVar, get_args

import pipelines.runtime  # noqa: F401  (telemetry off before bentoml is imported)

import bentoml
import jiter
from pydantic import Field, ValidationError
from pydantic.json_schema import SkipJsonSchema
from starlette.datastructures import UploadFile
from starlette.requests import Request

from services.errors import InputError
from services.schemas import JsonRequest, Options, decode_base64

TARGETS = "targets"  # reconstruct: the clean images its outputs are scored against (PSNR)
OPTION_FIELDS = tuple(name for name in Options.model_fields if name != TARGETS)
HOOK_PARAMETERS = ("request", "serde")  # IODescriptor.from_http_request(cls, request, serde) in bentoml 1.4
# A urlencoded form carries no files, but is read as one so that text `images` (BentoML's clients send a URL
# string that way) get the form's own 422.
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
ACCEPTED = "application/json (base64 images) or multipart/form-data (file field 'images')"


def validation_message(exc: ValidationError) -> str:
    """The first pydantic problem as `field: message` on one line; a numeric option says its range."""
    first = exc.errors(include_url=False)[0]
    where = ".".join(str(part) for part in first["loc"]) or "body"
    if first["type"] == "value_error":
        return str(first["ctx"]["error"]) if "ctx" in first else first["msg"]
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    if first["type"] == "extra_forbidden":
        return f"unknown field '{where}'; fields are images (or image), {TARGETS}, {', '.join(OPTION_FIELDS)}{more}"
    expected = number_range(where)
    if expected:
        return f"{where}: must be {expected}, got {json.dumps(first.get('input'), default=str)}{more}"
    return f"{where}: {first['msg']}{more}"


def number_range(name: str) -> str | None:
    """What the numeric option `name` takes, in words (`a number in [0, 1]`, `an integer >= 0`); None for others."""
    field = Options.model_fields.get(name)
    types = {field.annotation, *get_args(field.annotation)} if field else set()
    kind = "an integer" if int in types else "a number" if float in types else None
    if kind is None:
        return None
    bounds = {key: getattr(meta, key) for meta in field.metadata for key in ("ge", "le")
              if getattr(meta, key, None) is not None}
    if len(bounds) == 2:
        return f"{kind} in [{bounds['ge']:g}, {bounds['le']:g}]"
    return f"{kind} >= {bounds['ge']:g}" if bounds else kind


def _check_count(count: int, max_images: int) -> None:
    if count == 0:
        raise InputError(422, "no images: send at least one in 'images'")
    if count > max_images:
        raise InputError(413, f"{count} images in one call; the limit is {max_images}")


def _with_targets(options: Options, targets: list[bytes], images: int) -> Options:
    """The options carrying the raw `targets` files, when sent: exactly one per image."""
    if not targets:
        return options
    if len(targets) != images:
        raise InputError(422, f"{len(targets)} targets for {images} images: send one target per image, in order")
    return options.model_copy(update={TARGETS: targets})


async def read_json(request: Request, max_images: int) -> tuple[list[bytes], Options]:
    body = await request.body()
    if not body.strip():
        raise InputError(400, f"empty request body; send {ACCEPTED}")
    try:
        payload = JsonRequest.model_validate(_parse_json(body))
    except ValidationError as exc:
        raise InputError(422, validation_message(exc)) from None
    images = payload.image_list()
    _check_count(len(images), max_images)
    blobs = [decode_base64(text, i) for i, text in enumerate(images)]
    targets = [decode_base64(text, i, TARGETS) for i, text in enumerate(payload.targets or [])]
    return blobs, _with_targets(Options(**payload.model_dump(include=set(OPTION_FIELDS))), targets, len(blobs))


def _parse_json(body: bytes) -> Any:
    """The body's JSON as Python values, parsed once by jiter (pydantic's own parser; validated after as the same
    values from JSON would be). A key given twice is a 400, as an option sent twice in a form is: which one counts
    would be the parser's guess (pydantic's JSON mode keeps the last)."""
    try:
        return jiter.from_json(body, catch_duplicate_keys=True, cache_mode=False)
    except ValueError as exc:
        repeated = re.match(r'Detected duplicate key "(.*)" at line', str(exc))
        if repeated:
            raise InputError(400, f"{repeated.group(1)[:64]}: sent more than once; send each key once") from None
        raise InputError(400, "request body is not valid JSON") from None


async def read_multipart(request: Request, max_images: int) -> tuple[list[bytes], Options]:
    try:
        form = await request.form(max_files=2 * max_images + 1, max_fields=2 * len(OPTION_FIELDS))
    except Exception as exc:  # noqa: BLE001 - starlette/python-multipart raise several types on bad bodies
        detail = getattr(exc, "detail", None) or str(exc) or type(exc).__name__
        if "too many files" in str(detail).lower():
            raise InputError(413, f"too many files in one call: the limit is {max_images} images and, for "
                                  f"/reconstruct, as many {TARGETS}") from None
        raise InputError(400, f"malformed multipart body ({str(detail).splitlines()[0][:120]})") from None
    unknown = sorted(set(form.keys()) - {"images", "image", TARGETS, *OPTION_FIELDS})
    if unknown:
        raise InputError(422, f"unknown field '{unknown[0]}'; fields are images (or image), {TARGETS}, "
                              f"{', '.join(OPTION_FIELDS)}")
    repeated = sorted(key for key in OPTION_FIELDS if len(form.getlist(key)) > 1)
    if repeated:  # which one counts would be the reader's guess
        raise InputError(400, f"{repeated[0]}: sent {len(form.getlist(repeated[0]))} times; send each option once")
    files, target_files = [*form.getlist("images"), *form.getlist("image")], form.getlist(TARGETS)
    if any(not isinstance(item, UploadFile) for item in [*files, *target_files]):
        raise InputError(422, "images and targets: each must be a file upload (use JSON for base64)")
    _check_count(len(files), max_images)
    raw = {key: form[key] for key in OPTION_FIELDS if key in form}
    if any(not isinstance(value, str) for value in raw.values()):
        raise InputError(422, "options must be plain form fields, not files")
    values = {key: _form_value(value) for key, value in raw.items()}
    try:  # a null option (BentoML's clients send `null` for None) takes its default
        options = Options.model_validate({key: value for key, value in values.items() if value is not None})
    except ValidationError as exc:
        raise InputError(422, validation_message(exc)) from None
    blobs = [await item.read() for item in files]
    targets = [await item.read() for item in target_files]
    await form.close()
    return blobs, _with_targets(options, targets, len(blobs))


def _form_value(value: str) -> object:
    """A form field's value: JSON when it is JSON (BentoML's clients send options json.dumps'd: `3`, `"xyxy"`,
    `null`), else the text as sent (curl's `-F box_format=xyxy`); `true`/`false` stay text."""
    try:
        parsed = json.loads(value)
    except ValueError:
        return value
    return value if isinstance(parsed, bool) else parsed


async def read_request(request: Request, max_images: int) -> tuple[list[bytes], Options]:
    """The request's image bytes and options, or an InputError."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type == "application/json" or media_type.endswith("+json"):
        return await read_json(request, max_images)
    if media_type in FORM_TYPES:
        return await read_multipart(request, max_images)
    if not media_type and not (await request.body()).strip():
        raise InputError(400, f"empty request body; send {ACCEPTED}")
    raise InputError(415, f"unsupported content type '{media_type or 'none'}'; send {ACCEPTED}")


class RequestHookMoved(TypeError):
    """The installed BentoML no longer reads an api's input through `IODescriptor.from_http_request`."""


def check_request_hook() -> None:
    """Raise RequestHookMoved unless BentoML's IODescriptor still has the async classmethod
    `from_http_request(request, serde)` that PredictionRequest overrides (not documented API; without it
    BentoML's own parsers would read our requests). tests/services/test_api_request.py also checks that
    BentoML's api endpoint calls it."""
    hook = inspect.getattr_static(bentoml.IODescriptor, "from_http_request", None)
    function = getattr(hook, "__func__", None)
    if (not isinstance(hook, classmethod) or not inspect.iscoroutinefunction(function)
            or tuple(inspect.signature(function).parameters)[1:] != HOOK_PARAMETERS):
        raise RequestHookMoved(f"BentoML changed its input hook: bentoml {bentoml.__version__}'s "
                               "IODescriptor.from_http_request is not an async classmethod (cls, request, serde); "
                               "update services/payloads.py PredictionRequest")


class ImageFile:
    """The JSON schema of one uploaded image: `file` in BentoML's /schema.json (so its clients send it as a
    multipart file part), a binary string in OpenAPI (a file part in Swagger UI)."""

    def __get_pydantic_json_schema__(self, core_schema: Any, handler: Any) -> dict[str, Any]:
        value = handler(core_schema)
        return {**value, "type": "file", "format": "image"} if handler.mode == "validation" else value


class ImageUploads(bentoml.IODescriptor):
    """The `images` field of an api's input, sent as multipart file parts."""

    images: list[Annotated[bytes, ImageFile()]] = Field(
        ..., min_length=1, description="image files (PNG, JPEG, ...) as multipart parts `images`, repeatable; or a "
                                       "JSON body with base64 strings: {\"images\": [...]} or {\"image\": ...}")

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        cls.multipart_fields = ["images", TARGETS]  # BentoML counts only Path and PIL fields as files


# Options before ImageUploads in the bases makes `images` the first field (docs, positional client calls).
class PredictionRequest(Options, ImageUploads):
    """The input of every prediction api: the images, then the options (services.schemas.Options).

    BentoML builds it with `from_http_request`, which here is `read_request` behind the same limits for
    multipart and JSON; the values are validated there, so the model is built without a second validation."""

    max_images: ClassVar[int] = 32
    targets: list[Annotated[bytes, ImageFile()]] | None = Field(
        None, description="reconstruct: clean image files, one per image and in the same order, as multipart parts "
                          "`targets` (or base64 strings in JSON): each result then has the PSNR of the restored image")
    received: SkipJsonSchema[float] = Field(0.0, exclude=True)  # perf_counter() when reading began
    error: SkipJsonSchema[Any] = Field(None, exclude=True)  # the InputError of a bad request, for the api to answer

    @classmethod
    def limited_to(cls, max_images: int) -> type[PredictionRequest]:
        """This model taking at most `max_images` images per request (serve.max_images); checks the BentoML
        hook."""
        check_request_hook()
        return type(cls.__name__, (cls,), {"max_images": int(max_images), "__module__": cls.__module__})

    @classmethod
    async def from_http_request(cls, request: Request, serde: Any) -> PredictionRequest:
        """BentoML's hook that reads an api's input from the HTTP request (`serde` unused): `read_request`.
        A bad request comes back as `error` rather than raised, so the api answers it as one-line JSON. `targets`
        stay raw bytes: decoding them is the scoring api's (`decode_targets`), never the event loop's here."""
        received = time.perf_counter()
        try:
            blobs, options = await read_request(request, cls.max_images)
        except InputError as exc:
            return cls.model_construct(images=[], received=received, error=exc)
        return cls.model_construct(images=blobs, received=received, **dict(options))


def decode_targets(blobs: list[bytes] | None, limits: Any) -> list[Any] | None:
    """The `targets` files as fully decoded Pillow images, under the same limits as the images (4xx otherwise)."""
    from services import imaging

    if not blobs:
        return None
    if limits is None:
        raise InputError(422, f"{TARGETS}: this server does not score outputs against targets")
    decoded = []
    for index, blob in enumerate(blobs):
        try:
            decoded.append(imaging.decode(blob, limits))
        except InputError as exc:
            raise InputError(exc.status, f"{TARGETS}[{index}]: {exc}") from None
    return decoded
