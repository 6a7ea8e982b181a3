"""What the OpenAI and Ollama routers share: ServedModel (one loaded model: engine, name, tokenizer, queue bound,
metrics, keep-alive leases, LoRA adapters) and AdapterView (it, with an adapter), APIError (answered OpenAI-style
under /v1 and elsewhere, Ollama-style under /api/) and the mapping of engine errors onto it, per-token logprob
entries, and embedding of inputs."""
from __future__ import annotations

import asyncio
import dataclasses
import time

from pydantic import BaseModel

from tokenloom.config import TokenloomError
from tokenloom.engine.outputs import CompletionOutput, RequestOutput
from tokenloom.engine.async_engine import AsyncEngine, EngineDeadError, QueueFullError, RequestStream
from tokenloom.loader import created as created_store
from tokenloom.loader.created import CreatedModel
from tokenloom.lora import LoRARequest
from tokenloom.sampling_params import SamplingParams, SamplingParamsError


# ---- errors ------------------------------------------------------------------------------------------------
class APIError(Exception):
    """An error answered to the client: OpenAI-style body under /v1 (and elsewhere), {"error": msg} under /api."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def openai_body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}



def documented_errors(body: type[BaseModel], invalid: str, length_field: str) -> dict[int | str, dict]:
    """The error statuses an API's OpenAPI document lists, each with that API's error body."""
    return {
        400: {"model": body, "description": f"Malformed JSON, wrong types, {invalid}, or a prompt (plus "
                                             f"{length_field}) longer than the context window"},
        401: {"model": body, "description": "Missing or wrong API key (when the server has one)"},
        404: {"model": body, "description": "Unknown model"},
        503: {"model": body, "description": "Too many waiting requests (--max-queue); retry later"},
    }


def error_for(exc: Exception) -> APIError:
    """Map engine errors onto HTTP errors."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, QueueFullError):
        return APIError(503, str(exc), type="server_error", code="queue_full")
    if isinstance(exc, EngineDeadError):
        return APIError(503, str(exc), type="server_error", code="engine_unavailable")
    if isinstance(exc, SamplingParamsError):
        return APIError(400, str(exc), param=exc.param)
    if isinstance(exc, TokenloomError):
        msg = str(exc)
        code = "context_length_exceeded" if "context window" in msg else None
        return APIError(400, msg, code=code)
    return APIError(500, f"internal error: {exc}", type="server_error")


# ---- one loaded model -----------------------------------------------------------------------------------------
class ServedModel:
    """One loaded model and what requests to it share: its engine, tokenizer, name, the queue bound, metrics and
    keep-alive bookkeeping (leases held by requests in flight; the model pool unloads it once none is held and
    its keep-alive has passed)."""

    def __init__(self, engine: AsyncEngine, name: str, max_queue: int | None = None, metrics=None,
                 keep_alive_s: float = -1.0, load_duration_s: float = 0.0, quality_signal: bool = False):
        self.engine = engine
        self.name = name
        self.max_queue = max_queue
        self.metrics = metrics
        self.tokenizer = engine.tokenizer
        self.created = int(time.time())
        self.keep_alive_s = keep_alive_s  # < 0: never expires
        self.load_duration_s = load_duration_s
        self.quality_signal = quality_signal  # record each answer's mean token logprob (A/B variants)
        self.leases = 0
        self.last_used = time.monotonic()
        self.expires_at: float | None = None  # wall-clock time, set when the last lease is released
        self._token_text: dict[int, str] = {}
        self._model_info: dict | None = None
        self._max_prompt_bytes: int | None = None
        self._identity: str | None = None
        self.weight_bytes = 0  # measured once loaded (model_pool.weight_bytes)
        self.adapters: dict[str, LoRARequest] = {}  # LoRA adapters by the name requests give

    def size_bytes(self) -> int:
        """Memory the model holds now: its weights plus the KV cache in memory."""
        return self.weight_bytes + self.engine.stats().kv_resident_bytes

    @property
    def served_model_name(self) -> str:
        return self.name

    def identity(self) -> str:
        """What the model is, as created models' `base` records it (a catalogue name or a weights path)."""
        if self._identity is None:
            self._identity = created_store.identity(self.engine.engine.model_source)
        return self._identity

    # LoRA adapters (served under their own names, on this model's engine)
    async def load_adapter(self, name: str, path: str) -> LoRARequest:
        """Read, check and add an adapter (APIError 400 naming the problem: LoRA off, name taken, rank too large,
        modules the model lacks, another base model)."""
        manager = self.engine.engine.lora_manager
        if manager is None:
            raise APIError(400, f"LoRA is not enabled on '{self.name}': start the server with --enable-lora")
        if name in self.adapters or name == self.name:
            raise APIError(400, f"the name '{name}' is taken: unload that adapter first", param="lora_name")
        request = LoRARequest(name, max((r.lora_int_id for r in self.adapters.values()), default=0) + 1, path)
        try:
            adapter = await asyncio.to_thread(manager.read, request)  # the file read off both threads
            await self.engine.run_on_engine(lambda engine: manager.add(request, adapter))
        except TokenloomError as exc:
            raise APIError(400, f"LoRA adapter '{name}': {exc}", param="lora_path") from None
        self.adapters[name] = request
        return request

    async def unload_adapter(self, name: str) -> None:
        if name not in self.adapters:
            raise APIError(404, f"no LoRA adapter named '{name}' is loaded", type="not_found_error",
                           param="lora_name", code="lora_not_found")
        try:
            await self.engine.run_on_engine(lambda engine: engine.remove_lora(name))
        except TokenloomError as exc:
            raise APIError(400, f"LoRA adapter '{name}': {exc}", param="lora_name") from None
        del self.adapters[name]

    # keep-alive
    def acquire(self) -> None:
        self.leases += 1
        self.last_used = time.monotonic()
        self.expires_at = None

    def release(self) -> None:
        self.leases = max(0, self.leases - 1)
        self.last_used = time.monotonic()
        if self.leases == 0 and self.keep_alive_s >= 0:
            self.expires_at = time.time() + self.keep_alive_s

    @property
    def idle(self) -> bool:
        return self.leases == 0 and not self.engine.has_unfinished()

    # tokenizer
    def require_tokenizer(self):
        if self.tokenizer is None:
            raise APIError(400, "this model has no tokenizer: send prompts as token ids")
        return self.tokenizer

    def token_text(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id]) if self.tokenizer is not None else f"<{token_id}>"
            self._token_text[token_id] = text
        return text

    def max_prompt_bytes(self) -> int:
        """Text longer than this (in UTF-8 bytes) cannot fit the context window: no token stands for more bytes
        than the vocabulary's longest token string holds, so it is refused before it is tokenized."""
        if self._max_prompt_bytes is None:
            vocab = self.tokenizer.hf_tokenizer.get_vocab() if self.tokenizer is not None else {}
            longest = max((len(t.encode("utf-8")) for t in vocab), default=1)
            self._max_prompt_bytes = self.engine.max_model_len * max(longest, 1)
        return self._max_prompt_bytes

    def check_prompt_bytes(self, text: str) -> None:
        """400 at once for text that cannot fit the context window (checked in one cheap pass)."""
        if len(text) > self.max_prompt_bytes() or len(text.encode("utf-8", "surrogatepass")) > self.max_prompt_bytes():
            raise APIError(400, f"the prompt is {len(text.encode('utf-8', 'surrogatepass'))} bytes, more than the "
                                f"context window of {self.engine.max_model_len} tokens can hold",
                           code="context_length_exceeded")

    async def encode(self, text: str) -> list[int]:
        """A text prompt's token ids, tokenized on a worker thread (never on the event loop or the engine's)."""
        self.check_prompt_bytes(text)
        return await asyncio.to_thread(self.require_tokenizer().encode, text)

    async def chat_prompt_ids(self, messages: list[dict], tools=None, add_generation_prompt: bool = True,
                              continue_final_message: bool = False, template_kwargs: dict | None = None) -> list[int]:
        """Messages rendered with the model's chat template, then encoded (the template carries any BOS); both on
        a worker thread, after a byte check of the message texts that refuses what cannot fit at once."""
        tok = self.require_tokenizer()
        if not messages:
            raise APIError(400, "messages must not be empty", param="messages")
        if tok.chat_template is None:
            raise APIError(400, "this model has no chat template: use /v1/completions", param="messages")
        self.check_prompt_bytes("".join(m["content"] for m in messages if isinstance(m.get("content"), str)))

        def render_and_encode() -> list[int]:
            try:
                text = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tools=tools,
                                               continue_final_message=continue_final_message,
                                               **(template_kwargs or {}))
            except TokenloomError as exc:
                raise APIError(400, str(exc), param="messages") from None
            self.check_prompt_bytes(text)
            return tok.encode(text, add_special_tokens=False)

        return await asyncio.to_thread(render_and_encode)

    # requests
    async def check_constraint(self, params: SamplingParams, param: str) -> None:
        """Compile the request's output constraint off the engine thread; a bad one is a 400 naming `param`."""
        if params.structured_outputs is None:
            return
        try:
            await self.engine.compile_constraint(params)
        except SamplingParamsError as exc:
            raise APIError(400, str(exc), param=param if exc.param == "structured_outputs" else exc.param) from None

    async def submit(self, prompt: str | list[int], params: SamplingParams, request_id: str,
                     lora_request: LoRARequest | None = None) -> RequestStream:
        if isinstance(prompt, str):
            prompt = await self.encode(prompt)
        if self.quality_signal and params.logprobs is None:  # the chosen tokens' logprobs, for the metrics only
            params = dataclasses.replace(params, logprobs=0)
        try:
            return await self.engine.add_request(prompt, params, request_id, max_waiting=self.max_queue,
                                                 lora_request=lora_request)
        except Exception as exc:  # noqa: BLE001 - mapped onto an HTTP status
            raise error_for(exc) from None

    async def submit_all(self, prompts: list[str | list[int]], params: SamplingParams, base_id: str,
                         lora_request: LoRARequest | None = None) -> list[RequestStream]:
        """All prompts or none: a bad one aborts those already queued."""
        streams: list[RequestStream] = []
        try:
            for i, p in enumerate(prompts):
                rid = base_id if len(prompts) == 1 else f"{base_id}-{i}"
                streams.append(await self.submit(p, params, rid, lora_request))
        except BaseException:
            for s in streams:
                s.close()
            raise
        return streams

    def observe(self, out: RequestOutput) -> None:
        if self.metrics is not None and out.finished:
            self.metrics.observe_finished(out, self.name, self.quality_signal)

    def observe_aborted(self) -> None:
        if self.metrics is not None:
            self.metrics.observe_aborted(self.name)



# ---- shared output formatting ------------------------------------------------------------------------------
def chat_logprobs(state: ServedModel, o: CompletionOutput, t0: int, t1: int, top_n: int) -> list[dict]:
    """OpenAI chat logprob entries of tokens t0..t1 of `o` (the Ollama API answers the same ones)."""
    content = []
    for k in range(t0, t1):
        tid = o.token_ids[k]
        entry = o.logprobs[k] if o.logprobs and k < len(o.logprobs) else {}
        text = state.token_text(tid)
        top = sorted(entry.items(), key=lambda kv: -kv[1])[:top_n]
        content.append({
            "token": text, "logprob": entry.get(tid, 0.0), "bytes": list(text.encode("utf-8")),
            "top_logprobs": [{"token": state.token_text(t), "logprob": lp,
                              "bytes": list(state.token_text(t).encode("utf-8"))} for t, lp in top],
        })
    return content


async def embed_inputs(state: ServedModel, inputs: list[str | list[int]], param: str = "input"
                       ) -> tuple[list[list[float]], int]:
    """Embeddings of texts or token-id lists (both APIs), and the number of tokens embedded."""
    ids: list[list[int]] = []
    for k, item in enumerate(inputs):
        if isinstance(item, str):
            if not item:
                raise APIError(400, f"{param}[{k}] is empty", param=param)
            ids.append(await state.encode(item))  # never truncated: past the context window is a 400 anyway
        else:
            ids.append([int(t) for t in item])
    try:
        vectors = await state.engine.embed(ids)
    except Exception as exc:  # noqa: BLE001
        err = error_for(exc)
        err.param = err.param or param
        raise err from None
    return vectors, sum(len(x) for x in ids)


class AdapterView:
    """A served model as requests naming one of its LoRA adapters see it: the same engine, tokenizer and
    bookkeeping, every prompt run with the adapter."""

    def __init__(self, model: ServedModel, lora: LoRARequest):
        self.model, self.lora = model, lora

    def __getattr__(self, name: str):
        return getattr(self.model, name)

    async def submit(self, prompt, params: SamplingParams, request_id: str, lora_request=None) -> RequestStream:
        return await self.model.submit(prompt, params, request_id, self.lora)

    async def submit_all(self, prompts, params: SamplingParams, base_id: str, lora_request=None
                         ) -> list[RequestStream]:
        return await self.model.submit_all(prompts, params, base_id, self.lora)
