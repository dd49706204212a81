"""minitodi: token-wise knowledge distillation (ToDi) from scratch, in NumPy or CuPy.

The math is in :mod:`minitodi.core`: every divergence's gradient w.r.t. the student's logits is derived
by hand (see ``minitodi.core.losses``) and checked against finite differences (see
``minitodi.core.gradcheck``).
"""

__version__ = "0.1.0"
