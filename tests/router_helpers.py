"""A router on a background event loop for tests (real gRPC and HTTP on loopback)."""

from __future__ import annotations

from colm.router.server import ThreadedRouterServer


BackgroundRouter = ThreadedRouterServer  # the name the tests use


def _fetch_json(req):
    """Send `req` and return (status, parsed JSON or text); an HTTP error status is returned, not raised."""
    import json
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            text, status = r.read().decode(), r.status
    except urllib.error.HTTPError as e:
        text, status = e.read().decode(), e.code
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def post_json(url: str, body, headers=None, raw: bytes | None = None):
    """POST and return (status, parsed JSON or text)."""
    import json
    import urllib.request

    data = raw if raw is not None else json.dumps(body).encode()
    return _fetch_json(urllib.request.Request(url, data=data,
                                              headers={"Content-Type": "application/json", **(headers or {})}))


def get_json(url: str, headers=None):
    """GET and return (status, parsed JSON or text)."""
    import urllib.request

    return _fetch_json(urllib.request.Request(url, headers=headers or {}))


def start_worker_procs(model_dir, sections, env, procs: list) -> dict[str, str]:
    """Start a `colm.deploy.worker_main` process per (role, config JSON) in `sections`, all at once, appending each
    to `procs` (the caller terminates them), and return {role: gRPC address} from their READY lines."""
    import subprocess
    import sys

    started = []
    for role, cfg in sections:
        p = subprocess.Popen([sys.executable, "-m", "colm.deploy.worker_main", "--role", role, "--model", str(model_dir),
                              "--config", cfg], stdout=subprocess.PIPE, text=True, env=env)
        procs.append(p)
        started.append((role, p))
    addrs = {}
    for role, p in started:
        ready = p.stdout.readline().split()
        assert ready[:2] == ["READY", role], ready
        addrs[role] = ready[2]
    return addrs


def assert_router_gives_reference_tokens(full, model_dir, decode_addr: str, prefill_addr: str, token: str,
                                         kv_path: str) -> None:
    """A router over the decode and prefill workers at these addresses (transport `kv_path`): greedy tokens equal
    ``colm generate`` with `full` at every scale for mixed prompt lengths."""
    from colm import checkpoint
    from colm.client import Client
    from colm.generate import generate
    from colm.router.backend import WorkerInfo
    from colm.router.config import RouterConfig
    from colm.router.core import Router
    from colm.router.grpc_backend import GrpcBackend
    from colm.sampling import SamplingParams
    from colm.tokenizer import ByteTokenizer

    workers = [WorkerInfo("decode-0", "decode", decode_addr), WorkerInfo("prefill-0", "prefill", prefill_addr)]
    tok = ByteTokenizer()
    bg = BackgroundRouter(Router(RouterConfig(grpc_port=0, http_port=None), checkpoint.load_config(model_dir), tok,
                                 GrpcBackend(workers, cluster_token=token, kv_path=kv_path)))
    try:
        with Client(bg.grpc_addr) as c:
            for text in ("Hi", "The import statement", "a longer prompt " * 6):
                for scale in range(1, full.cfg.num_chains + 1):
                    want = generate(full, tok.encode(text), SamplingParams(max_new_tokens=8, ignore_eos=True),
                                    scale=scale).token_ids
                    got = c.complete(text, max_new_tokens=8, scale=scale, ignore_eos=True)["token_ids"]
                    assert got == want, (text, scale)
                # chain-1 self-speculative decoding over the same transport: the same tokens at full scale
                spec = c.complete(text, max_new_tokens=8, ignore_eos=True, scale=full.cfg.num_chains, speculative=3)
                assert spec["token_ids"] == want and spec["usage"]["draft_accepted_tokens"] == sum(spec["drafted"])
    finally:
        bg.stop()


def wait_serving(addr: str, timeout_s: float = 300.0) -> dict:
    """The router's health once it is serving with every worker healthy (a restarted one reports again); fails
    after ``timeout_s``. A router too busy to answer is asked again."""
    import time

    from colm.client import Client

    end, h = time.time() + timeout_s, {}
    while time.time() < end:
        try:
            with Client(addr) as c:
                h = c.health()
            if h["serving"] and all(w["state"] == "healthy" for w in h["workers"]):
                return h
        except Exception as e:  # noqa: BLE001 - the router may be busy; keep asking
            h = {"error": str(e)}
        time.sleep(0.2)
    raise AssertionError(f"not serving after {timeout_s} s: {h}")


def walk_away(client, text: str, max_new_tokens: int) -> None:
    """A client that starts a Generate stream and cancels it at its first token."""
    it = client.stub.Generate(client.request(text, max_new_tokens=max_new_tokens, ignore_eos=True), timeout=60)
    for m in it:
        if m.tokens:
            it.cancel()
            break


def launched_on_ray(cfg_dict: dict, num_gpus: int = 0, num_cpus: int = 4):
    """A generator for a module fixture: ``colm serve``'s launcher on an embedded Ray cluster started here (with
    ``num_gpus`` simulated GPUs: a resource Ray believes in, the engines run on the CPU); yields (launcher, its
    addresses), then stops both."""
    import asyncio
    import threading

    import ray

    from colm.deploy.config import ClusterConfig
    from colm.deploy.launcher import EMBEDDED_RAY_SYSTEM_CONFIG, Launcher

    cfg = ClusterConfig.from_dict(cfg_dict)
    ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, namespace="colm", log_to_driver=False,
             _system_config=EMBEDDED_RAY_SYSTEM_CONFIG)
    launcher = Launcher(cfg)
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    call = lambda coro, t=420: asyncio.run_coroutine_threadsafe(coro, loop).result(t)  # noqa: E731
    try:
        addrs = call(launcher.start())
        yield launcher, addrs
        call(launcher.stop())
    finally:
        loop.call_soon_threadsafe(loop.stop)
        ray.shutdown()


def chat_router(model, ckpt_dir, backend=None, **router_cfg):
    """A router over ``model`` (``LocalBackend`` unless ``backend``) with the byte tokenizer and the bundled demo's
    chat template (copied into ``ckpt_dir``), and an ``openai`` client of it: (background router, client, tokenizer)."""
    import shutil

    import openai

    from colm.assets import demo_model_dir
    from colm.router.config import RouterConfig
    from colm.router.core import Router
    from colm.router.local_backend import LocalBackend
    from colm.tokenizer import ByteTokenizer

    shutil.copy(demo_model_dir() / "tokenizer_config.json", ckpt_dir / "tokenizer_config.json")
    tok = ByteTokenizer()
    tok.model_dir = str(ckpt_dir)
    cfg = RouterConfig(**{"grpc_port": 0, "http_port": 0, "metrics_port": None, "poll_interval_s": 0.05, **router_cfg})
    bg = BackgroundRouter(Router(cfg, model.cfg, tok, backend or LocalBackend(model, tokenizer=tok)))
    client = openai.OpenAI(base_url=f"{bg.http_url}/v1", api_key="unused", max_retries=0, timeout=60)
    return bg, client, tok


def failing_engine_router(path):
    """A router (gRPC and HTTP on free ports) over a prefill and a decode engine of the checkpoint at ``path``;
    its backend's ``fail_after = n`` makes the next attempt fail after n tokens (the worker serves on, so the router
    retries the request with those tokens ending the prompt) and ``attempts`` lists every attempt's EngineRequest.
    -> (background router, backend)."""
    from colm import checkpoint
    from colm.decode_worker.config import DecodeConfig
    from colm.decode_worker.engine import DecodeEngine
    from colm.prefill_worker.engine import PrefillEngine
    from colm.router.backend import RequestFailed
    from colm.router.config import RouterConfig
    from colm.router.core import Router
    from colm.router.engine_backend import EngineBackend
    from colm.tokenizer import ByteTokenizer

    class FailOnceBackend(EngineBackend):
        def __init__(self, prefill, decode) -> None:
            super().__init__(prefill, decode)
            self.attempts: list = []
            self.fail_after = 0

        async def generate(self, req, prefill_id, decode_id):
            self.attempts.append(req)
            fail_after, self.fail_after = self.fail_after, 0
            n = 0
            async for tok in super().generate(req, prefill_id, decode_id):
                yield tok
                n += 1
                if n == fail_after:
                    raise RequestFailed(decode_id, "ABORTED: injected failure")

    backend = FailOnceBackend({"prefill-0": PrefillEngine.from_checkpoint(path)},
                              {"decode-0": DecodeEngine.from_checkpoint(path, DecodeConfig(num_blocks=160))})
    bg = BackgroundRouter(Router(RouterConfig(grpc_port=0, http_port=0, poll_interval_s=0.05),
                                 checkpoint.load_config(path), ByteTokenizer(), backend))
    return bg, backend


def until(pred, timeout: float = 5.0) -> bool:
    """Whether ``pred()`` holds within ``timeout`` seconds (asked every 50 ms, and once more at the end)."""
    import time

    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


class LocalPrefillPair:
    """A backend of a prefill worker p0 and a decode worker d0 (``decode_blocks`` of KV) over LocalBackend's
    ``model``: a subclass scripts p0's health polls in ``prefill_poll`` (raise or hang); ``dead``: p0 is reported
    gone for good. start, close, set_scale and abort do nothing."""

    def __init__(self, model, decode_blocks: int = 1000) -> None:
        from colm.router.local_backend import LocalBackend

        self.local = LocalBackend(model)
        self.decode_blocks = decode_blocks
        self.dead = ""

    async def prefill_poll(self) -> None:
        pass

    async def start(self):
        pass

    async def close(self):
        pass

    def workers(self):
        from colm.router.backend import WorkerInfo

        return [WorkerInfo("p0", "prefill", dead=self.dead), WorkerInfo("d0", "decode")]

    async def poll(self, wid):
        from colm.router.policy import WorkerReport

        if wid == "d0":
            return WorkerReport(wid, "decode", free_blocks=self.decode_blocks, total_blocks=self.decode_blocks)
        await self.prefill_poll()
        return WorkerReport(wid, "prefill")

    def generate(self, req, prefill_id, decode_id):
        return self.local.generate(req, prefill_id, decode_id)

    async def set_scale(self, *a):
        pass

    async def abort(self, *a):
        pass
