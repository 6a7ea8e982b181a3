"""An LLMEngine in a worker process of its own (started with multiprocessing "spawn"): the child side.

The child builds the engine, says "ready" (with what the parent needs to know of the model: tokenizer, config,
context window), then loops: drain the parent's commands from the pipe, run one step while there is work, send
the step's outputs with fresh statistics. engine.process_client is the parent side.

Commands (tuples, first item the kind): add, prefill (prefill worker: first token only, then export the prompt's
K/V), add_prefilled (decode worker: a request whose prompt ran elsewhere), abort, embed, reset_prefix_cache,
shutdown. Messages back: ready / failed, added, out (outputs, stats, steps), prefilled, transfer, reply, error.
"""
from __future__ import annotations

import logging
import time
import traceback

log = logging.getLogger("tokenloom")

IDLE_WAIT_S = 0.5


def run_engine_process(conn, config, threads: int, role: str) -> None:
    """The child's entry point: role "engine" (plain), "prefill" or "decode" (a disaggregated pair's sides)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    try:
        from tokenloom.engine.llm_engine import LLMEngine

        engine = LLMEngine(config)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    connector = None
    if role in ("prefill", "decode"):
        from tokenloom.engine.kv_connector import KVConnector

        connector = KVConnector(engine)
    conn.send(("ready", _info(engine)))
    try:
        _EngineLoop(conn, engine, connector).run()
    except (EOFError, OSError, KeyboardInterrupt):  # the parent went away
        pass
    except BaseException as exc:  # noqa: BLE001
        try:
            conn.send(("dead", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        except OSError:
            pass
    finally:
        shutdown = getattr(engine, "shutdown", None)  # a parallel model's ranks go with it
        if shutdown is not None:
            shutdown()


def _info(engine) -> dict:
    return dict(model_name=engine.model_name, model_config=engine.model_config, max_model_len=engine.max_model_len,
                model_source=engine.model_source, config=engine.config, tokenizer=engine.tokenizer,
                block_size=engine.kv_cache_manager.block_size, num_blocks=engine.kv_cache_manager.num_blocks,
                load_time=engine.load_time, stats=engine.stats())


class _EngineLoop:
    def __init__(self, conn, engine, connector):
        self.conn, self.engine, self.connector = conn, engine, connector
        self.prefilling: dict[str, int] = {}  # prefill requests by id: the user's max_tokens
        self.live: set[str] = set()
        self.stop = False

    def run(self) -> None:
        eng, conn = self.engine, self.conn
        while not self.stop:
            if not eng.has_unfinished():
                conn.poll(IDLE_WAIT_S)
            while conn.poll(0):
                self._command(*conn.recv())
            if self.stop:
                return
            steps, outputs = [], []
            if eng.has_unfinished():
                t0 = time.perf_counter()
                try:
                    outputs = eng.step()
                except Exception as exc:  # noqa: BLE001 - fail this batch's requests, keep serving
                    log.exception("engine step failed")
                    self._fail_all(f"engine error: {exc}")
                steps.append((eng.last_step_num_seqs, time.perf_counter() - t0))
                outputs = self._route(outputs)
            else:
                eng.release_free_memory()
            self._send_transfer_report()
            conn.send(("out", outputs, self._stats(), steps))

    def _stats(self):
        st = self.engine.stats()
        if self.connector is not None:
            st.extra["kv_transfer"] = dict(self.connector.counters)
        return st

    def _command(self, kind: str, *args) -> None:
        try:
            getattr(self, f"_do_{kind}")(*args)
        except Exception as exc:  # noqa: BLE001 - answered to whoever asked
            answer = "added" if kind in ("add", "prefill", "add_prefilled") else "reply"
            rid = args[0] if args else None
            if rid is not None:
                self.live.discard(rid)
                self.prefilling.pop(rid, None)
            err = exc if _is_user_error(exc) else f"engine error: {type(exc).__name__}: {exc}"
            try:
                self.conn.send((answer, rid, err, None))
            except Exception:  # noqa: BLE001 - an error that does not pickle goes as its message
                self.conn.send((answer, rid, str(err), None))

    def _do_add(self, rid, prompt, params) -> None:
        self.engine.add_request(prompt, params, rid)
        self.live.add(rid)
        self.conn.send(("added", rid, None, None))

    def _do_prefill(self, rid, prompt, params, skip_blocks) -> None:
        self.engine.add_request(prompt, params, rid)
        max_tokens = self.engine.output_processor.groups[rid].requests[0].max_tokens
        self.connector.mark_export(rid, skip_blocks)
        self.prefilling[rid] = max_tokens
        self.live.add(rid)
        self.conn.send(("added", rid, None, None))

    def _do_add_prefilled(self, rid, prompt, params, first_token, first_logprobs, handoff, first_time) -> None:
        self.connector.add_prefilled(rid, prompt, params, first_token, first_logprobs, handoff, first_time)
        self.live.add(rid)
        self.conn.send(("added", rid, None, None))

    def _do_abort(self, rid) -> None:
        self.engine.abort_request(rid)
        self.prefilling.pop(rid, None)
        self.live.discard(rid)

    def _do_embed(self, call_id, prompts) -> None:
        self.conn.send(("reply", call_id, None, self.engine.embed(prompts)))

    def _do_reset_prefix_cache(self, call_id) -> None:
        self.engine.reset_prefix_cache()
        self.conn.send(("reply", call_id, None, None))

    def _do_shutdown(self) -> None:
        self.stop = True

    def _route(self, outputs: list) -> list:
        """Plain outputs go back as they are; a prefill request's (finished) one goes with its hand-off."""
        plain = []
        for out in outputs:
            if out.finished:
                self.live.discard(out.request_id)
            max_tokens = self.prefilling.pop(out.request_id, None) if out.finished else None
            if max_tokens is None:
                plain.append(out)
                continue
            handoff = self.connector.take_handoff(out.request_id)
            o = out.outputs[0]
            goes_on = (o.finish_reason == "length" and max_tokens > 1 and
                       len(out.prompt_token_ids) + 1 < self.engine.max_model_len)
            if handoff is not None and not goes_on:
                handoff.segment.unlink()
                handoff = None
            self.conn.send(("prefilled", out.request_id, out, handoff, goes_on))
        return plain

    def _send_transfer_report(self) -> None:
        c = self.connector
        if c is not None and c.reports:
            reports, c.reports = c.reports, []
            self.conn.send(("transfer", reports))

    def _fail_all(self, message: str) -> None:
        for rid in list(self.live):
            self.engine.abort_request(rid)
            self.conn.send(("error", rid, message))
        self.live.clear()
        self.prefilling.clear()


def _is_user_error(exc: Exception) -> bool:
    from tokenloom.config import TokenloomError

    return isinstance(exc, TokenloomError)
