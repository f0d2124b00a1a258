"""OpenAI-style errors: ``{"error": {"message", "type", "param", "code"}}`` with the HTTP status.

OpenAI's clients raise a typed exception per status (400 BadRequestError, 404 NotFoundError, 429
RateLimitError, ...) and show ``message``; ``param`` names the offending field.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse

_TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 405: "invalid_request_error",
          408: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
          500: "server_error", 503: "service_unavailable"}


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 close: bool = False) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.close = close  # end the connection after the answer (a body left unread must not be read on)

    def body(self) -> dict:
        return {"error": {"message": encodable(self.message), "type": _TYPES.get(self.status, "invalid_request_error"),
                          "param": None if self.param is None else encodable(self.param), "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"Connection": "close"} if self.close else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def encodable(text: str) -> str:
    """``text`` with lone surrogates (valid in a JSON string, not in UTF-8) written as ``\\udXXX`` escapes, so
    that an error quoting the client's input can always be sent."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")
