"""``mmfuse serve --model=DIR``: the TF Serving REST API over an exported night (``mmfuse export``).

    POST /v1/models/mmfuse:predict  {"signature_name": "recommend", "instances": [{"user_id": "u1", "k": 10}]}
                                    {"signature_name": "similar", "inputs": {"item_id": ["i7", "i9"], "k": 5}}
    GET  /v1/models/mmfuse          the model's status, as TF Serving gives it
    GET  /v1/models/mmfuse/metadata the signatures and the contributions' modality names
    GET  /healthz                   200 once the model is loaded

Each prediction is ``{"item_id": [...], "score": [...], "contributions": [{modality: share}, ...],
"fallback": bool}``, best first, only as many as there are (a user who has seen almost everything gets
fewer than ``k``). A user the night never saw gets the popular items (``fallback``). Limits: request body
size (413), instances per request and ``k`` (400), a model call's time (503); bad JSON and missing or
ill-typed inputs get 400 with a message, a wrong bearer token 401. The HTTP stack is aiohttp's server;
model calls run in a thread pool, so health checks answer while a batch is ranked. Memory: the exported
night (see ``mmfuse export``) plus one (instances x items) score matrix per call in flight.
"""
from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from signal import SIGINT, SIGTERM
from typing import Any, Callable

from aiohttp import web

NAME = "mmfuse"
INPUTS = {"recommend": "user_id", "similar": "item_id"}


class BadRequest(ValueError):
    """A client error: 400 with this message."""


class Service:
    """The loaded SavedModel, called with checked inputs; knows nothing of HTTP."""

    def __init__(self, folder: str, max_instances: int, max_k: int):
        import tensorflow as tf

        from mmfuse.models.serving import modalities
        self._tf, self._model = tf, tf.saved_model.load(folder)
        self.modalities = modalities(folder)
        self.max_instances, self.max_k = max_instances, max_k

    def inputs(self, body: Any) -> tuple[str, list[str], int, bool]:
        """(signature, ids, k, row format) of a predict request's JSON body."""
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        signature = body.get("signature_name", "recommend")
        if signature == "serving_default":
            signature = "recommend"
        if signature not in INPUTS:
            raise BadRequest(f"unknown signature_name {signature!r}: use one of {sorted(INPUTS)}")
        key = INPUTS[signature]
        if ("instances" in body) == ("inputs" in body):
            raise BadRequest('give either "instances" (a list) or "inputs" (an object), not both or neither')
        if "instances" in body:
            rows = body["instances"]
            if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
                raise BadRequest(f'"instances" must be a list of objects with "{key}" and "k"')
            ids, ks = [r.get(key) for r in rows], {r.get("k", 10) for r in rows}
            if len(ks) > 1:
                raise BadRequest('every instance must ask for the same "k"')
            k = ks.pop() if ks else 10
        else:
            columns = body["inputs"]
            if not isinstance(columns, dict):
                raise BadRequest(f'"inputs" must be an object with "{key}" (a list) and "k"')
            ids, k = columns.get(key), columns.get("k", 10)
            ids = [ids] if isinstance(ids, str) else ids
        if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
            raise BadRequest(f'"{key}" must be one or more strings')
        if len(ids) > self.max_instances:
            raise BadRequest(f"{len(ids)} instances: at most {self.max_instances} per request")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.max_k:
            raise BadRequest(f'"k" must be an integer from 1 to {self.max_k}')
        return signature, ids, k, "instances" in body

    def predict(self, signature: str, ids: list[str], k: int) -> list[dict]:
        tf = self._tf
        out = getattr(self._model, signature)(tf.constant(ids), tf.constant(k, tf.int32))
        items, scores = out["item_id"].numpy(), out["score"].numpy()
        contributions, fallback = out["contributions"].numpy(), out["fallback"].numpy()
        answers = []
        for row in range(len(ids)):
            found = [c for c in range(items.shape[1]) if items[row, c]]
            answers.append({
                "item_id": [items[row, c].decode() for c in found],
                "score": [float(scores[row, c]) for c in found],
                "contributions": [{m: float(v) for m, v in zip(self.modalities, contributions[row, c])
                                   if not math.isnan(v)} for c in found],
                "fallback": bool(fallback[row])})
        return answers


def app(service: Service, token: str | None = None, max_request_bytes: int = 1 << 20,
        timeout_s: float = 10.0, threads: int = 4) -> web.Application:
    """The HTTP routes over ``service``."""
    pool = ThreadPoolExecutor(threads, thread_name_prefix="predict")
    status = {"model_version_status": [{"version": "1", "state": "AVAILABLE",
                                        "status": {"error_code": "OK", "error_message": ""}}]}

    def error(code: int, message: str) -> web.Response:
        return web.json_response({"error": message}, status=code)

    @web.middleware
    async def guarded(request: web.Request, handler: Callable) -> web.StreamResponse:
        if token and request.path != "/healthz":
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return error(401, "a valid 'Authorization: Bearer <token>' header is required")
        try:
            return await handler(request)
        except web.HTTPException as e:
            return error(e.status, e.reason if e.status != 413 else
                         f"the request body is larger than {max_request_bytes} bytes")

    async def predict(request: web.Request) -> web.Response:
        try:
            body = json.loads(await request.read())
        except (ValueError, UnicodeDecodeError) as e:
            return error(400, f"the body is not JSON: {e}")
        try:
            signature, ids, k, rows = service.inputs(body)
        except BadRequest as e:
            return error(400, str(e))
        call = asyncio.get_running_loop().run_in_executor(pool, service.predict, signature, ids, k)
        try:
            answers = await asyncio.wait_for(call, timeout_s)
        except asyncio.TimeoutError:
            return error(503, f"the model did not answer within {timeout_s} s")
        if rows:
            return web.json_response({"predictions": answers})
        return web.json_response({"outputs": {key: [a[key] for a in answers] for key in answers[0]}})

    async def model_status(request: web.Request) -> web.Response:
        return web.json_response(status)

    async def metadata(request: web.Request) -> web.Response:
        return web.json_response({"model_spec": {"name": NAME, "version": "1"}, "metadata": {
            "signature_def": {name: {"inputs": [key, "k"], "outputs": ["item_id", "score", "contributions",
                                                                      "fallback"]} for name, key in INPUTS.items()},
            "modalities": service.modalities}})

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    application = web.Application(client_max_size=max_request_bytes, middlewares=[guarded])
    application.add_routes([web.post(f"/v1/models/{NAME}:predict", predict),
                            web.post(f"/v1/models/{NAME}/versions/1:predict", predict),
                            web.get(f"/v1/models/{NAME}", model_status),
                            web.get(f"/v1/models/{NAME}/metadata", metadata),
                            web.get("/healthz", health)])
    application.on_cleanup.append(lambda _: asyncio.to_thread(pool.shutdown))
    return application


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mmfuse serve", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", required=True, help="A folder written by mmfuse export")
    parser.add_argument("--host", default="127.0.0.1", help="Address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8501, help="Port (0: any free one; the start line names it)")
    parser.add_argument("--token_env", default="MMFUSE_SERVE_TOKEN",
                        help="Environment variable holding a bearer token; when set, every request but /healthz "
                             "must carry it")
    parser.add_argument("--max_request_bytes", type=int, default=1 << 20, help="Largest request body (413 above)")
    parser.add_argument("--max_instances", type=int, default=256, help="Most queries in one request")
    parser.add_argument("--max_k", type=int, default=1000, help="Largest k a request may ask for")
    parser.add_argument("--timeout_s", type=float, default=10.0, help="Longest a model call may take (503 after)")
    parser.add_argument("--threads", type=int, default=4, help="Model calls in flight at once")
    parser.add_argument("--verbose", action="store_true", help="Show the libraries' log lines and each request")
    args = parser.parse_args(argv)
    if not os.path.exists(os.path.join(args.model, "saved_model.pb")):
        print(f"mmfuse serve: error: {args.model} holds no SavedModel (write one with mmfuse export)",
              file=sys.stderr)
        return 2
    service = Service(args.model, args.max_instances, args.max_k)
    application = app(service, os.environ.get(args.token_env) or None, args.max_request_bytes, args.timeout_s,
                      args.threads)

    runner = web.AppRunner(application, access_log=web.AccessLogger if args.verbose else None)

    async def serve() -> None:
        stop = asyncio.Event()
        for signal in (SIGINT, SIGTERM):  # finish the requests in flight, then exit
            asyncio.get_running_loop().add_signal_handler(signal, stop.set)
        await runner.setup()
        await web.TCPSite(runner, args.host, args.port).start()
        for host, port in (a[:2] for a in runner.addresses):  # the real port when --port=0
            print(f"mmfuse serve: listening on http://{host}:{port}/v1/models/{NAME}", flush=True)
        await stop.wait()
        await runner.cleanup()

    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
