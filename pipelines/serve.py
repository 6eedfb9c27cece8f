"""``mmfuse serve --model=DIR``: the TF Serving REST API over an exported night (``mmfuse export``).

    POST /v1/models/mmfuse:predict  {"signature_name": "recommend", "instances": [{"user_id": "u1", "k": 10}]}
                                    {"signature_name": "recommend", "instances": [{"history": [{"item_id": "i7",
                                     "timestamp": 1767225600, "weight": 4.5, "event": "view"}], "k": 10}]}
                                    {"signature_name": "similar", "inputs": {"item_id": ["i7", "i9"], "k": 5}}
                                    {"signature_name": "embed_item", "instances": [{"text": "...",
                                     "image": {"b64": "..."}, "audio_mfcc": [...], "k": 5}]}
    GET  /v1/models/mmfuse          the model's status, as TF Serving gives it
    GET  /v1/models/mmfuse/metadata the signatures and the contributions' modality names
    GET  /healthz                   200 once the model is loaded

Each prediction is ``{"item_id": [...], "score": [...], "contributions": [{modality: share}, ...],
"fallback": bool}``, best first, only as many as there are (a user who has seen almost everything gets fewer
than ``k``); ``embed_item``'s adds the new item's ``vector`` and fusion ``weights``. A user the night never
saw gets the popular items (``fallback``). ``recommend`` also takes a ``history`` in place of ``user_id``:
the user's interactions (``timestamp`` as integer epoch seconds or ISO-8601; ``weight``, e.g. the rating,
and ``event`` optional), weighed as the night weighed its users; at most ``--max_history`` per instance.
Limits: request body size (413), instances per request and ``k`` (400), a model call's time (503); bad JSON
and missing or ill-typed inputs and undecodable images get 400 with a message, a wrong bearer token 401. The
HTTP stack is aiohttp's server; model calls run in a thread pool, so health checks answer while a batch is
ranked. Memory: the exported night (see ``mmfuse export``) plus one (instances x items) score matrix per call
in flight.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import hmac
import json
import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from signal import SIGINT, SIGTERM
from typing import Any, Callable

import numpy as np
from aiohttp import web

NAME = "mmfuse"
IDS = {"recommend": "user_id", "similar": "item_id"}  # the signatures that take ids


class BadRequest(ValueError):
    """A client error: 400 with this message."""


class Service:
    """The loaded SavedModel, called with checked inputs; knows nothing of HTTP."""

    def __init__(self, folder: str, max_instances: int, max_k: int, max_history: int = 1000):
        import tensorflow as tf

        from mmfuse.models.serving import metadata  # also registers TensorFlow Text's ops, which embed_item uses
        self._tf, self._model, self.metadata = tf, tf.saved_model.load(folder), metadata(folder)
        self.modalities = self.metadata["modalities"]
        self.signatures = (*IDS, *(["embed_item"] if self.metadata["embed_item"] else []))
        self.max_instances, self.max_k, self.max_history = max_instances, max_k, max_history

    def inputs(self, body: Any) -> tuple[str, dict[str, list], int, bool]:
        """(signature, its inputs by name as lists, k, row format) of a predict request's JSON body."""
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        signature = body.get("signature_name", "recommend")
        signature = "recommend" if signature == "serving_default" else signature
        if signature not in self.signatures:
            raise BadRequest(f"unknown signature_name {signature!r}: use one of {sorted(self.signatures)}")
        if ("instances" in body) == ("inputs" in body):
            raise BadRequest('give either "instances" (a list) or "inputs" (an object), not both or neither')
        if "instances" in body:
            rows = body["instances"]
            if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
                raise BadRequest('"instances" must be a non-empty list of objects')
            k = rows[0].get("k", 10)
            if any(r.get("k", 10) != k for r in rows):
                raise BadRequest('every instance must ask for the same "k"')
            columns = {name: [r.get(name) for r in rows] for name in {n for r in rows for n in r} - {"k"}}
        else:
            columns = body["inputs"]
            if not isinstance(columns, dict):
                raise BadRequest('"inputs" must be an object of lists and "k"')
            k, columns = columns.get("k", 10), {n: v for n, v in columns.items() if n != "k"}
            columns = {n: v if isinstance(v, list) else [v] for n, v in columns.items()}
        sizes = {len(v) for v in columns.values()}
        if len(sizes) > 1:
            raise BadRequest("every input must list as many values")
        if sizes and sizes.pop() > self.max_instances:
            raise BadRequest(f"more than {self.max_instances} instances: at most {self.max_instances} per request")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.max_k:
            raise BadRequest(f'"k" must be an integer from 1 to {self.max_k}')
        return signature, columns, k, "instances" in body

    def predict(self, signature: str, columns: dict[str, list], k: int) -> list[dict]:
        tf = self._tf
        if signature == "recommend" and "history" in columns:
            if not self.metadata.get("recommend_history"):
                raise BadRequest("this model cannot weigh a posted history: export the night again")
            out = self._model.recommend_history(*self._history(columns), tf.constant(k, tf.int32))
        elif signature in IDS:
            ids = columns.get(IDS[signature])
            if not ids or not all(isinstance(i, str) for i in ids):
                raise BadRequest(f'"{IDS[signature]}" must be one or more strings')
            out = getattr(self._model, signature)(tf.constant(ids), tf.constant(k, tf.int32))
        else:
            try:
                out = self._model.signatures["embed_item"](**self._content(columns), k=tf.constant(k, tf.int32))
            except tf.errors.InvalidArgumentError as e:
                raise BadRequest(f"an image could not be decoded: {e.message.splitlines()[0]}") from e
        items, scores, contributions = out["item_id"].numpy(), out["score"].numpy(), out["contributions"].numpy()
        answers = []
        for row in range(len(items)):
            found = [c for c in range(items.shape[1]) if items[row, c]]
            answer = {"item_id": [items[row, c].decode() for c in found],
                      "score": [float(scores[row, c]) for c in found],
                      "contributions": [{m: float(v) for m, v in zip(self.modalities, contributions[row, c])
                                         if not math.isnan(v)} for c in found]}
            if "fallback" in out:
                answer["fallback"] = bool(out["fallback"][row])
            else:
                vector = out["vector"][row].numpy()
                answer["vector"] = None if np.isnan(vector).any() else vector.tolist()
                answer["weights"] = {m: float(w) for m, w in zip(self.metadata["embed_item"]["modalities"],
                                                                 out["weights"][row].numpy()) if w > 0}
            answers.append(answer)
        return answers

    def _history(self, columns: dict[str, list]) -> list:
        """``recommend_history``'s inputs from JSON: each instance's ``history``, a list of objects with
        ``item_id``, ``timestamp`` and optional ``weight`` and ``event``, padded to the longest."""
        from mmfuse.transforms.contract import Invalid, as_utc
        if set(columns) != {"history"}:
            raise BadRequest('give either "user_id" or "history" in every instance, not both')
        histories = columns["history"]
        if not all(isinstance(h, list) and all(isinstance(e, dict) for e in h) for h in histories):
            raise BadRequest('"history" must be a list of {"item_id", "timestamp", "weight", "event"} objects')
        width = max(1, *(len(h) for h in histories))
        if width > self.max_history:
            raise BadRequest(f"a history of more than {self.max_history} interactions: at most {self.max_history}")
        n = len(histories)
        ids, events = np.full((n, width), "", object), np.full((n, width), "", object)
        times, weights = np.zeros((n, width)), np.full((n, width), np.nan, np.float32)
        for r, history in enumerate(histories):
            for c, e in enumerate(history):
                item, weight, event = e.get("item_id"), e.get("weight"), e.get("event")
                if not isinstance(item, str) or not item:
                    raise BadRequest('every history entry needs an "item_id" string')
                if weight is not None and (isinstance(weight, bool) or not isinstance(weight, (int, float))):
                    raise BadRequest('a history entry\'s "weight" must be a number (or null)')
                if event is not None and not isinstance(event, str):
                    raise BadRequest('a history entry\'s "event" must be a string (or null)')
                try:
                    times[r, c] = as_utc(e.get("timestamp"), "timestamp").timestamp()
                except Invalid as x:
                    raise BadRequest(f"a history entry's {x}") from x
                ids[r, c], events[r, c] = item, event or ""
                weights[r, c] = np.nan if weight is None else weight
        tf = self._tf
        return [tf.constant(ids), tf.constant(times), tf.constant(weights), tf.constant(events)]

    def _content(self, columns: dict[str, list]) -> dict:
        """``embed_item``'s inputs from JSON: ``text`` strings, ``image`` as ``{"b64": ...}``, each vector
        modality as a list of floats; null or a missing key where an item lacks the modality."""
        tf, vectors = self._tf, self.metadata["embed_item"]["vectors"]
        unknown = set(columns) - {"text", "image", *vectors}
        if unknown or not columns:
            raise BadRequest(f"embed_item takes text, image and {sorted(vectors)}; got {sorted(unknown) or 'none'}")
        n = len(next(iter(columns.values())))
        text = columns.get("text", [None] * n)
        if not all(t is None or isinstance(t, str) for t in text):
            raise BadRequest('"text" must be strings (or null)')
        images = []
        for value in columns.get("image", [None] * n):
            if value is not None and not (isinstance(value, dict) and isinstance(value.get("b64"), str)):
                raise BadRequest('"image" must be {"b64": "<base64 bytes>"} (or null)')
            try:
                images.append(b"" if value is None else base64.b64decode(value["b64"], validate=True))
            except binascii.Error as e:
                raise BadRequest(f'"image" is not base64: {e}') from e
        out = {"text": tf.constant([t or "" for t in text]), "image": tf.constant(images)}
        for name, dim in vectors.items():
            rows = columns.get(name, [None] * n)
            if not all(r is None or (isinstance(r, list) and len(r) == dim
                                     and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in r))
                       for r in rows):
                raise BadRequest(f'"{name}" must be lists of {dim} numbers (or null)')
            out[name] = tf.constant(np.array([r if r is not None else [np.nan] * dim for r in rows], np.float32)
                                    .reshape(n, dim))
        return out


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
            signature, columns, k, rows = service.inputs(body)
            call = asyncio.get_running_loop().run_in_executor(pool, service.predict, signature, columns, k)
            answers = await asyncio.wait_for(call, timeout_s)
        except BadRequest as e:
            return error(400, str(e))
        except asyncio.TimeoutError:
            return error(503, f"the model did not answer within {timeout_s} s")
        if rows:
            return web.json_response({"predictions": answers})
        return web.json_response({"outputs": {key: [a[key] for a in answers] for key in answers[0]}})

    async def model_status(request: web.Request) -> web.Response:
        return web.json_response(status)

    async def metadata(request: web.Request) -> web.Response:
        return web.json_response({"model_spec": {"name": NAME, "version": "1"}, "metadata": {
            "signatures": sorted(service.signatures), **service.metadata}})

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
    parser.add_argument("--max_history", type=int, default=1000,
                        help="Most interactions in one posted history (recommend with a history)")
    parser.add_argument("--timeout_s", type=float, default=10.0, help="Longest a model call may take (503 after)")
    parser.add_argument("--threads", type=int, default=4, help="Model calls in flight at once")
    parser.add_argument("--verbose", action="store_true", help="Show the libraries' log lines and each request")
    args = parser.parse_args(argv)
    if not os.path.exists(os.path.join(args.model, "saved_model.pb")):
        print(f"mmfuse serve: error: {args.model} holds no SavedModel (write one with mmfuse export)",
              file=sys.stderr)
        return 2
    service = Service(args.model, args.max_instances, args.max_k, args.max_history)
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
