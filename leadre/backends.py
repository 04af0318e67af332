"""Decoder backends behind the one `StepModel` interface the search uses (leadre.decode).

- `torch`: the Hugging Face model and its dynamic KV cache (`HFStepModel`), on the CPU or a GPU.
- `torch-compile`: `DecoderGraph` (the same decoder as a function of plain tensors) under `torch.compile`;
  `torch-cudagraphs` is the same with CUDA graphs (`mode="reduce-overhead"`), which pays only when shapes repeat.
- `onnx` / `onnx-int8`: the exported prefill and step graphs under ONNX Runtime (CPU execution provider; the CUDA
  and TensorRT providers where the installed onnxruntime has them and a GPU is there).
- `tensorrt`: native TensorRT engines built from the ONNX graphs (FP16, optimisation profiles). Needs `tensorrt`
  and a GPU; not installable on the development machine, so that path is untested there.

Every backend but `torch` runs `DecoderGraph`: the prompt's KV cache is kept once per user and shared by its beams,
only the generated tokens' cache is kept per beam (`TensorStepModel`), and ONNX Runtime, TensorRT and PyTorch
run the same graph, checked against `torch` by `leadre compile`.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from leadre.decode import HFStepModel, StepModel

log = logging.getLogger(__name__)

BACKENDS = ("torch", "torch-compile", "torch-cudagraphs", "onnx", "onnx-int8", "tensorrt")
# Attention layouts DecoderGraph reproduces: pre-norm decoders with rotary q/k, grouped KV heads and a gated MLP.
SUPPORTED_MODEL_TYPES = ("qwen2", "llama", "mistral")
PREFILL, STEP = "prefill", "step"


class BackendUnavailable(ValueError):
    """A backend that cannot run here (missing package, no GPU, no compiled artifact); the message says why."""


class DecoderGraph(torch.nn.Module):
    """The decoder as a function of plain tensors, for export and compilation. Two entry points (by argument count):

    - prefill: (input_ids (U, T), attention_mask (U, T), position_ids (U, T)) → (last-position logits (U, V) float32,
      prompt keys, prompt values (layers, U, kv heads, T, head dim));
    - step: (input_ids (R, 1), prompt_mask (U, T), position_ids (R, 1), prompt_keys, prompt_values, past_keys,
      past_values (layers, R, kv heads, g, head dim)) → (logits (R, V), keys, values (layers, R, kv heads, g + 1,
      head dim)), where the R = U × B rows are the users' beams, user by user.

    The beams of a user share its prompt's keys and values: a step reads them once per user (the queries of all its
    beams in one matrix product) and only the few generated tokens' keys are kept, and reordered, per beam. So a
    step neither copies nor re-reads the prompt cache once per beam, which is most of the memory traffic of beam
    search with a per-row cache (the `torch` backend's).

    It reuses the Hugging Face model's own modules (projections, norms, rotary embedding, MLP) and computes what
    eager attention computes. Masks use the dtype's minimum rather than -inf, so padded query rows stay finite."""

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        config = model.config
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"export/compile supports decoders of type {', '.join(SUPPORTED_MODEL_TYPES)}; "
                             f"this model is {config.model_type!r}: use the `torch` backend")
        sliding = "sliding_attention" in (getattr(config, "layer_types", None) or []) or (
            config.model_type == "mistral" and getattr(config, "sliding_window", None))
        if sliding:
            raise ValueError("export/compile does not support sliding-window attention: use the `torch` backend")
        self.model = model.eval()
        attention = model.model.layers[0].self_attn
        self.head_dim = attention.head_dim
        self.groups = attention.num_key_value_groups

    @property
    def layers(self) -> int:
        return len(self.model.model.layers)

    @property
    def kv_heads(self) -> int:
        return self.model.config.num_key_value_heads

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                prompt_keys: torch.Tensor | None = None, prompt_values: torch.Tensor | None = None,
                past_keys: torch.Tensor | None = None,
                past_values: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        inner = self.model.model
        rows, new = input_ids.shape
        hidden = inner.embed_tokens(input_ids)
        cos, sin = inner.rotary_emb(hidden, position_ids)
        lowest = torch.finfo(hidden.dtype).min
        if prompt_keys is None:  # prefill: causal attention within each left-padded prompt
            index = torch.arange(new, device=input_ids.device)
            visible = (index[None, :] <= index[:, None])[None] & (attention_mask[:, None, :] > 0)
            bias = torch.zeros(visible.shape, dtype=hidden.dtype, device=hidden.device)
            bias = bias.masked_fill(~visible, lowest)[:, None]  # (U, 1, T, T)
        else:  # step: every beam sees its user's real prompt tokens and its own generated tokens
            bias = torch.zeros(attention_mask.shape, dtype=hidden.dtype, device=hidden.device)
            bias = bias.masked_fill(attention_mask == 0, lowest)[:, None, None]  # (U, 1, 1, T)
        keys_out, values_out = [], []
        for i, layer in enumerate(inner.layers):
            attention = layer.self_attn
            x = layer.input_layernorm(hidden)
            q = attention.q_proj(x).view(rows, new, -1, self.head_dim).transpose(1, 2)
            k = attention.k_proj(x).view(rows, new, -1, self.head_dim).transpose(1, 2)
            v = attention.v_proj(x).view(rows, new, -1, self.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            if prompt_keys is None:
                scores = torch.matmul(q, repeat_kv(k, self.groups).transpose(2, 3)) * attention.scaling + bias
                probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
                out = torch.matmul(probs, repeat_kv(v, self.groups))
            else:
                k = torch.cat([past_keys[i], k], dim=2)
                v = torch.cat([past_values[i], v], dim=2)
                out = self._beam_attention(q, prompt_keys[i], prompt_values[i], bias, k, v, attention.scaling)
            keys_out.append(k)
            values_out.append(v)
            hidden = hidden + attention.o_proj(out.transpose(1, 2).reshape(rows, new, -1))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        logits = self.model.lm_head(inner.norm(hidden[:, -1]))
        return logits.float(), torch.stack(keys_out), torch.stack(values_out)

    def _beam_attention(self, q: torch.Tensor, prompt_k: torch.Tensor, prompt_v: torch.Tensor, bias: torch.Tensor,
                        k: torch.Tensor, v: torch.Tensor, scaling: float) -> torch.Tensor:
        """One new token per beam: q (R, H, 1, D); the user's prompt keys/values (U, KV, T, D) with `bias`
        (U, 1, 1, T); the beam's generated keys/values (R, KV, g, D) → (R, H, 1, D). Query head h uses kv head
        h // groups (as `repeat_kv` lays them out)."""
        users, kv, prompt_len, dim = prompt_k.shape
        heads = q.shape[1]
        # the queries of a user's beams and of one kv head's query heads, stacked: (U, KV, B·G, D)
        per_user = q.reshape(users, -1, kv, self.groups, dim).transpose(1, 2).reshape(users, kv, -1, dim)
        prompt_scores = torch.matmul(per_user, prompt_k.transpose(2, 3)) * scaling + bias  # (U, KV, B·G, T)
        own = torch.matmul(q.reshape(-1, kv, self.groups, dim), k.transpose(2, 3)) * scaling  # (R, KV, G, g)
        own = own.reshape(users, -1, kv, self.groups, own.shape[-1]).transpose(1, 2)
        own = own.reshape(users, kv, -1, own.shape[-1])  # (U, KV, B·G, g)
        probs = torch.softmax(torch.cat([prompt_scores, own], dim=-1).float(), dim=-1).to(q.dtype)
        from_prompt = torch.matmul(probs[..., :prompt_len], prompt_v)  # (U, KV, B·G, D)
        from_prompt = from_prompt.reshape(users, kv, -1, self.groups, dim).transpose(1, 2).reshape(-1, heads, 1, dim)
        own_probs = probs[..., prompt_len:].reshape(users, kv, -1, self.groups, own.shape[-1]).transpose(1, 2)
        from_own = torch.matmul(own_probs.reshape(-1, kv, self.groups, own.shape[-1]), v)  # (R, KV, G, D)
        return from_prompt + from_own.reshape(-1, heads, 1, dim)


# prefill: (input_ids, attention_mask, position_ids) -> (logits, keys, values);
# step: (input_ids, prompt_mask, position_ids, prompt_keys, prompt_values, past_keys, past_values) -> the same
RunFn = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


@dataclass
class BeamState:
    prompt_keys: torch.Tensor  # (layers, users, kv heads, prompt length, head dim): shared by a user's beams
    prompt_values: torch.Tensor
    prompt_mask: torch.Tensor  # (users, prompt length)
    keys: torch.Tensor  # (layers, rows, kv heads, generated tokens, head dim)
    values: torch.Tensor
    user: torch.Tensor  # (rows,) the user of each row
    next_position: torch.Tensor  # (rows,)


class TensorStepModel:
    """`StepModel` over a prefill and a step function with `DecoderGraph`'s signatures. The search's row choices
    gather only the generated tokens' cache; the rows of a step must come user by user, the same number per user
    (as `search_batch` makes them). `device` is where the inputs must live."""

    def __init__(self, prefill: RunFn, step: RunFn, device: torch.device, name: str):
        self.run_prefill, self.run_step, self.device, self.name = prefill, step, device, name

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, BeamState]:
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        # left padding: positions count real tokens only, so a prompt scores the same padded or alone
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        logits, keys, values = self.run_prefill(input_ids, attention_mask, positions)
        users = torch.arange(len(input_ids), device=self.device)
        empty = keys[:, :, :, :0]
        return logits.float(), BeamState(keys, values, attention_mask, empty, empty, users, attention_mask.sum(-1))

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, rows: torch.Tensor, state: BeamState) -> tuple[torch.Tensor, BeamState]:
        tokens, rows = tokens.to(self.device), rows.to(self.device)
        users = state.user[rows]
        n_users = len(state.prompt_mask)
        if len(rows) % n_users or not torch.equal(users, torch.arange(n_users, device=self.device)
                                                   .repeat_interleave(len(rows) // n_users)):
            raise ValueError(f"{self.name}: a step's rows must come user by user, the same number for each user")
        positions = state.next_position[rows]
        logits, keys, values = self.run_step(tokens[:, None], state.prompt_mask, positions[:, None], state.prompt_keys,
                                             state.prompt_values, state.keys[:, rows], state.values[:, rows])
        return logits.float(), BeamState(state.prompt_keys, state.prompt_values, state.prompt_mask, keys, values,
                                         users, positions + 1)


def torch_step_model(model: PreTrainedModel, backend: str = "torch") -> StepModel:
    """A PyTorch backend on the model's device: `torch` (eager, HF cache), `torch-compile`, `torch-cudagraphs`."""
    if backend == "torch":
        return HFStepModel(model)
    if backend not in ("torch-compile", "torch-cudagraphs"):
        raise ValueError(f"unknown PyTorch backend {backend!r}")
    if backend == "torch-cudagraphs" and model.device.type != "cuda":
        raise BackendUnavailable("torch-cudagraphs needs the model on a CUDA device")
    graph = DecoderGraph(model)
    mode = "reduce-overhead" if backend == "torch-cudagraphs" else None
    # dynamic shapes: batch × beam and length change every call; one graph serves them all
    compiled = torch.compile(graph, dynamic=True, mode=mode)
    if mode is None:
        return TensorStepModel(compiled, compiled, model.device, backend)

    def replay(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # a CUDA graph's outputs live in memory its next replay overwrites; the search keeps the prompt cache and
        # the generated keys across replays, so they are copied out (small next to the step itself)
        torch.compiler.cudagraph_mark_step_begin()
        return tuple(t.clone() for t in compiled(*tensors))

    return TensorStepModel(replay, replay, model.device, backend)


# --- ONNX Runtime -----------------------------------------------------------------------------------------------


def ort_providers(device: torch.device) -> list[str]:
    """ONNX Runtime execution providers for `device`, best first, among those the installed onnxruntime has."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    wanted = ["TensorrtExecutionProvider", "CUDAExecutionProvider"] if device.type == "cuda" else []
    return [p for p in wanted if p in available] + ["CPUExecutionProvider"]


class OrtStepModel(TensorStepModel):
    """The exported prefill and step graphs under ONNX Runtime. Tensors cross as NumPy views (no copies on the
    CPU); on a GPU provider ONNX Runtime copies them in and out, which is correct but not the fastest path."""

    def __init__(self, compiled_dir: str | Path, int8: bool = False, device: torch.device = torch.device("cpu"),
                 threads: int | None = None):
        import onnxruntime as ort

        compiled_dir = Path(compiled_dir)
        suffix = ".int8.onnx" if int8 else ".onnx"
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        self.providers = ort_providers(device)
        sessions = {}
        for name in (PREFILL, STEP):
            path = compiled_dir / f"{name}{suffix}"
            if not path.is_file():
                raise BackendUnavailable(f"{compiled_dir}: no {path.name}" + (" (compile with --int8)" if int8 else ""))
            sessions[name] = ort.InferenceSession(str(path), options, providers=self.providers)
        self.sessions = sessions
        log.info("onnx: execution providers %s", sessions[STEP].get_providers())
        super().__init__(self._runner(PREFILL), self._runner(STEP), torch.device("cpu"),
                         "onnx-int8" if int8 else "onnx")

    def _runner(self, name: str) -> RunFn:
        session = self.sessions[name]
        names = [i.name for i in session.get_inputs()]

        def run(*tensors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            feeds = {n: t.contiguous().numpy() for n, t in zip(names, tensors)}
            return tuple(torch.from_numpy(o) for o in session.run(None, feeds))  # type: ignore[return-value]

        return run


# --- TensorRT (untested here: tensorrt does not install on the development machine) -------------------------------


def tensorrt_missing() -> str | None:
    """Why the native TensorRT backend cannot run here, or None when it can."""
    if importlib.util.find_spec("tensorrt") is None:
        return "the `tensorrt` Python package is not installed (pip install 'leadre[gpu]' on a CUDA machine)"
    if not torch.cuda.is_available():
        return "TensorRT needs a CUDA GPU and PyTorch sees none"
    return None


class TensorRTStepModel(TensorStepModel):
    """The TensorRT engines `leadre compile --backend tensorrt` built, run on PyTorch CUDA tensors."""

    def __init__(self, compiled_dir: str | Path, device: torch.device):
        missing = tensorrt_missing()
        if missing:
            raise BackendUnavailable(f"tensorrt backend: {missing}")
        import tensorrt as trt

        compiled_dir = Path(compiled_dir)
        self.logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self.logger)
        self.contexts = {}
        for name in (PREFILL, STEP):
            path = compiled_dir / f"{name}.plan"
            if not path.is_file():
                raise BackendUnavailable(f"{compiled_dir}: no {path.name} (compile with --backend tensorrt on a GPU)")
            engine = runtime.deserialize_cuda_engine(path.read_bytes())
            self.contexts[name] = (engine, engine.create_execution_context())
        self.stream = torch.cuda.Stream(device)
        super().__init__(self._runner(PREFILL), self._runner(STEP), device, "tensorrt")

    def _runner(self, name: str) -> RunFn:
        import tensorrt as trt

        engine, context = self.contexts[name]
        tensor_names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in tensor_names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in tensor_names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]

        def run(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
            keep = [t.contiguous() for t in tensors]
            for n, t in zip(inputs, keep):
                context.set_input_shape(n, tuple(t.shape))
                context.set_tensor_address(n, t.data_ptr())
            results = []
            for n in outputs:
                dtype = torch.float32 if engine.get_tensor_dtype(n) == trt.float32 else torch.float16
                out = torch.empty(tuple(context.get_tensor_shape(n)), dtype=dtype, device=self.device)
                context.set_tensor_address(n, out.data_ptr())
                results.append(out)
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            context.execute_async_v3(self.stream.cuda_stream)
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
            return tuple(results)

        return run


# --- availability and choice ----------------------------------------------------------------------------------


def onnx_missing() -> str | None:
    """Why ONNX export or ONNX Runtime cannot run here, or None."""
    for package in ("onnx", "onnxruntime"):
        if importlib.util.find_spec(package) is None:
            return f"the `{package}` package is not installed (pip install 'leadre[cpu]' or 'leadre[gpu]')"
    return None


def available_backends(device: torch.device, compiled_dir: str | Path | None = None) -> dict[str, str | None]:
    """Each backend → None where it can run on `device` (with `compiled_dir`, if any), else the reason it cannot."""
    compiled = Path(compiled_dir) if compiled_dir is not None else None
    reasons: dict[str, str | None] = {"torch": None, "torch-compile": None}
    reasons["torch-cudagraphs"] = None if device.type == "cuda" else "CUDA graphs need a GPU"
    onnx = onnx_missing()
    for backend, file in (("onnx", "step.onnx"), ("onnx-int8", "step.int8.onnx")):
        if onnx:
            reasons[backend] = onnx
        elif compiled is None or not (compiled / file).is_file():
            reasons[backend] = f"no compiled {file} (run `leadre compile`)"
        else:
            reasons[backend] = None
    trt = tensorrt_missing()
    if trt is None and (compiled is None or not (compiled / "step.plan").is_file()):
        trt = "no compiled step.plan (run `leadre compile --backend tensorrt` on this GPU)"
    reasons["tensorrt"] = trt
    return reasons


def choose_backend(device: torch.device, compiled_dir: str | Path | None = None,
                   measured: dict[str, dict[str, Any]] | None = None) -> tuple[str, str]:
    """`auto`: (backend, reason). With `measured` (the compile manifest's timings on the same kind of device) the
    fastest available one that matched PyTorch's top-N; otherwise the usual order: TensorRT on a GPU, then ONNX
    Runtime on the CPU, then PyTorch eager. int8 is never chosen automatically: it changes the answers."""
    can = {b for b, why in available_backends(device, compiled_dir).items() if why is None}
    kind = device.type
    # keys are backends, or "backend@device type" where the compile step timed one on several kinds of device
    timed = {b.split("@")[0]: m for b, m in (measured or {}).items() if m.get("device_type") == kind}
    timed = {b: m for b, m in timed.items() if b in can and b != "onnx-int8" and m.get("same_top_n", True)}
    if timed:
        best = min(timed, key=lambda b: timed[b]["ms_per_user"])
        detail = ", ".join(f"{b} {m['ms_per_user']:.2f} ms/user" for b, m in sorted(timed.items(), key=lambda x: x[1]["ms_per_user"]))
        return best, f"fastest measured on {kind} at compile time ({detail})"
    order = ["tensorrt", "torch"] if kind == "cuda" else ["onnx", "torch"]
    best = next(b for b in order if b in can)
    return best, f"default order for {kind} ({' > '.join(order)}); not measured on this kind of device"


def load_step_model(backend: str, device: torch.device, model: PreTrainedModel | None = None,
                    compiled_dir: str | Path | None = None, threads: int | None = None) -> StepModel:
    """Build the `StepModel` of `backend` (not `auto`: see `choose_backend`) on `device`. The PyTorch backends
    need `model` (already on `device`); the others need `compiled_dir`."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: expected auto or one of {', '.join(BACKENDS)}")
    why = available_backends(device, compiled_dir)[backend]
    if why:
        raise BackendUnavailable(f"backend {backend!r} cannot run on {device}: {why}")
    if backend.startswith("torch"):
        if model is None:
            raise ValueError(f"backend {backend!r} needs the PyTorch model")
        return torch_step_model(model, backend)
    if backend == "tensorrt":
        return TensorRTStepModel(compiled_dir, device)  # type: ignore[arg-type]
    return OrtStepModel(compiled_dir, int8=backend == "onnx-int8", device=device, threads=threads)  # type: ignore[arg-type]


def random_prompts(vocab: int, users: int, lengths: tuple[int, int], seed: int) -> list[list[int]]:
    """Random token prompts for parity checks and timings (ids 1..vocab-1: 0 is often the pad token)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(1, vocab, rng.integers(*lengths)).tolist() for _ in range(users)]
