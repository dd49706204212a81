"""A GPT-2-shaped transformer: configuration, initialisation, forward and hand-written backward.

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

One block (pre-norm, as GPT-2)::

    x = x + c_proj(attention(c_attn(ln_1(x))))
    x = x + mlp.c_proj(gelu(mlp.c_fc(ln_2(x))))
"""

from dataclasses import asdict, dataclass

import numpy as np

from . import layers
from .backend import array_module, host_rng, to_device


@dataclass(frozen=True)
class GPTConfig:
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

    @classmethod
    def tiny(cls, vocab_size=512, **overrides):
        """A model that trains in seconds on a laptop CPU (2 layers, width 64)."""
        return cls(**{"vocab_size": vocab_size, "n_positions": 64, "n_embd": 64, "n_layer": 2, "n_head": 4,
                      **overrides})

    def to_dict(self):
        return asdict(self)


def param_shapes(config):
    """Every parameter's name and shape, in the order transformers lists them."""
    V, P, C = config.vocab_size, config.n_positions, config.n_embd
    shapes = {"transformer.wte.weight": (V, C), "transformer.wpe.weight": (P, C)}
    for l in range(config.n_layer):
        h = f"transformer.h.{l}."
        shapes.update({
            h + "ln_1.weight": (C,), h + "ln_1.bias": (C,),
            h + "attn.c_attn.weight": (C, 3 * C), h + "attn.c_attn.bias": (3 * C,),
            h + "attn.c_proj.weight": (C, C), h + "attn.c_proj.bias": (C,),
            h + "ln_2.weight": (C,), h + "ln_2.bias": (C,),
            h + "mlp.c_fc.weight": (C, 4 * C), h + "mlp.c_fc.bias": (4 * C,),
            h + "mlp.c_proj.weight": (4 * C, C), h + "mlp.c_proj.bias": (C,),
        })
    shapes.update({"transformer.ln_f.weight": (C,), "transformer.ln_f.bias": (C,)})
    return shapes


def init_params(config, seed=0, *, dtype=np.float32, device="cpu"):
    """GPT-2's initialisation, drawn with NumPy on the host (so NumPy and CuPy start identical).

    Weights and embeddings ~ N(0, 0.02); the projections that write into the residual stream
    (``attn.c_proj``, ``mlp.c_proj``) ~ N(0, 0.02 / sqrt(2 n_layer)), so the residual's variance does
    not grow with depth; biases 0; layer-norm weights 1.
    """
    rng = host_rng(seed)
    params = {}
    for name, shape in param_shapes(config).items():
        if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name.endswith("ln_f.weight"):
            value = np.ones(shape)
        elif name.endswith(".bias"):
            value = np.zeros(shape)
        else:
            std = 0.02 / np.sqrt(2 * config.n_layer) if name.endswith("c_proj.weight") else 0.02
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
            raise ValueError(f"parameter {name} has shape {tuple(params[name].shape)}, the config says {shape}")


def check_ids(idx, config, pos0=0):
    """Token ids must be integers in [0, vocab_size) and fit the context (CuPy would wrap them silently)."""
    if idx.ndim != 2:
        raise ValueError(f"token ids must be shaped (B, T), got shape {tuple(idx.shape)}")
    if idx.dtype.kind not in "iu":
        raise TypeError(f"token ids must be integers, got dtype {idx.dtype}")
    if idx.size == 0:
        raise ValueError("token ids are empty")
    low, high = int(idx.min()), int(idx.max())
    if low < 0 or high >= config.vocab_size:
        raise ValueError(f"token ids must be in [0, {config.vocab_size}), got values in [{low}, {high}]")
    if pos0 + idx.shape[1] > config.n_positions:
        raise ValueError(f"sequence of {pos0 + idx.shape[1]} positions exceeds n_positions = {config.n_positions}")


def forward(params, idx, config, *, past=None):
    """Logits for token ids.

    Args:
        params: the parameter dict (see the module docstring).
        idx: (B, T) integer token ids, on the parameters' device.
        past: for decoding with a KV cache, ``cache["present"]`` of the previous call: a list of per-layer
            ``(k, v)``; ``idx`` then holds only the new tokens.
    Returns:
        ``logits`` (B, T, V) and the ``cache`` that :func:`backward` needs (and ``cache["present"]``).
    """
    xp = array_module(*params.values())
    idx = xp.asarray(idx)
    pos0 = 0 if past is None else past[0][0].shape[2]
    check_ids(idx, config, pos0)
    eps, H = config.layer_norm_epsilon, config.n_head
    p = params
    x, c_emb = layers.embedding_forward(p["transformer.wte.weight"], p["transformer.wpe.weight"], idx, pos0)
    blocks, present = [], []
    for l in range(config.n_layer):
        h = f"transformer.h.{l}."
        a, c_ln1 = layers.layernorm_forward(x, p[h + "ln_1.weight"], p[h + "ln_1.bias"], eps)
        a, c_qkv = layers.linear_forward(a, p[h + "attn.c_attn.weight"], p[h + "attn.c_attn.bias"])  # (B,T,3C)
        a, c_att = layers.attention_forward(a, H, None if past is None else past[l])
        a, c_proj = layers.linear_forward(a, p[h + "attn.c_proj.weight"], p[h + "attn.c_proj.bias"])
        x = x + a
        m, c_ln2 = layers.layernorm_forward(x, p[h + "ln_2.weight"], p[h + "ln_2.bias"], eps)
        m, c_fc = layers.linear_forward(m, p[h + "mlp.c_fc.weight"], p[h + "mlp.c_fc.bias"])  # (B,T,4C)
        m, c_gelu = layers.gelu_forward(m)
        m, c_mproj = layers.linear_forward(m, p[h + "mlp.c_proj.weight"], p[h + "mlp.c_proj.bias"])
        x = x + m
        blocks.append((c_ln1, c_qkv, c_att, c_proj, c_ln2, c_fc, c_gelu, c_mproj))
        present.append(c_att["present"])
    xf, c_lnf = layers.layernorm_forward(x, p["transformer.ln_f.weight"], p["transformer.ln_f.bias"], eps)
    wte = p["transformer.wte.weight"]
    logits = (xf.reshape(-1, xf.shape[-1]) @ wte.T).reshape(*idx.shape, -1)  # tied head: (N, C) @ (C, V)
    cache = {"config": config, "params": params, "emb": c_emb, "blocks": blocks, "lnf": c_lnf, "xf": xf,
             "present": present, "has_past": past is not None}
    return logits, cache


def backward(dlogits, cache):
    """Gradients of the loss w.r.t. every parameter, from dlogits = dloss / dlogits (B, T, V).

    Returns a dict with exactly the keys of the parameters. The forward must have run without ``past``.
    """
    if cache["has_past"]:
        raise ValueError("backward needs a forward over the whole sequence (it ran with a KV cache)")
    config, p = cache["config"], cache["params"]
    grads = {}
    # forward was: logits = xf @ wte^T, so dxf = dlogits @ wte and dwte (head part) = dlogits^T @ xf
    wte = p["transformer.wte.weight"]
    C = wte.shape[1]
    dlogits2 = dlogits.reshape(-1, dlogits.shape[-1])  # (N, V)
    dxf = (dlogits2 @ wte).reshape(cache["xf"].shape)  # (N, V) @ (V, C)
    dwte_head = dlogits2.T @ cache["xf"].reshape(-1, C)  # (V, N) @ (N, C)
    dx, grads["transformer.ln_f.weight"], grads["transformer.ln_f.bias"] = layers.layernorm_backward(
        dxf, cache["lnf"])
    for l in reversed(range(config.n_layer)):
        h = f"transformer.h.{l}."
        c_ln1, c_qkv, c_att, c_proj, c_ln2, c_fc, c_gelu, c_mproj = cache["blocks"][l]
        # forward was: x = x + mlp(ln_2(x)): the residual passes dx through and adds the branch's gradient
        dm, grads[h + "mlp.c_proj.weight"], grads[h + "mlp.c_proj.bias"] = layers.linear_backward(dx, c_mproj)
        dm = layers.gelu_backward(dm, c_gelu)
        dm, grads[h + "mlp.c_fc.weight"], grads[h + "mlp.c_fc.bias"] = layers.linear_backward(dm, c_fc)
        dm, grads[h + "ln_2.weight"], grads[h + "ln_2.bias"] = layers.layernorm_backward(dm, c_ln2)
        dx = dx + dm
        # forward was: x = x + attn(ln_1(x))
        da, grads[h + "attn.c_proj.weight"], grads[h + "attn.c_proj.bias"] = layers.linear_backward(dx, c_proj)
        da = layers.attention_backward(da, c_att)
        da, grads[h + "attn.c_attn.weight"], grads[h + "attn.c_attn.bias"] = layers.linear_backward(da, c_qkv)
        da, grads[h + "ln_1.weight"], grads[h + "ln_1.bias"] = layers.layernorm_backward(da, c_ln1)
        dx = dx + da
    dwte, grads["transformer.wpe.weight"] = layers.embedding_backward(dx, cache["emb"])
    grads["transformer.wte.weight"] = dwte + dwte_head
    return {name: grads[name] for name in p}


def n_params(config):
    """Number of parameters (the tied head counted once)."""
    return sum(int(np.prod(shape)) for shape in param_shapes(config).values())
