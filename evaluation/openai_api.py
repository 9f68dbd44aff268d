"""Talking to an OpenAI-compatible server (OpenAI, vLLM, llama.cpp, Ollama): clients, retries, a reachability probe.

The official `openai` client is used with its own retries off, so that what is retried, how often
and how long to wait are this module's (and tested against a local server).
"""

import os
import random
import time
from collections.abc import Callable
from typing import TypeVar

import openai

RETRIED_STATUS = {408, 409, 429}  # and every 5xx
MAX_BACKOFF_S = 60.0
NO_KEY = "none"  # sent when api_key_env is null: local servers ignore the key but the client wants one

Result = TypeVar("Result")


class ServerError(RuntimeError):
    """A request that still failed after its retries: the server is down or overloaded."""


class RequestRefused(RuntimeError):
    """A request the server refused in a way retrying cannot fix (400, 401, 404, ...): that one request fails."""


def api_key_problem(key: str, api_key_env: str | None) -> str | None:
    """Why the API key variable is unusable (unset or empty), or None. `key` names the setting."""
    if api_key_env is None or os.environ.get(api_key_env):
        return None
    return (
        f"{key}={api_key_env}: the environment variable {api_key_env} is not set. Export it "
        f"(export {api_key_env}=...), or set {key}=null for a local server that needs no key."
    )


def make_client(base_url: str, api_key_env: str | None, timeout_s: float) -> openai.OpenAI:
    api_key = os.environ[api_key_env] if api_key_env is not None else NO_KEY
    return openai.OpenAI(base_url=base_url, api_key=api_key, timeout=timeout_s, max_retries=0)


def _is_retried(error: Exception) -> bool:
    if isinstance(error, openai.APIConnectionError):  # refused connections and timeouts (APITimeoutError)
        return True
    return isinstance(error, openai.APIStatusError) and (
        error.status_code in RETRIED_STATUS or error.status_code >= 500
    )


def _backoff_s(attempt: int, first_backoff_s: float, error: Exception) -> float:
    """Exponential backoff with jitter; a server's Retry-After (seconds) is honoured when longer."""
    delay = min(MAX_BACKOFF_S, first_backoff_s * 2**attempt) * (1 + 0.25 * random.random())
    response = getattr(error, "response", None)
    retry_after = response.headers.get("retry-after") if response is not None else None
    try:
        return max(delay, min(MAX_BACKOFF_S, float(retry_after))) if retry_after else delay
    except ValueError:  # an HTTP date: not worth parsing, the exponential delay stands
        return delay


def with_retries(request: Callable[[], Result], max_retries: int, first_backoff_s: float, what: str) -> Result:
    """request(), retried up to max_retries times on 408/409/429/5xx, timeouts and refused connections."""
    for attempt in range(max_retries + 1):
        try:
            return request()
        except openai.APIError as error:
            if not _is_retried(error):
                raise RequestRefused(f"{what}: {type(error).__name__}: {error}") from error
            if attempt == max_retries:
                raise ServerError(
                    f"{what}: still failing after {max_retries + 1} tries ({type(error).__name__}: {error}). "
                    "Is the server up and not overloaded? Rerun to continue: finished work is kept."
                ) from error
            time.sleep(_backoff_s(attempt, first_backoff_s, error))
    raise AssertionError("unreachable: the loop returns or raises")


def reachability_problem(key: str, base_url: str, api_key_env: str | None, timeout_s: float) -> str | None:
    """Why the server at base_url cannot serve us (unreachable, or refusing the key), or None.

    Asks for GET {base_url}/models once: every OpenAI-compatible server answers it; a server that
    does not (404) is reachable all the same. `key` names the base_url setting.
    """
    client = make_client(base_url, api_key_env, min(timeout_s, 10.0))
    try:
        client.models.list()
    except openai.AuthenticationError as error:
        return f"{key}={base_url}: the server refused the API key from ${api_key_env} ({error.status_code})."
    except openai.APIConnectionError as error:
        return (
            f"{key}={base_url}: cannot reach the server ({type(error).__name__}: {error}). Start it "
            "(e.g. `vllm serve <model folder>`), or fix the URL (it ends in /v1)."
        )
    except openai.APIStatusError:
        return None
    finally:
        client.close()
    return None
