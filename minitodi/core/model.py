"""GPT-2 and Llama transformers: configuration, initialisation, forward and hand-written backward.

Parameters are a plain dict keyed by the names Hugging Face transformers gives ``GPT2LMHeadModel``'s
tensors, so a checkpoint needs no renaming (see :mod:`minitodi.checkpoint`)::

    transformer.wte.weight (V, C)          transformer.wpe.weight (n_positions, C)
    transformer.h.{l}.ln_1.weight/bias (C,)
    transformer.h.{l}.attn.c_attn.weight (C, 3C) / bias (3C,)     weights stored (in, out)
    transformer.h.{l}.attn.c_proj.weight (C, C)  / bias (C,)
    transformer.h.{l}.ln_2.weight/bias (C,)
    transformer.h.{l}.mlp.c_fc.weight (C, 4C)    / bias (4C,)
    transformer.h.{l}.mlp.c_proj.weight (4C, C)  / bias (C,)
    transformer.ln_f.weight/bias (C,)

The output head is tied to the token embedding: logits = ln_f(x) @ wte^T. The model computes in the
dtype of its parameters (float64 for gradient checks, float32 for training).

One block (pre-norm, as GPT-2), :func:`block_forward` and :func:`block_backward`::

    x = x + c_proj(attention(c_attn(ln_1(x))))
    x = x + mlp.c_proj(gelu(mlp.c_fc(ln_2(x))))

A Llama (:class:`LlamaConfig`) is named as transformers' ``LlamaForCausalLM``, its projections stored
(out, in) as ``nn.Linear`` stores them; the head is untied unless ``tie_word_embeddings``::

    model.embed_tokens.weight (V, C)                  model.layers.{l}.input_layernorm.weight (C,)
    model.layers.{l}.self_attn.{q,k,v,o}_proj.weight (out, in), + .bias (out,) if attention_bias
    model.layers.{l}.post_attention_layernorm.weight (C,)
    model.layers.{l}.mlp.{gate,up}_proj.weight (I, C)  model.layers.{l}.mlp.down_proj.weight (C, I)
    model.norm.weight (C,)                            lm_head.weight (V, C)

    x = x + o_proj(attention(rope(q_proj(a)), rope(k_proj(a)), v_proj(a))),   a = input_layernorm(x)
    x = x + down_proj(silu(gate_proj(m)) * up_proj(m)),                        m = post_attention_layernorm(x)

:func:`forward` and :func:`backward` serve every model type: ``ARCHITECTURES[config.model_type]``.
"""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from . import layers
from .device import array_module, host_rng, to_device


@dataclass(frozen=True)
class GPTConfig:
    model_type = "gpt2"  # a class attribute, not a field: it picks the Architecture
    vocab_size: int = 2048
    n_positions: int = 128
    n_embd: int = 128
    n_layer: int = 4
    n_head: int = 4
    layer_norm_epsilon: float = 1e-5

    def __post_init__(self):
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not self.layer_norm_epsilon > 0:
            raise ValueError(f"GPTConfig.layer_norm_epsilon must be > 0, got {self.layer_norm_epsilon!r}")


def gpt2_param_shapes(config):
    """Every parameter's name and shape, in the order transformers lists them."""
    V, P, C = config.vocab_size, config.n_positions, config.n_embd
    block = {"ln_1.weight": (C,), "ln_1.bias": (C,),
             "attn.c_attn.weight": (C, 3 * C), "attn.c_attn.bias": (3 * C,),
             "attn.c_proj.weight": (C, C), "attn.c_proj.bias": (C,),
             "ln_2.weight": (C,), "ln_2.bias": (C,),
             "mlp.c_fc.weight": (C, 4 * C), "mlp.c_fc.bias": (4 * C,),
             "mlp.c_proj.weight": (4 * C, C), "mlp.c_proj.bias": (C,)}
    shapes = {"transformer.wte.weight": (V, C), "transformer.wpe.weight": (P, C)}
    for l in range(config.n_layer):
        shapes.update({f"transformer.h.{l}.{name}": shape for name, shape in block.items()})
    return {**shapes, "transformer.ln_f.weight": (C,), "transformer.ln_f.bias": (C,)}


def init_params(config, seed=0, *, dtype=np.float32, device="cpu"):
    """GPT-2's initialisation, drawn with NumPy on the host (so NumPy and CuPy start identical).

    Weights and embeddings ~ N(0, 0.02); the projections that write into the residual stream
    (the architecture's ``residual_out``: GPT-2's ``attn.c_proj``, ``mlp.c_proj``) ~ N(0, 0.02 /
    sqrt(2 n_layer)), so the residual's variance does not grow with depth; biases 0; norm weights 1.
    """
    rng = host_rng(seed)
    params = {}
    for name, shape in param_shapes(config).items():
        if len(shape) == 1 and name.endswith(".weight"):  # a norm's gain
            value = np.ones(shape)
        elif name.endswith(".bias"):
            value = np.zeros(shape)
        else:
            residual = name.endswith(ARCHITECTURES[config.model_type].residual_out)
            std = 0.02
            if residual:
                std = 0.02 / np.sqrt(2 * config.n_layer)
            value = rng.normal(0.0, std, size=shape)
        params[name] = to_device(value.astype(dtype), device)
    return params


def check_params(params, config):
    """Raise a clear error if ``params`` lacks a tensor, has an extra one or a wrong shape or dtype."""
    shapes = param_shapes(config)
    missing = sorted(set(shapes) - set(params))
    extra = sorted(set(params) - set(shapes))
    if missing or extra:
        raise KeyError(f"parameters do not match the config: missing {missing[:5]}, unexpected {extra[:5]}")
    dtypes = {params[k].dtype for k in shapes}
    if len(dtypes) > 1 or next(iter(dtypes)).kind != "f":
        raise TypeError(f"parameters must share one float dtype, got {sorted(map(str, dtypes))}")
    for name, shape in shapes.items():
        if tuple(params[name].shape) != shape:
            raise ValueError(f"parameter {name} has shape {tuple(params[name].shape)}, "
                             f"the config says {shape}")


def check_ids(idx, config, pos0=0):
    """Token ids must be integers in [0, vocab_size) and fit the context (CuPy would wrap them silently)."""
    if idx.ndim != 2:
        raise ValueError(f"token ids must be shaped (B, T), got shape {tuple(idx.shape)}")
    if idx.dtype.kind not in "iu":
        raise TypeError(f"token ids must be integers, got dtype {idx.dtype}")
    if idx.size == 0:
        raise ValueError("token ids are empty")
    low = int(idx.min())
    high = int(idx.max())
    if low < 0 or high >= config.vocab_size:
        raise ValueError(f"token ids must be in [0, {config.vocab_size}), got values in [{low}, {high}]")
    length = pos0 + idx.shape[1]
    if length > config.n_positions:
        raise ValueError(f"sequence of {length} positions exceeds n_positions = {config.n_positions}")


def block_forward(x, p, config, past=None):
    """One GPT-2 block, x (B, T, C) -> (B, T, C), and its cache.

    ``p``: the block's tensors by their names within the block (``"ln_1.weight"``, ...); ``past``: its
    ``(k, v)`` for decoding, the cache's ``"present"``. The cache holds the layers' caches by name.
    """
    eps = config.layer_norm_epsilon
    c = {}  # the layers' caches, by name
    a, c["ln_1"] = layers.layernorm_forward(x, p["ln_1.weight"], p["ln_1.bias"], eps)
    a, c["c_attn"] = layers.linear_forward(a, p["attn.c_attn.weight"], p["attn.c_attn.bias"])  # (B, T, 3C)
    a, c["attn"] = layers.attention_forward(a, config.n_head, past)
    c["present"] = c["attn"][1:3]  # (k, v) of every position so far: the KV cache for the next call
    a, c["c_proj"] = layers.linear_forward(a, p["attn.c_proj.weight"], p["attn.c_proj.bias"])
    x = x + a
    m, c["ln_2"] = layers.layernorm_forward(x, p["ln_2.weight"], p["ln_2.bias"], eps)
    m, c["c_fc"] = layers.linear_forward(m, p["mlp.c_fc.weight"], p["mlp.c_fc.bias"])  # (B, T, 4C)
    m, c["gelu"] = layers.gelu_forward(m)
    m, c["mlp_proj"] = layers.linear_forward(m, p["mlp.c_proj.weight"], p["mlp.c_proj.bias"])  # (B, T, C)
    return x + m, c


def block_backward(dx, c):
    """The block's backward: (dL/d its input, {name within the block: gradient}) from dL/d its output.

    Notebook 03, "The whole block, chained in reverse", runs it layer by layer.
    """
    d = {}
    # forward was: x = x + mlp(ln_2(x)): the residual passes dx through and adds the branch's gradient
    dm, d["mlp.c_proj.weight"], d["mlp.c_proj.bias"] = layers.linear_backward(dx, c["mlp_proj"])
    dm = layers.gelu_backward(dm, c["gelu"])
    dm, d["mlp.c_fc.weight"], d["mlp.c_fc.bias"] = layers.linear_backward(dm, c["c_fc"])
    dm, d["ln_2.weight"], d["ln_2.bias"] = layers.layernorm_backward(dm, c["ln_2"])
    dx = dx + dm
    # forward was: x = x + c_proj(attention(c_attn(ln_1(x))))
    da, d["attn.c_proj.weight"], d["attn.c_proj.bias"] = layers.linear_backward(dx, c["c_proj"])
    da = layers.attention_backward(da, c["attn"])
    da, d["attn.c_attn.weight"], d["attn.c_attn.bias"] = layers.linear_backward(da, c["c_attn"])
    da, d["ln_1.weight"], d["ln_1.bias"] = layers.layernorm_backward(da, c["ln_1"])
    return dx + da, d


def gpt2_head_forward(x, params, config):
    """logits = ln_f(x) @ wte^T, the head tied to the token embedding: (B, T, C) -> (B, T, V)."""
    wte = params["transformer.wte.weight"]
    w = params["transformer.ln_f.weight"]
    b = params["transformer.ln_f.bias"]
    c = {}  # the layers' caches, by name
    xf, c["ln_f"] = layers.layernorm_forward(x, w, b, config.layer_norm_epsilon)
    logits = xf.reshape(-1, xf.shape[-1]) @ wte.T  # (N, C) @ (C, V)
    logits = logits.reshape(*x.shape[:-1], wte.shape[0])  # (N, V) -> (..., V)
    c["lm_head"] = (xf, wte)
    return logits, c


def gpt2_head_backward(dlogits, c):
    """forward was: logits = xf @ wte^T, xf = ln_f(x), so dxf = dlogits @ wte, dwte = dlogits^T @ xf."""
    xf, wte = c["lm_head"]
    dlogits2 = dlogits.reshape(-1, dlogits.shape[-1])  # (N, V)
    dxf = (dlogits2 @ wte).reshape(xf.shape)  # (N, V) @ (V, C)
    dwte = dlogits2.T @ xf.reshape(-1, xf.shape[-1])  # (V, N) @ (N, C)
    dx, dw, db = layers.layernorm_backward(dxf, c["ln_f"])
    grads = {"transformer.wte.weight": dwte, "transformer.ln_f.weight": dw, "transformer.ln_f.bias": db}
    return dx, grads


# ---- Llama ---------------------------------------------------------------------------------------
# LlamaConfig's sizes and counts, each a positive integer. Named one by one: a test of the fields' types
# (f.type is int) would check nothing once annotations are strings (from __future__ import annotations).
_LLAMA_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings")


@dataclass(frozen=True)
class LlamaConfig:
    """A Llama's shape, with transformers' ``LlamaConfig`` field names and, where it has them, defaults.

    Head size hs = hidden_size / num_attention_heads (even: RoPE turns pairs of channels); G =
    num_attention_heads / num_key_value_heads query heads share each key/value head.
    """
    model_type = "llama"  # a class attribute, not a field: it picks the Architecture
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    n_layer = property(lambda self: self.num_hidden_layers)  # the names forward and generate read
    n_positions = property(lambda self: self.max_position_embeddings)

    def __post_init__(self):
        for name in _LLAMA_SIZES:
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"LlamaConfig.{name} must be a positive integer, got {value!r}")
        H = self.num_attention_heads
        Hkv = self.num_key_value_heads
        if self.hidden_size % (2 * H) or H % Hkv:
            raise ValueError(f"LlamaConfig: hidden_size ({self.hidden_size}) must be a multiple of 2 * "
                             f"num_attention_heads ({H}), and that a multiple of num_key_value_heads ({Hkv})")
        if not (self.rms_norm_eps > 0 and self.rope_theta > 0):
            raise ValueError(f"LlamaConfig: rms_norm_eps and rope_theta must be > 0, got "
                             f"{self.rms_norm_eps!r}, {self.rope_theta!r}")


def llama_param_shapes(config):
    """Every parameter's name and shape, as transformers' LlamaForCausalLM lists them, weights (out, in)."""
    V, C, I = config.vocab_size, config.hidden_size, config.intermediate_size
    Ckv = config.num_key_value_heads * (C // config.num_attention_heads)
    shapes = {"model.embed_tokens.weight": (V, C)}
    for l in range(config.num_hidden_layers):
        h = f"model.layers.{l}."
        for name, out, inp in (("q", C, C), ("k", Ckv, C), ("v", Ckv, C), ("o", C, C)):
            shapes[h + f"self_attn.{name}_proj.weight"] = (out, inp)
            if config.attention_bias:
                shapes[h + f"self_attn.{name}_proj.bias"] = (out,)
        shapes.update({h + "mlp.gate_proj.weight": (I, C), h + "mlp.up_proj.weight": (I, C),
                       h + "mlp.down_proj.weight": (C, I), h + "input_layernorm.weight": (C,),
                       h + "post_attention_layernorm.weight": (C,)})
    shapes["model.norm.weight"] = (C,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, C)
    return shapes


def _proj_forward(x, p, name, c):
    """transformers' nn.Linear, y = x @ W^T (+ b) with W stored (out, in); its cache goes to c[name]."""
    y, c[name] = layers.linear_forward(x, p[name + ".weight"].T, p.get(name + ".bias"))
    return y


def _proj_backward(dy, c, name, d):
    """dx of a projection; its dW (out, in), and db if it has a bias, go to d."""
    dx, dw, db = layers.linear_backward(dy, c[name])
    d[name + ".weight"] = dw.T  # (in, out) -> (out, in)
    if db is not None:
        d[name + ".bias"] = db
    return dx


def llama_block_forward(x, p, config, past=None):
    """One Llama block (see the module docstring), x (B, T, C) -> (B, T, C), and its cache.

    ``p`` and ``past`` as in :func:`block_forward`, ``past`` with num_key_value_heads heads.
    """
    H = config.num_attention_heads
    Hkv = config.num_key_value_heads
    eps = config.rms_norm_eps
    c = {}  # the layers' caches, by name
    pos0 = 0
    if past is not None:
        pos0 = past[0].shape[2]  # the positions already in the KV cache
    cos, sin = layers.rope_tables(pos0, x.shape[1], config.hidden_size // H, config.rope_theta, x)
    a, c["norm_1"] = layers.rmsnorm_forward(x, p["input_layernorm.weight"], eps)
    q = _proj_forward(a, p, "self_attn.q_proj", c)  # (B, T, H hs)
    q, c["rope_q"] = layers.rotary_forward(q, cos, sin, H)
    k = _proj_forward(a, p, "self_attn.k_proj", c)  # (B, T, Hkv hs)
    k, c["rope_k"] = layers.rotary_forward(k, cos, sin, Hkv)
    v = _proj_forward(a, p, "self_attn.v_proj", c)  # (B, T, Hkv hs)
    a, c["attn"] = layers.grouped_attention_forward(q, k, v, H, Hkv, past)
    c["present"] = c["attn"][1:3]  # (k, v) of every position so far: the KV cache for the next call
    x = x + _proj_forward(a, p, "self_attn.o_proj", c)
    m, c["norm_2"] = layers.rmsnorm_forward(x, p["post_attention_layernorm.weight"], eps)
    gate = _proj_forward(m, p, "mlp.gate_proj", c)  # (B, T, I)
    up = _proj_forward(m, p, "mlp.up_proj", c)
    m, c["swiglu"] = layers.swiglu_forward(gate, up)
    return x + _proj_forward(m, p, "mlp.down_proj", c), c


def llama_block_backward(dx, c):
    """The block's backward: (dL/d its input, {name within the block: gradient}) from dL/d its output.

    Notebook 05, "Llama block backward", derives it layer by layer.
    """
    d = {}
    # forward was: x = x + down_proj(swiglu(gate_proj(m), up_proj(m))), m = post_attention_layernorm(x)
    dswiglu = _proj_backward(dx, c, "mlp.down_proj", d)
    dgate, dup = layers.swiglu_backward(dswiglu, c["swiglu"])
    dm_gate = _proj_backward(dgate, c, "mlp.gate_proj", d)
    dm_up = _proj_backward(dup, c, "mlp.up_proj", d)
    dm = dm_gate + dm_up  # m feeds both projections: their gradients add
    dm, d["post_attention_layernorm.weight"] = layers.rmsnorm_backward(dm, c["norm_2"])
    dx = dx + dm
    # forward was: x = x + o_proj(attention(rope(q_proj(a)), rope(k_proj(a)), v_proj(a))),
    #              a = input_layernorm(x)
    dattn = _proj_backward(dx, c, "self_attn.o_proj", d)
    dq, dk, dv = layers.grouped_attention_backward(dattn, c["attn"])
    da_q = _proj_backward(layers.rotary_backward(dq, c["rope_q"]), c, "self_attn.q_proj", d)
    da_k = _proj_backward(layers.rotary_backward(dk, c["rope_k"]), c, "self_attn.k_proj", d)
    da_v = _proj_backward(dv, c, "self_attn.v_proj", d)
    da = da_q + da_k + da_v  # a feeds all three projections
    da, d["input_layernorm.weight"] = layers.rmsnorm_backward(da, c["norm_1"])
    return dx + da, d


def llama_head_forward(x, params, config):
    """logits = norm(x) @ W^T: (B, T, C) -> (B, T, V).

    W is lm_head.weight or, when tie_word_embeddings, the token embedding.
    """
    head = "lm_head"
    if config.tie_word_embeddings:
        head = "model.embed_tokens"  # the embedding's matrix serves as the head
    c = {}  # the layers' caches, by name: "norm", and the head's under the name of the matrix it used
    xf, c["norm"] = layers.rmsnorm_forward(x, params["model.norm.weight"], config.rms_norm_eps)
    return _proj_forward(xf, params, head, c), c


def llama_head_backward(dlogits, c):
    """forward was: logits = xf @ W^T, xf = norm(x)."""
    grads = {}
    head = "lm_head"
    if head not in c:
        head = "model.embed_tokens"  # tied: the gradient goes to the embedding's matrix
    dxf = _proj_backward(dlogits, c, head, grads)
    dx, grads["model.norm.weight"] = layers.rmsnorm_backward(dxf, c["norm"])
    return dx, grads


@dataclass(frozen=True)
class Architecture:
    """What one model type defines; :func:`forward` and :func:`backward` chain it.

    Signatures as GPT-2's: the head's backward returns {name: grad}, the block's {name within the
    block: grad}.
    """
    param_shapes: Callable
    block_prefix: str  # block l's tensors are named block_prefix.format(l) + name within the block
    residual_out: tuple  # suffixes of the projections into the residual stream (scaled at init)
    embeddings: tuple  # the token embedding's name, the position embedding's (None: a Llama has none)
    block_forward: Callable
    block_backward: Callable
    head_forward: Callable
    head_backward: Callable


ARCHITECTURES = {
    "gpt2": Architecture(gpt2_param_shapes, "transformer.h.{}.", ("c_proj.weight",),
                         ("transformer.wte.weight", "transformer.wpe.weight"),
                         block_forward, block_backward, gpt2_head_forward, gpt2_head_backward),
    "llama": Architecture(llama_param_shapes, "model.layers.{}.", ("o_proj.weight", "down_proj.weight"),
                          ("model.embed_tokens.weight", None),
                          llama_block_forward, llama_block_backward, llama_head_forward, llama_head_backward),
}


def param_shapes(config):
    """Every parameter's name and shape for ``config``'s model type."""
    return ARCHITECTURES[config.model_type].param_shapes(config)


def forward(params, idx, config, *, past=None, rows=None):
    """Logits (B, T, V) for token ids ``idx`` (B, T), and the cache that :func:`backward` needs.

    The logits are on the parameters' device.

    For decoding with a KV cache, ``past`` is ``cache["present"]`` of the previous call (per layer
    ``(k, v)``) and ``idx`` holds only the new tokens. ``rows``, a boolean (B, T) mask, runs the head, a
    small model's widest layer, only where a loss reads it: logits (n, V), in row-major order.
    (:func:`minitodi.parallel.forward_in_shards` runs this function on shards of a batch side by side.)
    """
    xp = array_module(*params.values())
    idx = xp.asarray(idx)
    pos0 = 0
    if past is not None:
        pos0 = past[0][0].shape[2]  # the positions already in the KV cache
    check_ids(idx, config, pos0)
    arch = ARCHITECTURES[config.model_type]
    wte_name, wpe_name = arch.embeddings
    wpe = None if wpe_name is None else params[wpe_name]  # a Llama has no position embedding
    x, c_embed = layers.embedding_forward(params[wte_name], wpe, idx, pos0)
    blocks = []
    for l in range(config.n_layer):
        prefix = arch.block_prefix.format(l)
        p = {name[len(prefix):]: w for name, w in params.items() if name.startswith(prefix)}
        layer_past = None if past is None else past[l]
        x, c = arch.block_forward(x, p, config, layer_past)
        blocks.append(c)
    if rows is not None:
        x_head = x[rows]  # (B, T, C) -> (n, C): only the positions a loss reads
    else:
        x_head = x
    logits, c_head = arch.head_forward(x_head, params, config)
    cache = {"config": config, "names": list(params), "embed": c_embed, "blocks": blocks, "head": c_head,
             "present": [c["present"] for c in blocks], "has_past": past is not None,
             "rows": rows, "shape": x.shape}
    return logits, cache


def backward(dlogits, cache):
    """Gradients of the loss w.r.t. every parameter, from dlogits = dloss / dlogits.

    dlogits is (B, T, V), or (n, V) for a forward with ``rows``. Returns a dict with exactly the keys of
    the parameters. The forward must have run without ``past``.
    """
    if cache["has_past"]:
        raise ValueError("backward needs a forward over the whole sequence (it ran with a KV cache)")
    arch = ARCHITECTURES[cache["config"].model_type]
    dx, grads = arch.head_backward(dlogits, cache["head"])
    if cache["rows"] is not None:
        # forward was: logits = head(x[rows]); the other positions get no gradient
        dx_rows = dx
        dx = array_module(dx).zeros(cache["shape"], dtype=dx.dtype)
        dx[cache["rows"]] = dx_rows
    for l in reversed(range(len(cache["blocks"]))):
        dx, block_grads = arch.block_backward(dx, cache["blocks"][l])
        prefix = arch.block_prefix.format(l)
        grads.update({prefix + name: g for name, g in block_grads.items()})
    for name, g in zip(arch.embeddings, layers.embedding_backward(dx, cache["embed"])):
        if name is None:  # a Llama has no position embedding
            continue
        if name in grads:  # a tied tensor gets gradient from both ends
            grads[name] = grads[name] + g
        else:
            grads[name] = g
    return {name: grads[name] for name in cache["names"]}


def n_params(config):
    """Number of parameters (the tied head counted once)."""
    return sum(int(np.prod(shape)) for shape in param_shapes(config).values())
