"""One training step of a GPT-2-shaped model: minitodi against an equivalent PyTorch GPT-2, side by side.

    python benchmarks/bench_train_step.py                  # 4 layers, width 128, V 2048, 16 x 64, float32
    python benchmarks/bench_train_step.py --device gpu
    python benchmarks/bench_train_step.py --arch llama     # the same sizes as a Llama, 2 key/value heads

A step is forward, cross-entropy, backward, gradient clipping and AdamW; the same step without the
update (forward, cross-entropy and backward only) is timed too. Both sides start from the same weights
(minitodi's initialisation, copied into the PyTorch model) and see the same batch; the four take turns
in blocks of warmed-up steps (see ``timed``), and the median step time is reported with tokens per
second. Thread counts are the libraries' defaults; ``OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1`` in the
environment runs both on one core. On the CPU the last line is a lower bound for forward + backward: the
step's matrix products alone at the best one-core rate measured here (``products_floor``).

The PyTorch model is written here in the usual way (nn.Linear layers, fused qkv, scaled_dot_product_attention
with a causal mask, tanh GELU, tied head, torch.optim.AdamW with its default implementation); it runs
only when torch is installed and uses torch's default thread count, as minitodi's BLAS does. With
``--arch llama`` the other side is transformers' own ``LlamaForCausalLM`` (sdpa attention), loaded with
minitodi's parameters as they are: the names and the (out, in) layout are transformers'.
"""

import argparse
import contextlib
import os
import statistics
import sys
import time
from dataclasses import asdict

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minitodi import parallel  # noqa: E402
from minitodi.core import layers, model, optim  # noqa: E402
from minitodi.core.device import get_xp, to_device  # noqa: E402


def minitodi_step(args, cfg, params, idx, targets, update=True):
    opt = optim.adamw_init(params)

    def step():
        logits, cache = parallel.forward_in_shards(params, idx, cfg)
        _, ce_cache = layers.cross_entropy_forward(logits, targets)
        grads = parallel.backward_in_shards(layers.cross_entropy_backward(1.0, ce_cache), cache)
        if update:
            optim.clip_grad_norm(grads, 1.0)
            parallel.adamw_step(params, grads, opt, lr=1e-3, weight_decay=0.1)
    return step


def torch_step(args, cfg, params, idx, targets, update=True):
    import torch
    import torch.nn.functional as F
    from torch import nn

    C, H = cfg.n_embd, cfg.n_head

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.ln_2 = nn.LayerNorm(C), nn.LayerNorm(C)
            self.c_attn, self.c_proj = nn.Linear(C, 3 * C), nn.Linear(C, C)
            self.c_fc, self.mlp_proj = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)

        def forward(self, x):
            B, T, _ = x.shape
            q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=-1)
            q, k, v = (z.view(B, T, H, C // H).transpose(1, 2) for z in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
            x = x + self.c_proj(y)
            return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.wpe = nn.Embedding(cfg.vocab_size, C), nn.Embedding(cfg.n_positions, C)
            self.h = nn.ModuleList(Block() for _ in range(cfg.n_layer))
            self.ln_f = nn.LayerNorm(C)

        def forward(self, idx):
            x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
            for block in self.h:
                x = block(x)
            return self.ln_f(x) @ self.wte.weight.T

    device = "cuda" if args.device == "gpu" else "cpu"
    net = GPT().to(device)
    host = {k: torch.from_numpy(np.asarray(model_to_host(v))) for k, v in params.items()}
    with torch.no_grad():  # minitodi's weights, (in, out) -> nn.Linear's (out, in)
        net.wte.weight.copy_(host["transformer.wte.weight"])
        net.wpe.weight.copy_(host["transformer.wpe.weight"])
        for l, block in enumerate(net.h):
            h = f"transformer.h.{l}."
            for mine, theirs in (("ln_1", block.ln_1), ("ln_2", block.ln_2)):
                theirs.weight.copy_(host[h + mine + ".weight"])
                theirs.bias.copy_(host[h + mine + ".bias"])
            for mine, theirs in (("attn.c_attn", block.c_attn), ("attn.c_proj", block.c_proj),
                                 ("mlp.c_fc", block.c_fc), ("mlp.c_proj", block.mlp_proj)):
                theirs.weight.copy_(host[h + mine + ".weight"].T)
                theirs.bias.copy_(host[h + mine + ".bias"])
        net.ln_f.weight.copy_(host["transformer.ln_f.weight"])
        net.ln_f.bias.copy_(host["transformer.ln_f.bias"])
    return torch_train_step(net, device, idx, targets, update)


def llama_torch_step(args, cfg, params, idx, targets, update=True):
    import torch
    import transformers

    device = "cuda" if args.device == "gpu" else "cpu"
    net = transformers.LlamaForCausalLM(transformers.LlamaConfig(**asdict(cfg), attn_implementation="sdpa"))
    net.load_state_dict({k: torch.from_numpy(model_to_host(v)) for k, v in params.items()}, strict=True)
    return torch_train_step(net.to(device), device, idx, targets, update)


def torch_train_step(net, device, idx, targets, update):
    """Cross-entropy, backward and (with ``update``) clipping and AdamW, as minitodi's step does them."""
    import torch
    import torch.nn.functional as F

    decay = [p for p in net.parameters() if p.ndim >= 2]
    no_decay = [p for p in net.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.95))
    x = torch.from_numpy(model_to_host(idx)).to(device)
    y = torch.from_numpy(model_to_host(targets)).to(device)

    def step():
        logits = net(x)
        logits = getattr(logits, "logits", logits)  # transformers returns an output object
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), y.view(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if update:
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
    return step


def model_to_host(x):
    return x.get() if hasattr(x, "get") else np.asarray(x)


def timed(steps, warmup, repeat, sync=None, rounds=3):
    """Median seconds per step of each callable.

    The callables take turns in ``rounds`` blocks of ``repeat // rounds`` timed steps, each block after
    ``warmup`` untimed ones: both sides see the same machine load over the run, while a block is long
    enough that one library's idle worker threads (BLAS, OpenMP) have gone quiet before the other's
    timed steps.
    """
    times = [[] for _ in steps]
    for _ in range(rounds):
        for step, record in zip(steps, times):
            for _ in range(warmup):
                step()
            for _ in range(max(1, repeat // rounds)):
                start = time.perf_counter()
                step()
                if sync:
                    sync()
                record.append(time.perf_counter() - start)
    return [statistics.median(record) for record in times]


def products_floor(cfg, params, batch, seq):
    """A lower bound for forward + backward on the CPU: the step's matrix products at the best one-core rate.

    Returns (floating-point operations of the step's matrix products, seconds they take at that rate on
    every core, the rate in operations per second, cores they run on).

    Forward and backward make three products per weight matrix (y = x W, dx = dy W^T, dW = x^T dy) and
    three per attention product (q k^T and att v, the causal mask's zeros included): 2 x 3 x tokens x (the
    matrix weights a token meets, position and token embeddings being lookups unless the head reads the
    latter, + 2 T C per layer) operations. The rate is the best of one shard's head product (tokens x C x V)
    on one thread (the shards as parallel.shards cuts them), and every core minitodi uses runs at it. Where
    NumPy's BLAS is not one whose threads one_blas_thread can set (through threadpoolctl), the product runs
    on BLAS's threads: a looser bound.
    """
    C = params[model.ARCHITECTURES[cfg.model_type].embeddings[0]].shape[1]
    lookups = {"transformer.wpe.weight"}  # GPT-2's position embeddings
    if "lm_head.weight" in params:  # an untied head: the token embedding is only looked up
        lookups.add("model.embed_tokens.weight")
    matrix_weights = sum(x.size for name, x in params.items() if x.ndim == 2 and name not in lookups)
    macs = matrix_weights + 2 * seq * C * cfg.n_layer
    flops = 6 * batch * seq * macs
    shard_count = len(parallel.shards(batch, seq, C))
    rng = np.random.default_rng(0)
    a = rng.standard_normal((batch * seq // shard_count, C), dtype=np.float32)
    w = rng.standard_normal((C, cfg.vocab_size), dtype=np.float32)
    with parallel.one_blas_thread() if parallel.parallel_blas_calls() else contextlib.nullcontext():
        best = min(timed([lambda: a @ w], 1, 10, rounds=1)[0] for _ in range(5))
    rate = 2 * a.shape[0] * C * cfg.vocab_size / best
    return flops, flops / (rate * parallel.threads()), rate, parallel.threads()


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--arch", choices=["gpt2", "llama"], default="gpt2")
    parser.add_argument("--kv-heads", type=int, default=2, help="Llama's key/value heads")
    return parser.parse_args()


def model_config(args):
    """The model the arguments describe: GPT-2, or a Llama of the same sizes."""
    if args.arch == "llama":
        # SwiGLU width 8C/3, rounded up to a multiple of 8: GPT-2's 8 C^2 MLP weights
        swiglu_width = -(-8 * args.width // 24) * 8
        return model.LlamaConfig(vocab_size=args.vocab, hidden_size=args.width, num_hidden_layers=args.layers,
                                 intermediate_size=swiglu_width, num_attention_heads=args.heads,
                                 num_key_value_heads=args.kv_heads, max_position_embeddings=args.seq)
    return model.GPTConfig(vocab_size=args.vocab, n_positions=args.seq, n_embd=args.width,
                           n_layer=args.layers, n_head=args.heads)


def report_floor(args, cfg, torch_forward_backward):
    """Print the matrix products' lower bound, over torch's forward + backward time when that was measured."""
    flops, floor, rate, cores = products_floor(cfg, model.init_params(cfg), args.batch, args.seq)
    line = (f"floor: the matrix products alone, {flops / 1e9:.2f} GFLOP at {rate / 1e9:.0f} GFLOP/s a core "
            f"on {cores} core(s): {floor * 1e3:.1f} ms")
    if torch_forward_backward is not None:
        line += f" = {floor / torch_forward_backward:.2f}x torch's forward + backward above"
    print(line)


def main():
    args = parse_args()
    parallel.reuse_freed_memory()  # as the command line runs minitodi

    cfg = model_config(args)
    rng = np.random.default_rng(0)
    idx = to_device(rng.integers(0, args.vocab, (args.batch, args.seq)), args.device)
    targets = to_device(rng.integers(0, args.vocab, (args.batch, args.seq)), args.device)
    tokens = args.batch * args.seq
    sync = get_xp(args.device).cuda.Device().synchronize if args.device == "gpu" else None
    print(f"{args.arch} step: {args.layers} layers, width {args.width}, V {args.vocab}, batch {args.batch} x "
          f"{args.seq}, float32, {args.device}; median of {args.repeat}; "
          f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}")
    makers = [minitodi_step]
    try:
        import torch

        makers.append(torch_step if args.arch == "gpt2" else llama_torch_step)
    except ImportError:
        torch = None
    kinds = [("full step", True), ("forward + backward", False)]
    steps = [make(args, cfg, model.init_params(cfg, 0, device=args.device), idx, targets, update)
             for _, update in kinds for make in makers]
    times = iter(timed(steps, args.warmup, args.repeat, sync))
    theirs = None  # torch's time for the last kind, forward + backward, once measured
    for kind, _ in kinds:
        mine = next(times)
        print(f"{kind}:\n  minitodi  {mine * 1e3:8.2f} ms/step  {tokens / mine:10.0f} tok/s")
        if torch is None:
            print("  torch not installed: no comparison")
            continue
        theirs = next(times)
        print(f"  torch     {theirs * 1e3:8.2f} ms/step  {tokens / theirs:10.0f} tok/s   "
              f"(torch {torch.__version__}, {torch.get_num_threads()} threads)")
        print(f"  ratio minitodi / torch: {mine / theirs:.2f}x")
    if args.device == "cpu":
        report_floor(args, cfg, theirs)


if __name__ == "__main__":
    main()
