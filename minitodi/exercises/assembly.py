"""The learner's layers in the real model: each checked where the model calls it, then a student trained.

    from minitodi.exercises import assemble
    result = assemble(linear_backward=linear_backward, layernorm_backward=layernorm_backward,
                      gelu_backward=gelu_backward, attention_backward=attention_backward,
                      cross_entropy_backward=cross_entropy_backward)
    print(result)     # each layer of the model against minitodi's, then the training run
    result.passed     # True when every layer agrees and the student trained with them

The functions have the exercises' signatures (notebook 06). minitodi.core.model calls its layers as
``layers.<name>(...)``, looked up at call time, so :class:`Plugged` binds wrappers on the
minitodi.core.layers module for as long as a ``with`` block lasts and restores the originals when it
ends, whatever happens inside. A wrapper's forward runs minitodi's own forward and keeps its inputs;
its backward hands the learner's function those inputs in the exercise's shapes (rows of (N, C) for a
linear layer or a norm, one head's (T, hs) at a time for attention, the counted rows for the
cross-entropy) and returns the learner's gradient to the model. Forwards stay minitodi's: the
exercises are backwards.

:func:`assemble` then

1. runs one batch through a tiny GPT-2 (float64) with the learner's layers, every wrapper also
   computing minitodi's backward on the same inputs: a layer whose gradient differs is named with its
   place, e.g. "block 0 attention backward: dq and dk differ (relative error 0.29)". Each layer is
   judged on the gradient that actually reached it, so one wrong layer does not blame the layers below;
   the whole model's parameter gradients are compared too;
2. if every layer agrees, trains a ToDi student (:func:`minitodi.train.step_loss`, AdamW from
   :mod:`minitodi.core.optim`, kd_rate 0.5 and temperature 2 as the official scripts) for a few dozen steps
   with the learner's layers, and the same run with minitodi's, from the same start: the losses fall,
   and the two runs agree to rounding.

The teacher is a random GPT-2 whose token embedding is scaled up so that its next-token distributions
are peaked (a random model at GPT-2's initialisation predicts almost uniformly: nothing to distil). The
data are random token sequences; the labels, after a 4-token prompt that does not count, are the
teacher's most likely next tokens.
"""

import inspect
from dataclasses import dataclass, field

import numpy as np

from .. import train
from ..core import layers, model, optim
from ..presets import TrainConfig, model_config
from ..teacher import Teacher
from .attention import ATTENTION
from .grading import NotGradable, NotImplementedYet, learner_outputs, listing, wrapped
from .layers import CROSS_ENTROPY, GELU, LAYERNORM, LINEAR

TOL = 1e-8
"""Largest relative error max|a - e| / max|e| of a layer's gradient that agrees. The worked solutions
measured below 1e-13 in every layer; the nearest known mistake is far above 1e-3."""


# --------------------------------------------------------------------------------------------------
# one adapter per layer kind: the exercise's shapes from the model's, and back


class _Linear:
    """y = x @ w + b on (..., Cin): the learner's linear_backward on the rows (N, Cin)."""

    exercise = LINEAR
    kind = "linear"
    forward_name = "linear_forward"
    backward_name = "linear_backward"
    parts = ("dx", "dw", "db")

    @staticmethod
    def learner(fn, dy, inputs, where):
        x, w, b = inputs
        rows = x.reshape(-1, x.shape[-1])  # (..., Cin) -> (N, Cin)
        dy_rows = dy.reshape(-1, dy.shape[-1])  # (..., Cout) -> (N, Cout)
        bias = b
        if b is None:
            bias = np.zeros(w.shape[1], dtype=w.dtype)
        dx, dw, db = learner_outputs(LINEAR, fn, [dy_rows.copy(), rows.copy(), w.copy(), bias.copy()], where)
        for grad, like, name in ((dx, rows, "dx"), (dw, w, "dw"), (db, bias, "db")):
            _same_shape(grad, like, name, where)
        if b is None:
            db = None
        return dx.reshape(x.shape), dw, db

    @staticmethod
    def split(grads):
        return grads


class _LayerNorm:
    """Layer norm over the last axis of (..., C): the learner's layernorm_backward on the rows (N, C)."""

    exercise = LAYERNORM
    kind = "layer norm"
    forward_name = "layernorm_forward"
    backward_name = "layernorm_backward"
    parts = ("dx", "dw", "db")

    @staticmethod
    def learner(fn, dy, inputs, where):
        x, w, b, eps = inputs
        rows = x.reshape(-1, x.shape[-1])
        dy_rows = dy.reshape(rows.shape)
        dx, dw, db = learner_outputs(LAYERNORM, fn, [dy_rows.copy(), rows.copy(), w.copy(), b.copy(), eps],
                                     where)
        for grad, like, name in ((dx, rows, "dx"), (dw, w, "dw"), (db, b, "db")):
            _same_shape(grad, like, name, where)
        return dx.reshape(x.shape), dw, db

    @staticmethod
    def split(grads):
        return grads


class _Gelu:
    """GPT-2's GELU, elementwise: the learner's gelu_backward on the arrays as they are."""

    exercise = GELU
    kind = "GELU"
    forward_name = "gelu_forward"
    backward_name = "gelu_backward"
    parts = ("dx",)

    @staticmethod
    def learner(fn, dy, inputs, where):
        (x,) = inputs
        (dx,) = learner_outputs(GELU, fn, [dy.copy(), x.copy()], where)
        _same_shape(dx, x, "dx", where)
        return dx

    @staticmethod
    def split(grads):
        return (grads,)


class _Attention:
    """GPT-2's causal self-attention on qkv (B, T, 3C): the learner's attention_backward head by head.

    qkv = [q | k | v] along the last axis, each (B, T, C) of H heads of hs channels; query head h reads
    channels h hs .. (h + 1) hs of q, and key and value head h the same channels of k and v.
    """

    exercise = ATTENTION
    kind = "attention"
    forward_name = "attention_forward"
    backward_name = "attention_backward"
    parts = ("dq", "dk", "dv")

    @staticmethod
    def learner(fn, dy, inputs, where):
        qkv, n_head = inputs[:2]
        B, T, C3 = qkv.shape
        hs = C3 // 3 // n_head
        heads = qkv.reshape(B, T, 3, n_head, hs)  # (B, T, 3C) -> (B, T, q/k/v, H, hs)
        dy_heads = dy.reshape(B, T, n_head, hs)
        dqkv = np.zeros_like(heads)
        for b in range(B):
            for h in range(n_head):
                q, k, v = (heads[b, :, i, h].copy() for i in range(3))  # each (T, hs)
                grads = learner_outputs(ATTENTION, fn, [dy_heads[b, :, h].copy(), q, k, v], where)
                for i, grad in enumerate(grads):
                    _same_shape(grad, q, ATTENTION.output_names[i], where)
                    dqkv[b, :, i, h] = grad
        return dqkv.reshape(qkv.shape)

    @staticmethod
    def split(grads):
        return tuple(np.split(grads, 3, axis=-1))  # dqkv -> dq, dk, dv


class _CrossEntropy:
    """The mean cross-entropy over the counted positions: the learner's cross_entropy_backward on them.

    The learner's function averages over the rows it is given, so it gets the counted rows only, and
    the model's dloss multiplies its answer.
    """

    exercise = CROSS_ENTROPY
    kind = "cross-entropy"
    forward_name = "cross_entropy_forward"
    backward_name = "cross_entropy_backward"
    parts = ("dlogits",)

    @staticmethod
    def learner(fn, dloss, inputs, where):
        logits, targets, ignore_index = inputs
        counted = targets != ignore_index
        rows = logits[counted]  # (..., V) -> (n, V)
        (drows,) = learner_outputs(CROSS_ENTROPY, fn, [rows.copy(), targets[counted].copy()], where)
        _same_shape(drows, rows, "dlogits", where)
        dlogits = np.zeros_like(logits)
        dlogits[counted] = drows * dloss
        return dlogits

    @staticmethod
    def split(grads):
        return (grads,)


ADAPTERS = {adapter.exercise.name: adapter for adapter in (_Linear, _LayerNorm, _Gelu, _Attention,
                                                            _CrossEntropy)}
"""The learner's functions :func:`assemble` takes, by exercise name."""


def _same_shape(grad, like, name, where):
    if grad.shape != like.shape:
        raise NotGradable(f"your function returned {name} of shape {grad.shape} on {where}; the inputs "
                          f"need {like.shape}.")


# --------------------------------------------------------------------------------------------------
# the learner's functions bound in minitodi.core.layers


@dataclass
class LayerCheck:
    """One layer of the model with the learner's backward, against minitodi's on the same inputs.

    ``errors``: each gradient's relative error max|a - e| / max|e|; ``problem``: why the learner's
    answer could not be used there (an exception, a wrong shape, NaN), minitodi's standing in for it.
    """

    place: str  # 'block 0 attention', 'block 1 mlp.c_fc', 'ln_f', 'the loss'
    kind: str  # 'attention', 'linear', ...
    order: int  # its place in the forward pass
    errors: dict = field(default_factory=dict)
    problem: str | None = None

    @property
    def agrees(self):
        return self.problem is None and all(error <= TOL for error in self.errors.values())

    def text(self):
        """'block 0 attention backward: dq and dk differ (relative error 0.29); dv agrees.'"""
        heading = f"{self.place} ({self.kind}) backward: "
        if self.place.endswith(self.kind):  # 'block 0 attention', not 'block 0 attention (attention)'
            heading = f"{self.place} backward: "
        if self.problem is not None:
            return heading + self.problem
        wrong = [name for name, error in self.errors.items() if error > TOL]
        largest = max(self.errors.values())
        if not wrong:
            return heading + f"agrees (largest relative error {largest:.1e})."
        verb = "differs" if len(wrong) == 1 else "differ"
        text = heading + f"{listing(wrong)} {verb} from minitodi's (relative error {largest:.2g})"
        right = [name for name in self.errors if name not in wrong]
        if right:
            agree = "agree"
            if len(right) == 1:
                agree = "agrees"
            text += f"; {listing(right)} {agree}"
        return text + "."


class Plugged:
    """While a ``with`` block lasts, the model's layers call the learner's backwards (module docstring).

    ``functions``: exercise name -> the learner's function (see :data:`ADAPTERS`). ``names``: id of a
    parameter array -> its name, to say where a layer sits; ``compare``: also run minitodi's backward
    on each layer's inputs and record a :class:`LayerCheck` (``checks``). A function that raises
    NotImplementedError is put in ``not_implemented`` and minitodi's is used from then on.
    """

    def __init__(self, functions, names=None, compare=False):
        self.functions = dict(functions)
        self.names = names or {}
        self.compare = compare
        self.checks = []
        self.calls = dict.fromkeys(self.functions, 0)
        self.not_implemented = []
        self._saved = {}  # id(cache) -> (cache, the forward's inputs, place, order)
        self._originals = {}  # attribute of minitodi.core.layers -> the function it held
        self._forwards = {}  # adapter -> how many forwards of its kind ran: the block of a GELU or attention
        self._order = 0

    def __enter__(self):
        try:
            for name, fn in self.functions.items():
                adapter = ADAPTERS[name]
                forward = getattr(layers, adapter.forward_name)
                backward = getattr(layers, adapter.backward_name)
                self._originals[adapter.forward_name] = forward
                self._originals[adapter.backward_name] = backward
                setattr(layers, adapter.forward_name, self._forward(adapter, forward))
                setattr(layers, adapter.backward_name, self._backward(name, fn, adapter, backward))
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(self, *exception):
        self._restore()
        return False

    def _restore(self):
        for attribute, original in self._originals.items():
            setattr(layers, attribute, original)
        self._saved.clear()

    def forget(self):
        """Drop the inputs kept by forwards whose backward never ran (the teacher's, say)."""
        self._saved.clear()

    def _forward(self, adapter, original):
        """minitodi's forward, its inputs kept under its cache's id for the backward."""
        signature = inspect.signature(original)

        def forward(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            y, cache = original(*args, **kwargs)
            self._order += 1
            self._saved[id(cache)] = (cache, bound.args, self._place(adapter, bound.args), self._order)
            return y, cache

        return forward

    def _backward(self, name, fn, adapter, original):
        """The learner's backward on the kept inputs; minitodi's where it cannot be used."""
        def backward(dy, cache):
            if id(cache) not in self._saved or name in self.not_implemented:
                return original(dy, cache)
            _, inputs, place, order = self._saved.pop(id(cache))
            self.calls[name] += 1
            try:
                grads = adapter.learner(fn, dy, inputs, f"{place} ({adapter.kind})")
            except NotImplementedYet:
                self.not_implemented.append(name)
                return original(dy, cache)
            except NotGradable as problem:
                self.checks.append(LayerCheck(place, adapter.kind, order, problem=str(problem)))
                return original(dy, cache)
            if self.compare:
                expected = original(dy, cache)
                errors = _errors(adapter.parts, adapter.split(grads), adapter.split(expected))
                self.checks.append(LayerCheck(place, adapter.kind, order, errors))
            return grads

        return backward

    def _place(self, adapter, inputs):
        """Where a layer sits: its weight's name for a linear layer or a norm, else the block it is in.

        A GPT-2 block has one GELU and one attention, so the k-th of them in a forward is in block k
        (the check runs one forward).
        """
        if adapter is _CrossEntropy:
            return "the loss"
        if adapter in (_Linear, _LayerNorm):
            block, within = _parse(self.names.get(id(inputs[1]), "?.weight"))
            if block is None:
                return within
            return f"block {block} {within}"
        block = self._forwards.get(adapter, 0)
        self._forwards[adapter] = block + 1
        return f"block {block} {adapter.kind}"


def _parse(name):
    """(block, name within it) of a GPT-2 weight.

    'transformer.h.1.mlp.c_fc.weight' -> (1, 'mlp.c_fc'), 'transformer.ln_f.weight' -> (None, 'ln_f').
    """
    stem = name.rsplit(".", 1)[0]
    prefix = "transformer.h."
    if stem.startswith(prefix):
        block, within = stem[len(prefix):].split(".", 1)
        return int(block), within
    return None, stem.removeprefix("transformer.")


def _errors(names, answers, expected):
    """{name: max|a - e| / max|e|} of each gradient (one that is None on both sides, no bias, left out)."""
    errors = {}
    for name, a, e in zip(names, answers, expected):
        if a is None and e is None:
            continue
        scale = max(float(np.abs(e).max(initial=0.0)), 1e-300)
        errors[name] = float(np.abs(a - e).max(initial=0.0)) / scale
    return errors


# --------------------------------------------------------------------------------------------------
# the model, the teacher and the data


VOCAB = 48
SEQ_LEN = 12
PROMPT = 4  # the first positions of every sequence do not count (labels -100), as a prompt's
SEQUENCES = 64
BATCH = 16
TEACHER_EMBEDDING_SCALE = 40.0
"""The teacher's token embedding times this: its logits spread over a few units instead of 0.1 (GPT-2's
initialisation, N(0, 0.02), through the tied head), so its next-token distributions are peaked."""

TRAINING = TrainConfig(loss="todi", batch_size=BATCH, lr=1e-2, min_lr=1e-3, warmup_steps=5, kd_rate=0.5,
                       temperature=2.0)
"""The student's run: ToDi at the official scripts' kd_rate and temperature; a learning rate for a
model this small (it brings the loss from 7.86 to 1.99 in 40 steps)."""


@dataclass
class _Setup:
    """The student's configuration, the teacher, the batches (ids, labels)."""

    config: object
    teacher: Teacher
    batches: list


def _setup():
    """The tiny student ('tiny': 1 block, C = 32, 2 heads), the random teacher ('small'), the data."""
    student = model_config("tiny", VOCAB, SEQ_LEN)
    teacher_config = model_config("small", VOCAB, SEQ_LEN)
    params = model.init_params(teacher_config, seed=1, dtype=np.float64)
    params["transformer.wte.weight"] *= TEACHER_EMBEDDING_SCALE
    idx = np.random.default_rng(0).integers(0, VOCAB, (SEQUENCES, SEQ_LEN))
    logits, _ = model.forward(params, idx, teacher_config)
    labels = logits.argmax(axis=-1)  # the teacher's most likely next token at each position
    labels[:, :PROMPT] = -100
    batches = [(idx[i:i + BATCH], labels[i:i + BATCH]) for i in range(0, SEQUENCES, BATCH)]
    return _Setup(student, Teacher(params, teacher_config, tokenizer=None), batches)


# --------------------------------------------------------------------------------------------------
# checking the layers in the model, and training with them


def _check_in_model(functions, setup):
    """One batch through the student with the learner's layers, each compared where the model calls it.

    Returns the :class:`Plugged` (its checks, calls and not_implemented) and (relative error, name) of
    the parameter whose gradient differs most from minitodi's own backward's.
    """
    params = model.init_params(setup.config, seed=0, dtype=np.float64)
    idx, labels = setup.batches[0]
    idx = idx[:4]
    labels = labels[:4]
    expected = _gradients(params, setup.config, idx, labels)
    names = {id(array): name for name, array in params.items()}
    with Plugged(functions, names, compare=True) as plugged:
        grads = _gradients(params, setup.config, idx, labels)
    plugged.checks.sort(key=lambda check: check.order)
    worst = (0.0, None)
    for name, grad in grads.items():
        (error,) = _errors((name,), (grad,), (expected[name],)).values()
        if error > worst[0]:
            worst = (error, name)
    return plugged, worst


def _gradients(params, config, idx, labels):
    """Every parameter's gradient of the mean cross-entropy over the counted positions."""
    logits, cache = model.forward(params, idx, config)
    _, ce_cache = layers.cross_entropy_forward(logits, labels)
    return model.backward(layers.cross_entropy_backward(1.0, ce_cache), cache)


def _train(functions, setup, steps):
    """The ToDi student's loss at every step, trained with ``functions`` plugged in (none: minitodi's)."""
    params = model.init_params(setup.config, seed=0, dtype=np.float64)
    state = optim.adamw_init(params)
    tcfg = TRAINING
    losses = []
    with Plugged(functions) as plugged:
        for step in range(steps):
            idx, labels = setup.batches[step % len(setup.batches)]
            lr = optim.lr_at(step, lr=tcfg.lr, total_steps=steps, warmup_steps=tcfg.warmup_steps,
                             min_lr=tcfg.min_lr)
            total, _, _, grads = train.step_loss(params, setup.config, idx, labels, tcfg, setup.teacher)
            plugged.forget()
            optim.clip_grad_norm(grads, tcfg.grad_clip)
            optim.adamw_step(params, grads, state, lr=lr, weight_decay=tcfg.weight_decay)
            losses.append(total)
    return losses


def assemble(*, steps=40, **functions):
    """Plug the learner's layer backwards into minitodi's GPT-2, check them there, train a student.

    ``functions``: any of linear_backward, layernorm_backward, gelu_backward, attention_backward and
    cross_entropy_backward, by name, with the exercises' signatures; minitodi's own stands in for any
    left out. Returns an :class:`Assembly` (print it). An unknown name or a value that is not a
    function raises; whatever the functions do is reported, never raised.
    """
    _check_arguments(functions, steps)
    setup = _setup()
    plugged, (gradient_error, worst_parameter) = _check_in_model(functions, setup)
    not_implemented = tuple(name for name in functions if name in plugged.not_implemented)
    result = Assembly(tuple(functions), plugged.checks, not_implemented,
                      tuple(name for name, n in plugged.calls.items() if n == 0), gradient_error,
                      worst_parameter, _describe(setup.config))
    implemented = [name for name in functions if name not in result.not_implemented]
    if result.layers_agree and implemented:
        result.losses = _train({name: functions[name] for name in implemented}, setup, steps)
        result.reference_losses = _train({}, setup, steps)
    return result


def _check_arguments(functions, steps):
    unknown = sorted(set(functions) - set(ADAPTERS))
    if unknown:
        raise ValueError(f"assemble() takes the layers of the GPT-2 block by their exercise names, "
                         f"{', '.join(ADAPTERS)}; not {', '.join(unknown)}")
    if not functions:
        raise ValueError(f"assemble() needs at least one of your functions: {', '.join(ADAPTERS)}")
    for name, fn in functions.items():
        if not callable(fn):
            raise TypeError(f"assemble({name}=...): a function is needed, got {type(fn).__name__}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ValueError(f"steps must be an int >= 2, got {steps!r}")


def _describe(config):
    """'GPT-2 (1 block, C = 32, 2 heads, V = 48, T = 12)'."""
    blocks = "block" if config.n_layer == 1 else "blocks"
    return (f"GPT-2 ({config.n_layer} {blocks}, C = {config.n_embd}, {config.n_head} heads, "
            f"V = {config.vocab_size}, T = {config.n_positions})")


RUNS_AGREE = 1e-6
"""Largest relative difference between the losses of the run with the learner's layers and the run with
minitodi's, step by step. Layers that agree to 1e-13 keep the runs within 1e-12 over 40 steps; a layer
off by 1e-3 is caught by the layer check long before."""


@dataclass
class Assembly:
    """What :func:`assemble` found: each layer's check, the model's gradient, the training run.

    ``checks``: a :class:`LayerCheck` per layer that called one of the learner's functions, in the
    forward's order; ``losses``: the learner's run, step by step (empty when not trained, because a
    layer differs or nothing was implemented); ``reference_losses``: the same run with minitodi's layers.
    """

    used: tuple
    checks: list
    not_implemented: tuple
    never_called: tuple
    gradient_error: float
    worst_parameter: str | None  # whose gradient differs most from minitodi's
    model: str  # the model, in words
    losses: list = field(default_factory=list)
    reference_losses: list = field(default_factory=list)

    @property
    def differing(self):
        """The layer checks that do not agree, in the forward's order."""
        return [check for check in self.checks if not check.agrees]

    @property
    def layers_agree(self):
        return not self.never_called and not self.differing

    @property
    def runs_agree(self):
        """Whether the learner's run and minitodi's gave the same losses (to :data:`RUNS_AGREE`)."""
        if not self.losses:
            return False
        mine = np.array(self.losses)
        theirs = np.array(self.reference_losses)
        return bool(np.all(np.abs(mine - theirs) <= RUNS_AGREE * np.abs(theirs)))

    @property
    def passed(self):
        """Every function implemented, every layer agrees, and the student trained as with minitodi's."""
        fell = bool(self.losses) and self.losses[-1] < self.losses[0]
        return self.layers_agree and not self.not_implemented and fell and self.runs_agree

    def __str__(self):
        lines = [wrapped("", f"your {listing(self.used)} in minitodi's {self.model}:")]
        if self.not_implemented:
            pronoun = "it" if len(self.not_implemented) == 1 else "them"
            lines.append(wrapped("", f"not implemented yet: {listing(self.not_implemented)} (minitodi's "
                                     f"stands in until you write {pronoun})."))
        if self.never_called:
            lines.append(wrapped("", f"the model never called your {listing(self.never_called)}: is "
                                     "minitodi.core.model still calling its layers as layers.<name>(...)?"))
        for check in self.checks:
            lines.append(wrapped("  ", check.text()))
        if self.checks:
            lines.append(self._gradient_line())
        lines.extend(self._training_lines())
        return "\n".join(lines)

    def _gradient_line(self):
        if any(check.problem is not None for check in self.checks):
            return wrapped("", "the whole model's gradient: not compared, minitodi's layers stood in where "
                               "yours could not be used.")
        if self.gradient_error <= TOL:
            return wrapped("", f"the whole model's gradient: every parameter agrees with minitodi's (largest "
                               f"relative error {self.gradient_error:.1e}).")
        return wrapped("", f"the whole model's gradient differs from minitodi's, most at "
                           f"{self.worst_parameter} "
                           f"(relative error {self.gradient_error:.2g}): the layers named above.")

    def _training_lines(self):
        if not self.layers_agree:
            return [wrapped("", "not trained: fix the layers named above first (grade one alone with "
                                "check(name, your_function) for the known mistakes).")]
        if not self.losses:
            return ["not trained: none of your functions is implemented yet."]
        steps = len(self.losses)
        shown = sorted({0, *range(9, steps, 10), steps - 1})
        header = f"  {'step':<11}" + "".join(f"{step + 1:>8}" for step in shown)
        mine = f"  {'yours':<11}" + "".join(f"{self.losses[step]:>8.4f}" for step in shown)
        theirs = f"  {'minitodi':<11}" + "".join(f"{self.reference_losses[step]:>8.4f}" for step in shown)
        verdict = "the same losses as with minitodi's layers, step by step, to rounding."
        if not self.runs_agree:
            verdict = "the losses drift away from the run with minitodi's layers: look at the layers above."
        settings = f"kd_rate {TRAINING.kd_rate}, temperature {TRAINING.temperature:g}"
        return [wrapped("", f"trained a ToDi student ({settings}) "
                            f"for {steps} steps with your layers: loss {self.losses[0]:.4f} -> "
                            f"{self.losses[-1]:.4f}; {verdict}"),
                header, mine, theirs]
